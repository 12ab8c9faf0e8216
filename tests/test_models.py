"""ArtistResNet / GeM / build_model against torchvision and first principles (cheap: meta tensors for big nets)."""
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision

from artlearn.models import (
    ARCHITECTURES,
    ArtistConvNeXt,
    ArtistResNet,
    ArtistXResNet,
    GeM,
    build_model,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_param_count_equals_torchvision(depth):
    with torch.device("meta"):  # no real initialisation: counts and shapes only
        ours_avg = ArtistResNet(depth, 7)
        ours_gem = ArtistResNet(depth, 7, pool="gem")
        ours_fixed = ArtistResNet(depth, 7, pool="gem", gem_learnable=False)
        ref = getattr(torchvision.models, f"resnet{depth}")(num_classes=7)
    assert n_params(ours_avg) == n_params(ref)
    assert n_params(ours_gem) == n_params(ref) + 1
    assert n_params(ours_fixed) == n_params(ref)
    # same layer names and shapes as torchvision: a torchvision state dict loads as is
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours_avg.state_dict().items()} == ref_shapes
    assert set(ours_gem.state_dict()) - set(ref_shapes) == {"pool.p"}
    assert set(ours_fixed.state_dict()) - set(ref_shapes) == {"pool.p"}  # fixed p is a buffer


@pytest.mark.parametrize("depth,channels", [(18, 512), (34, 512), (50, 2048), (101, 2048)])
def test_feature_and_logit_shapes_all_depths(depth, channels):
    with torch.device("meta"):
        m = ArtistResNet(depth, 5, pool="gem")
        x = torch.empty(2, 3, 64, 96)
        feats = m.forward_features(x)
        assert tuple(feats.shape) == (2, channels, 2, 3)
        assert tuple(m.forward_head(feats).shape) == (2, 5)
        assert tuple(m.forward_head(feats, pre_logits=True).shape) == (2, channels)
    assert m.num_features == channels


