"""Networks trained from scratch: torchvision's ResNets (and ConvNeXts), fastai's XResNets, a choice of pooling.

Every model built here has a JSON-able `config` such that `build_model(**model.config)` rebuilds the same
architecture, which is how a checkpoint folder is turned back into a model (see `artlearn.checkpoint`).
"""
import numbers
import warnings

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import StochasticDepth

from .checks import check_choice, check_fraction

__all__ = ["GeM", "ArtistResNet", "ArtistConvNeXt", "ArtistXResNet", "ARCHITECTURES", "build_model", "POOLS",
           "RESNET_DEPTHS", "XRESNET_DEPTHS"]

RESNET_DEPTHS = (18, 34, 50, 101)
XRESNET_DEPTHS = (18, 34, 50)
POOLS = ("avg", "gem")
_RESNET_BUILDERS = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50, 101: tvm.resnet101}
_RESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): mean(clamp(x, eps) ** p) ** (1 / p) over H and W.

    `p=1` is average pooling and `p -> inf` approaches max pooling. With `learnable=True`, `p` is one trainable
    parameter; otherwise it is a fixed buffer (kept in the state dict, not trained). Computed in float32.
    """

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM p={p!r}: need p > 0")
        p = torch.ones(1) * float(p)
        if learnable:
            self.p = nn.Parameter(p)
        else:
            self.register_buffer("p", p)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, 1, 1)."""
        p = self.p.float()
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / p)

    def extra_repr(self) -> str:
        """p, learnable and eps in the module's repr."""
        p = "?" if self.p.is_meta else f"{self.p.item():.4f}"
        return f"p={p}, learnable={isinstance(self.p, nn.Parameter)}, eps={self.eps}"


def _make_pool(pool: str, gem_p: float, gem_learnable: bool) -> nn.Module:
    """The pooling module named by `pool`."""
    check_choice("pool", pool, POOLS)
    return GeM(gem_p, gem_learnable) if pool == "gem" else nn.AdaptiveAvgPool2d(1)


class _SplitModel(nn.Module):
    """Shared parts of the models here: `config`, and `forward = forward_head(forward_features(x))`."""

    @property
    def config(self) -> dict:
        """JSON-able settings: `build_model(**model.config)` rebuilds this architecture."""
        return dict(self._config)

    @property
    def num_features(self) -> int:
        """Channels of the feature map (input size of the classifier)."""
        return self.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes), a plain tensor even for fastai's typed inputs."""
        # A TensorImage would carry its Python __torch_function__ through every layer: measured 1.15-1.25x slower
        # backward on the CPU (ResNet-18, 64 px, bs 32); fastai keeps the typed batch (xb) for decoding.
        return self.forward_head(self.forward_features(x.as_subclass(torch.Tensor)))

    def _stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one stage; with `grad_checkpoint` while training, keep no activations (recomputed on backward)."""
        if self._config.get("grad_checkpoint") and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)


class _DropPathBasicBlock(BasicBlock):
    """torchvision's BasicBlock with stochastic depth on the residual branch (parameter-free: same state dict)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path = nn.Identity()  # set per block by _torchvision_resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.drop_path(out) + identity)