@pytest.mark.parametrize("pool", ["avg", "gem"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 48), (64, 64), (40, 72)])
def test_resnet18_forward_shapes_and_split(pool, hw):
    torch.manual_seed(0)
    m = ArtistResNet(18, 4, pool=pool).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = m(x)
        feats = m.forward_features(x)
        split = m.forward_head(feats)
    assert out.shape == (2, 4)
    assert feats.shape == (2, 512, -(-hw[0] // 32), -(-hw[1] // 32))
    torch.testing.assert_close(out, split, rtol=0, atol=0)


def test_gem_p1_is_average_pooling_and_formula():
    x = torch.rand(3, 8, 5, 7) + 0.01
    torch.testing.assert_close(GeM(p=1.0)(x), F.adaptive_avg_pool2d(x, 1))
    expected = (x ** 3).mean(dim=(2, 3), keepdim=True) ** (1 / 3)
    torch.testing.assert_close(GeM(p=3.0)(x), expected)
    # large p tends to max pooling; eps clamps zeros and negatives
    torch.testing.assert_close(GeM(p=200.0)(x), F.adaptive_max_pool2d(x, 1), rtol=0.03, atol=0)
    assert torch.allclose(GeM(eps=1e-6)(torch.full((1, 1, 2, 2), -5.0)), torch.tensor(1e-6))


def test_gem_learnable_p_gets_a_gradient_fixed_p_does_not():
    g, f = GeM(3.0, learnable=True), GeM(3.0, learnable=False)
    x = torch.rand(2, 4, 3, 3) + 0.1
    g(x).sum().backward()
    assert isinstance(g.p, torch.nn.Parameter) and g.p.grad is not None and g.p.grad.abs().item() > 0
    assert list(f.parameters()) == [] and "p" in f.state_dict()
    with pytest.raises(ValueError, match="p > 0"):
        GeM(p=0)


def test_bad_depth_and_pool_list_valid_choices():
    with pytest.raises(ValueError, match=r"depth=152.*\[18, 34, 50, 101\]"):
        ArtistResNet(152, 10)
    with pytest.raises(ValueError, match=r"pool='max'.*\['avg', 'gem'\]"):
        ArtistResNet(18, 10, pool="max")
    with pytest.raises(ValueError, match="n_classes"):
        ArtistResNet(18, 0)
    with pytest.raises(ValueError, match=r"arch='vgg16'.*resnet50"):
        build_model("vgg16", n_classes=3)
    with pytest.raises(ValueError, match="does not match depth=34"):
        build_model("resnet18", n_classes=3, depth=34)


def test_positional_and_keyword_construction_agree():
    with torch.device("meta"):
        a = ArtistResNet(50, 10)
        b = ArtistResNet(depth=50, n_classes=10, pool="avg")
        c = ArtistResNet(50, 10, "gem")
    assert a.config == b.config == dict(arch="resnet50", depth=50, n_classes=10, pool="avg",
                                        zero_init_residual=False, drop_rate=0.0, grad_checkpoint=False)
    assert c.config["pool"] == "gem" and c.config["gem_p"] == 3.0


@pytest.mark.parametrize("kw", [dict(arch="resnet18", pool="avg"), dict(arch="resnet34", pool="gem", gem_p=4.0),
                                dict(arch="resnet50", pool="gem", gem_learnable=False, zero_init_residual=True),
                                dict(arch="resnet101", pool="avg", drop_rate=0.2),
                                dict(arch="convnext_nano", pool="gem"), dict(arch="convnext_tiny", pool="avg"),
                                dict(arch="xresnet18", pool="gem", zero_init_residual=True),
                                dict(arch="xresnet50", pool="avg", drop_rate=0.1)])
def test_build_model_config_round_trip(kw):
    with torch.device("meta"):
        m = build_model(n_classes=6, **kw)
        config = json.loads(json.dumps(m.config))  # JSON-able, as stored in meta.json
        again = build_model(**config)
    assert again.config == m.config
    assert type(again) is type(m)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert str(again) == str(m)


def test_registry_names_every_architecture():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "xresnet18", "xresnet34", "xresnet50", "convnext_nano",
            "convnext_tiny"} <= set(ARCHITECTURES)


def test_gem_weights_and_p_init():
    torch.manual_seed(0)
    m = build_model("resnet18", n_classes=3, pool="gem", gem_p=2.5)
    assert m.pool.p.item() == 2.5


def test_zero_init_residual_is_passed_to_torchvision():
    torch.manual_seed(0)
    m = ArtistResNet(18, 3, zero_init_residual=True)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for layer in (m.layer1, m.layer4) for b in layer)
    assert float(ArtistResNet(18, 3).layer1[0].bn2.weight.detach().sum()) > 0


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_xresnet_is_fastais_own(depth):
    """Same parameters and layers as fastai's xresnet{depth} (the oracle): its stem and stages, our pool and head."""
    from fastai.vision.models import xresnet
    with torch.device("meta"):
        ours = ArtistXResNet(depth, 7)
        ours_gem = build_model(f"xresnet{depth}", n_classes=7, pool="gem")
        ref = getattr(xresnet, f"xresnet{depth}")(n_out=7)
    assert n_params(ours) == n_params(ref) and n_params(ours_gem) == n_params(ref) + 1
    assert sorted(tuple(v.shape) for v in ours.state_dict().values()) == \
        sorted(tuple(v.shape) for v in ref.state_dict().values())
    assert ours.num_features == (512 if depth < 50 else 2048)