class _DropPathBottleneck(Bottleneck):
    """torchvision's Bottleneck with stochastic depth on the residual branch (parameter-free: same state dict)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path = nn.Identity()  # set per block by _torchvision_resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.drop_path(out) + identity)


def _torchvision_resnet(depth: int, n_classes: int, zero_init_residual: bool, drop_path: float) -> tvm.ResNet:
    """torchvision's resnet{depth} (weights=None); with drop_path > 0 its blocks drop their residual branch per
    sample with a probability rising linearly from 0 to drop_path over the blocks (torchvision's ConvNeXt rule)."""
    if not drop_path:
        return _RESNET_BUILDERS[depth](weights=None, num_classes=n_classes, zero_init_residual=zero_init_residual)
    block = _DropPathBasicBlock if depth < 50 else _DropPathBottleneck
    net = tvm.ResNet(block, _RESNET_LAYERS[depth], num_classes=n_classes, zero_init_residual=zero_init_residual)
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    for i, b in enumerate(blocks):
        b.drop_path = StochasticDepth(drop_path * i / (len(blocks) - 1), "row")
    return net


class _FourStageNet(_SplitModel):
    """A stem, four stages `layer1`..`layer4`, then pool, (dropout,) and `fc`: the ResNet families' shared forward."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: (N, 3, H, W) -> (N, C, H/32, W/32)."""
        x = self._stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._stage(stage, x)
        return x

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, flatten, (dropout,) classify; `pre_logits=True` returns the pooled features."""
        x = self.drop(torch.flatten(self.pool(feats), 1))
        return x if pre_logits else self.fc(x)


class ArtistResNet(_FourStageNet):
    """ResNet-18/34/50/101 from scratch (torchvision's builders, `weights=None`) with avg or GeM pooling.

    The layers keep torchvision's names (`conv1` ... `layer4`, `fc`), so with `pool='avg'` the state dict is
    torchvision's own; GeM adds `pool.p`. `forward(x) == forward_head(forward_features(x))`.
    """

    def __init__(self, depth: int, n_classes: int, pool: str = "avg", zero_init_residual: bool = False,
                 gem_p: float = 3.0, gem_learnable: bool = True, drop_rate: float = 0.0,
                 grad_checkpoint: bool = False, drop_path: float = 0.0):
        super().__init__()
        check_choice("depth", depth, RESNET_DEPTHS)
        check_choice("pool", pool, POOLS)
        _check_n_classes(n_classes)
        check_fraction("drop_path", drop_path)
        depth, n_classes = int(depth), int(n_classes)
        net = _torchvision_resnet(depth, n_classes, zero_init_residual, float(drop_path))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.pool = _make_pool(pool, gem_p, gem_learnable)
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.fc = net.fc
        self._config = dict(arch=f"resnet{depth}", depth=depth, n_classes=n_classes, pool=pool,
                            zero_init_residual=bool(zero_init_residual), drop_rate=float(drop_rate),
                            grad_checkpoint=bool(grad_checkpoint))
        if drop_path:
            self._config["drop_path"] = float(drop_path)
        if pool == "gem":
            self._config.update(gem_p=float(gem_p), gem_learnable=bool(gem_learnable))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's stem: 7x7 conv, BatchNorm, ReLU, max pool."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _check_n_classes(n_classes) -> None:
    """ValueError unless `n_classes` is a positive integer."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 1:
        raise ValueError(f"n_classes={n_classes!r}: need a positive integer (the number of artists)")


def _convnext_nano(num_classes: int, stochastic_depth_prob: float):
    """A ConvNeXt with timm's 'nano' widths/depths (dims 80-640, depths 2-2-8-2), from torchvision's blocks."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    setting = [CNBlockConfig(80, 160, 2), CNBlockConfig(160, 320, 2), CNBlockConfig(320, 640, 8),
               CNBlockConfig(640, None, 2)]
    return ConvNeXt(setting, stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes)


_CONVNEXT_BUILDERS = {"convnext_nano": _convnext_nano,
                      "convnext_tiny": lambda num_classes, stochastic_depth_prob: tvm.convnext_tiny(
                          weights=None, num_classes=num_classes, stochastic_depth_prob=stochastic_depth_prob)}


class ArtistConvNeXt(_SplitModel):
    """A torchvision ConvNeXt from scratch with avg or GeM pooling and the same features/head split.

    Head as torchvision's: pool, LayerNorm2d, flatten, Linear (`classifier`).
    """

    def __init__(self, arch: str, n_classes: int, pool: str = "avg",
                 stochastic_depth_prob: float = 0.1, gem_p: float = 3.0, gem_learnable: bool = True,
                 drop_rate: float = 0.0, grad_checkpoint: bool = False):
        super().__init__()
        check_choice("arch", arch, tuple(_CONVNEXT_BUILDERS))
        check_choice("pool", pool, POOLS)
        _check_n_classes(n_classes)
        n_classes = int(n_classes)
        net = _CONVNEXT_BUILDERS[arch](num_classes=n_classes, stochastic_depth_prob=stochastic_depth_prob)
        self.features, self.pool = net.features, _make_pool(pool, gem_p, gem_learnable)
        self.norm, self.fc = net.classifier[0], net.classifier[2]
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self._config = dict(arch=arch, depth=None, n_classes=n_classes, pool=pool,
                            stochastic_depth_prob=float(stochastic_depth_prob), drop_rate=float(drop_rate),
                            grad_checkpoint=bool(grad_checkpoint))
        if pool == "gem":
            self._config.update(gem_p=float(gem_p), gem_learnable=bool(gem_learnable))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: (N, 3, H, W) -> (N, C, H/32, W/32)."""
        for stage in self.features:
            x = self._stage(stage, x)
        return x

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, normalise, flatten, (dropout,) classify; `pre_logits=True` returns the pooled features."""
        x = self.drop(torch.flatten(self.norm(self.pool(feats).to(feats.dtype)), 1))
        return x if pre_logits else self.fc(x)


def _fastai_xresnet(depth: int, n_classes: int) -> nn.Module:
    """fastai's `xresnet{depth}(n_out=n_classes)`; fastai's import-time `torch.jit.script` FutureWarning (on
    functions artlearn does not use) is silenced, as in artlearn's own first import."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from fastai.vision.models import xresnet
    return getattr(xresnet, f"xresnet{depth}")(n_out=n_classes)


class ArtistXResNet(_FourStageNet):
    """fastai's XResNet-18/34/50 from scratch (ResNet-D of "Bag of Tricks", He et al. 2019: a three-conv stem and
    average-pooled shortcuts) with avg or GeM pooling and the same features/head split.

    Stem and stages are fastai's own modules (`fastai.vision.models.xresnet`, reused rather than rewritten); fastai
    starts each block's last BatchNorm at zero, which is `zero_init_residual=True` here (False: at one, as
    torchvision's default).
    """

    def __init__(self, depth: int, n_classes: int, pool: str = "avg", zero_init_residual: bool = False,
                 gem_p: float = 3.0, gem_learnable: bool = True, drop_rate: float = 0.0,
                 grad_checkpoint: bool = False):
        super().__init__()
        check_choice("depth", depth, XRESNET_DEPTHS)
        check_choice("pool", pool, POOLS)
        _check_n_classes(n_classes)
        depth, n_classes = int(depth), int(n_classes)
        net = _fastai_xresnet(depth, n_classes)  # stem (3 convs), max pool, 4 stages, head
        parts = list(net.children())
        self.stem = nn.Sequential(*parts[:4])
        self.layer1, self.layer2, self.layer3, self.layer4 = parts[4:8]
        self.pool = _make_pool(pool, gem_p, gem_learnable)
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.fc = parts[-1]
        if not zero_init_residual:
            for bn in self.residual_norms():
                nn.init.ones_(bn.weight)
        self._config = dict(arch=f"xresnet{depth}", depth=depth, n_classes=n_classes, pool=pool,
                            zero_init_residual=bool(zero_init_residual), drop_rate=float(drop_rate),
                            grad_checkpoint=bool(grad_checkpoint))
        if pool == "gem":
            self._config.update(gem_p=float(gem_p), gem_learnable=bool(gem_learnable))

    def residual_norms(self) -> list:
        """The BatchNorm closing each block's residual branch (the one `zero_init_residual` starts at zero)."""
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return [[m for m in block.convpath[-1] if isinstance(m, nn.BatchNorm2d)][0] for st in stages for block in st]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """fastai's stem: three 3x3 conv layers and a max pool."""
        return self.stem(x)


def _resnet_builder(depth: int):
    """Registry entry for `resnet{depth}`: checks a `depth=` passed along (as in a config)."""
    def build(n_classes, pool="avg", depth=depth, drop_path=None, **kw):
        if depth != build.depth:
            raise ValueError(f"arch 'resnet{build.depth}' does not match depth={depth!r}")
        return ArtistResNet(build.depth, n_classes, pool, drop_path=0.0 if drop_path is None else drop_path, **kw)
    build.depth = depth
    return build


def _xresnet_builder(depth: int):
    """Registry entry for `xresnet{depth}` (fastai's blocks have no stochastic depth: drop_path is refused)."""
    def build(n_classes, pool="avg", depth=depth, drop_path=None, **kw):
        if depth != build.depth:
            raise ValueError(f"arch 'xresnet{build.depth}' does not match depth={depth!r}")
        if drop_path:
            raise ValueError(f"drop_path={drop_path!r}: xresnet{build.depth} has no stochastic depth (fastai's "
                             "blocks); leave drop_path unset or use a resnet")
        return ArtistXResNet(build.depth, n_classes, pool, **kw)
    build.depth = depth
    return build


def _convnext_builder(name: str):
    """Registry entry for a ConvNeXt variant (`depth` must be None: ConvNeXts are named, not numbered)."""
    def build(n_classes, pool="avg", depth=None, drop_path=None, zero_init_residual=False, **kw):
        if depth is not None:
            raise ValueError(f"arch {name!r} has no depth (got depth={depth!r})")
        if zero_init_residual:
            raise ValueError(f"zero_init_residual=True: {name} has no residual BatchNorm to start at zero (a ResNet "
                             "setting); leave it False")
        if drop_path is not None:
            kw["stochastic_depth_prob"] = drop_path
        return ArtistConvNeXt(name, n_classes, pool, **kw)
    return build


# name -> builder(n_classes, pool='avg', depth=..., drop_path=None, zero_init_residual=False, grad_checkpoint=False,
# **kw): every builder takes the recipe's model settings (refusing the ones it cannot honour) and a model's own
# `config` back. Register a new architecture by adding an entry.
ARCHITECTURES = {**{f"resnet{d}": _resnet_builder(d) for d in RESNET_DEPTHS},
                 **{f"xresnet{d}": _xresnet_builder(d) for d in XRESNET_DEPTHS},
                 **{name: _convnext_builder(name) for name in _CONVNEXT_BUILDERS}}


def build_model(arch: str = "resnet50", n_classes: int | None = None, pool: str = "avg", **kw) -> nn.Module:
    """Build a from-scratch model by registry name; `build_model(**model.config)` round-trips."""
    check_choice("arch", arch, tuple(ARCHITECTURES))
    _check_n_classes(n_classes)
    return ARCHITECTURES[arch](n_classes, pool=pool, **kw)