def test_xresnet_forward_split_and_residual_init():
    """forward == head(features) at 48 px; zero_init_residual starts each block's last BatchNorm at 0 (fastai's
    default), False at 1; drop_path and a depth fastai lacks are refused by name."""
    torch.manual_seed(0)
    m = build_model("xresnet18", n_classes=4).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.forward_head(m.forward_features(x)), rtol=0, atol=0)
        assert m.forward_features(x).shape == (2, 512, 2, 2)
    assert len(m.residual_norms()) == 8
    assert all(float(bn.weight.detach().min()) == 1.0 for bn in m.residual_norms())
    zero = build_model("xresnet18", n_classes=4, zero_init_residual=True)
    assert all(float(bn.weight.detach().abs().sum()) == 0 for bn in zero.residual_norms())
    with pytest.raises(ValueError, match="drop_path=0.1: xresnet18 has no stochastic depth"):
        build_model("xresnet18", n_classes=4, drop_path=0.1)
    with pytest.raises(ValueError, match="depth"):
        ArtistXResNet(101, 4)


def test_convnext_matches_torchvision_and_splits():
    with torch.device("meta"):
        ours = ArtistConvNeXt("convnext_tiny", 9)
        ref = torchvision.models.convnext_tiny(num_classes=9)
        ours_gem = build_model("convnext_tiny", n_classes=9, pool="gem")
    assert n_params(ours) == n_params(ref)
    assert n_params(ours_gem) == n_params(ref) + 1
    torch.manual_seed(0)
    nano = build_model("convnext_nano", n_classes=3, pool="gem", stochastic_depth_prob=0.0).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(nano(x), nano.forward_head(nano.forward_features(x)), rtol=0, atol=0)
    assert nano(x).shape == (2, 3)


def _saved_activation_bytes(model, x) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


@pytest.mark.parametrize("arch", ["resnet18", "xresnet18", "convnext_nano"])
def test_gradient_checkpointing_same_result_less_memory(arch):
    torch.manual_seed(0)
    plain = build_model(arch, n_classes=5)
    ckpt = build_model(**{**plain.config, "grad_checkpoint": True})
    ckpt.load_state_dict(plain.state_dict())
    plain.train(), ckpt.train()
    if arch.startswith("convnext"):  # layers in eval mode (no random stochastic-depth masks), root still training
        plain.eval(), ckpt.eval()
        plain.training = ckpt.training = True
    x = torch.randn(2, 3, 64, 64)
    for m in (plain, ckpt):
        m.zero_grad()
        m(x).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ckpt.config["grad_checkpoint"] is True
    assert _saved_activation_bytes(ckpt, x) < 0.5 * _saved_activation_bytes(plain, x)


@pytest.mark.parametrize("depth", [18, 50])
def test_drop_path_keeps_torchvision_state_dict_and_drops_rows_only_in_training(depth):
    plain = build_model(f"resnet{depth}", n_classes=5)
    dropped = build_model(f"resnet{depth}", n_classes=5, drop_path=0.5)
    assert dropped.config["drop_path"] == 0.5 and "drop_path" not in plain.config
    assert build_model(**dropped.config).config == dropped.config  # round-trips through a checkpoint's meta
    dropped.load_state_dict(plain.state_dict())  # no new parameters or buffers: the same keys and shapes
    blocks = [b for layer in (dropped.layer1, dropped.layer2, dropped.layer3, dropped.layer4) for b in layer]
    probs = [b.drop_path.p for b in blocks]
    assert probs[0] == 0.0 and probs[-1] == 0.5 and probs == sorted(probs)  # linear rule over the blocks
    x = torch.randn(4, 3, 64, 64)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x))  # evaluation: every branch kept, nothing rescaled
    dropped.train()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        a, b = dropped(x), dropped(x)
    assert not torch.allclose(a, b)  # training: branches dropped at random


def test_drop_path_bad_values():
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="drop_path"):
            build_model("resnet18", n_classes=3, drop_path=bad)


def test_forward_of_a_fastai_typed_batch_is_a_plain_tensor_with_the_same_logits():
    from fastai.torch_core import TensorImage
    model = build_model("resnet18", n_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    typed = model(TensorImage(x))
    assert type(typed) is torch.Tensor  # the typed batch stops at the model's door: no __torch_function__ per layer
    torch.testing.assert_close(typed, model(x), rtol=0, atol=0)
