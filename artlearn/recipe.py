"""`Recipe`: the one owner of every recipe default, grouped by where each setting acts; presets are instances.

Each field carries `metadata`: `stage` (data / model / optimisation / extras / evaluation, for people), `to` (the
consumer: 'dls' = `artist_dls`, 'learner' = `artist_learner`, 'kfold' = `train_kfold` itself), `help` (the CLI's
text), `choices` (a tuple, or a registry read when checked) and `absent` (what a run's config.json without this key
means: the default unless said otherwise).
The whole `Recipe` travels: `train_kfold` hands it to `artist_dls` (which hands it to the batch augmentation) and to
`artist_learner`; the CLI (`cli.add_recipe_flags`) builds one flag per field and `train_kfold(..., **overrides)`
takes the same names, so a new setting is one field here plus the code that uses it.
"""
import dataclasses
import numbers
import typing
from dataclasses import dataclass, field

from .checks import check_choice, check_fraction, check_number, check_side
from .tta import TTA_VIEWS

PRESET_NAMES = ("reference", "best", "fast")
OPTIMIZERS = ("adam", "adamw", "sgd")
MONITORS = ("valid_loss", "valid_acc", "f1_macro")
SAMPLERS = (None, "balanced", "sqrt")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PIPELINES = ("device", "items")
STORES = ("crop", "presize", "full")
CONSUMERS = {"dls": "artist_dls", "learner": "artist_learner", "kfold": "train_kfold"}  # metadata `to` -> function
TTAS = tuple(TTA_VIEWS)  # the built-in test-time views; `tta.TTA_VIEWS` is the registry, read live
DEFAULT = object()  # `absent=DEFAULT`: a config.json without the key means the setting's default


def _setting(default, stage: str, to: str, help: str, choices=None, absent=DEFAULT):
    """A dataclass field with its stage, consumer, help text, (optional) choices and what its absence from an older
    run's config.json means."""
    return field(default=default, metadata=dict(stage=stage, to=to, help=help, choices=choices,
                                                absent=default if absent is DEFAULT else absent))


@dataclass(frozen=True)
class Recipe:
    """Every setting of a K-fold recipe, with the report's values as defaults (`Recipe()` is `reference`)."""
    # data: what the model sees
    size: int = _setting(288, "data", "dls", "training resolution in pixels")
    size_by_budget: bool = _setting(False, "data", "kfold", "with a budget, choose the training size: the largest "
                                    "of budget.BUDGET_SIZES (48-128 px) at which every fold still gets `epochs` "
                                    "epochs, else the smallest (`size` without a budget; a size given explicitly "
                                    "turns this off)")
    bs: int = _setting(32, "data", "dls", "batch size")
    min_scale: float = _setting(0.08, "data", "dls", "RandomResizedCrop: smallest crop area fraction")
    max_rotate: float = _setting(15.0, "data", "dls", "largest rotation in degrees (0: none)")
    flip: bool = _setting(True, "data", "dls", "random horizontal flips")
    colour_jitter: float = _setting(0.0, "data", "dls", "colour jitter strength s: brightness, contrast and "
                                    "saturation factors drawn in [1 - s, 1 + s] per training image (0: off)")
    sampler: str | None = _setting(None, "data", "dls", "training sampler: none, balanced or sqrt", SAMPLERS)
    pipeline: str = _setting("device", "data", "dls", "images to batches: 'device' (store gathered per batch, one "
                             "resampling per image on the device) or 'items' (fastai's per-item PIL pipeline, "
                             "kept for runs trained with it: the data settings it had, none added since)",
                             PIPELINES, absent="items")
    store: str = _setting("crop", "data", "dls", "image store's shorter side: 'crop' (ceil(size / sqrt(min_scale)): "
                          "a min_scale crop is not upsampled), 'presize' (1.15 x size, v0.1's cache) or 'full' "
                          "(each image as decoded); capped by the memory budget", STORES,
                          absent="presize")
    # model: what learns
    arch: str = _setting("resnet50", "model", "learner",
                         "architecture (resnet18/34/50/101, xresnet18/34/50, convnext_nano/tiny)")
    pool: str = _setting("avg", "model", "learner", "global pooling: avg or gem")
    grad_checkpoint: bool = _setting(False, "model", "learner", "recompute activations to save memory")
    zero_init_residual: bool = _setting(False, "model", "learner", "ResNets: start each residual block's last "
                                        "BatchNorm at zero (Goyal et al. 2017), so every block starts as identity")
    drop_path: float | None = _setting(None, "model", "learner", "stochastic depth: largest per-block drop "
                                       "probability (none: the architecture's own, 0 for ResNets, 0.1 for ConvNeXt)")
    compile: bool = _setting(False, "model", "learner", "torch.compile the model (a higher GPU ceiling; the first "
                             "batches pay the compile time)")
    # optimisation: how it learns
    epochs: int = _setting(30, "optimisation", "learner", "epochs per fold (also the cosine's t_max)")
    lr: float = _setting(1e-3, "optimisation", "learner", "base learning rate")
    optimizer: str = _setting("adam", "optimisation", "learner", "torch optimizer: adam, adamw or sgd (Nesterov, "
                           "momentum 0.9)", OPTIMIZERS)
    wd: float = _setting(0.0, "optimisation", "learner", "weight decay (L2 for adam, decoupled for adamw)")
    label_smoothing: float = _setting(0.05, "optimisation", "learner", "label smoothing of the cross-entropy")
    eta_min: float = _setting(0.0, "optimisation", "learner", "cosine annealing's final learning rate")
    warmup: int = _setting(0, "optimisation", "learner", "linear warmup epochs before the cosine")
    monitor: str = _setting("valid_loss", "optimisation", "learner", "metric that picks the best epoch", MONITORS)
    precision: str = _setting("auto", "optimisation", "learner",
                              "auto (CUDA: bf16 or fp16; CPU: fp32), bf16 (CPU: where native, else fp32), fp16 "
                              "(CUDA) or fp32", PRECISIONS)
    grad_accum: int = _setting(1, "optimisation", "learner", "batches accumulated per optimizer step")
    # extras: options off in the report's recipe
    mixup: float = _setting(0.0, "extras", "learner", "MixUp Beta alpha (0: off)")
    cutmix: float = _setting(0.0, "extras", "learner", "CutMix Beta alpha (0: off)")
    ema: float | None = _setting(None, "extras", "learner", "EMA decay of the weights (none: off)")
    logit_adjust: float = _setting(0.0, "extras", "learner", "logit-adjusted loss tau (0: off)")
    progressive: float = _setting(0.0, "extras", "kfold", "fraction of epochs trained at half size (0: off)")
    # evaluation: how the folds predict (OOF scores, the ensemble, the submission)
    tta: str = _setting("flip", "evaluation", "kfold", "test-time views: 'flip' (image + mirror), 'multicrop' "
                        "(+ five crops at 1.15 x size), 'none', or another name registered in tta.TTA_VIEWS",
                        TTA_VIEWS)

    @classmethod
    def preset(cls, name: str = "reference") -> "Recipe":
        """The named preset: 'reference' (the report's recipe), 'best' or 'fast' (for a CPU and a time budget)."""
        check_choice("preset", name, PRESET_NAMES)
        return PRESETS[name]

    @classmethod
    def names(cls) -> tuple:
        """Every setting's name, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides) -> "Recipe":
        """A copy with the non-None overrides applied (None: not given, as from the CLI); unknown names are a
        ValueError listing the valid ones."""
        return self.override(**{k: v for k, v in overrides.items() if v is not None})

    def override(self, **settings) -> "Recipe":
        """A copy with `settings` exactly as given (None included: `ema=None` turns EMA off); unknown names are a
        ValueError listing the valid ones."""
        unknown = sorted(set(settings) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid ones: {sorted(self.names())}")
        return dataclasses.replace(self, **settings) if settings else self

    @classmethod
    def consumer(cls, name: str) -> str:
        """The function a setting goes to: 'artist_dls', 'artist_learner' or 'train_kfold'."""
        to = {f.name: f.metadata["to"] for f in dataclasses.fields(cls)}[name]
        return CONSUMERS[to]

    def as_dict(self) -> dict:
        """Every setting, for config.json."""
        return dataclasses.asdict(self)

    def validate(self) -> "Recipe":
        """ValueError naming the first setting that cannot work (before anything is written or trained)."""
        from .models import ARCHITECTURES, POOLS
        check_choice("arch", self.arch, tuple(ARCHITECTURES))
        check_choice("pool", self.pool, POOLS)
        for f in dataclasses.fields(self):
            if f.metadata["choices"] is not None:
                check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        check_side("size", self.size)
        check_number("bs", self.bs, low=1, integer=True)
        check_number("epochs", self.epochs, low=1, integer=True)
        check_number("lr", self.lr, strict=True)
        check_number("grad_accum", self.grad_accum, low=1, integer=True)
        check_number("warmup", self.warmup, integer=True)
        for name in ("wd", "eta_min", "max_rotate", "mixup", "cutmix", "logit_adjust"):
            check_number(name, getattr(self, name))
        for name in ("label_smoothing", "progressive", "colour_jitter"):
            check_fraction(name, getattr(self, name))
        if not (isinstance(self.min_scale, numbers.Real) and 0 < self.min_scale <= 1):
            raise ValueError(f"min_scale={self.min_scale!r}: need a crop area fraction in (0, 1]")
        for f in dataclasses.fields(self):
            if field_type(f.name)[0] is bool and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: need True or False")
        if self.drop_path is not None:
            check_fraction("drop_path", self.drop_path)
        if self.ema is not None:
            check_fraction("ema", self.ema, low_inclusive=False)
        if self.mixup and self.cutmix:
            raise ValueError(f"mixup={self.mixup!r} and cutmix={self.cutmix!r}: use one of them, not both")
        if self.warmup >= self.epochs:
            raise ValueError(f"warmup={self.warmup} must be shorter than epochs={self.epochs}: lower warmup or "
                             "train more epochs")
        self._check_items_pipeline()
        return self

    def _check_items_pipeline(self) -> None:
        """ValueError for a data setting the 'items' pipeline (kept for old runs) does not implement."""
        if self.pipeline != "items":
            return
        for f in dataclasses.fields(self):
            added = f.metadata["to"] == "dls" and f.name not in ITEMS_PIPELINE_SETTINGS
            if added and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} needs pipeline='device' (the 'items' pipeline is "
                                 "kept for runs trained with it and has only the data settings it had then)")


# The data settings the 'items' pipeline implements (it gets no new ones: a data option is written once, for 'device').
ITEMS_PIPELINE_SETTINGS = frozenset({"size", "bs", "min_scale", "max_rotate", "flip", "sampler", "pipeline", "store"})
# The settings every run with a run identity (format 3) records: its identity hashes them as written. A setting added
# since is left out of the identity while it holds its `absent` value, so a library that adds one keeps old runs'
# identities (and their folds resumable) without another edit.
IDENTITY_SETTINGS = frozenset({
    "size", "bs", "min_scale", "max_rotate", "flip", "sampler", "arch", "pool", "grad_checkpoint", "drop_path",
    "compile", "epochs", "lr", "optimizer", "wd", "label_smoothing", "eta_min", "warmup", "monitor", "precision",
    "grad_accum", "mixup", "cutmix", "ema", "logit_adjust", "progressive", "tta"})


def absent_means() -> dict:
    """Every setting -> what its absence from an older run's config.json means (field metadata `absent`)."""
    return {f.name: f.metadata["absent"] for f in dataclasses.fields(Recipe)}


def field_type(name: str):
    """The plain type of a setting (int, float, str or bool), Optional unwrapped, and whether None is allowed."""
    hint = typing.get_type_hints(Recipe)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint), type(None) in typing.get_args(hint)


REFERENCE = Recipe()
# Each change from REFERENCE won on its own and in combination in examples/benchmarks/compare_recipes.py (issue 16;
# tables in docs/results/compare/): a gentler crop scale, five extra test-time crops and half the learning rate.
# Budget-free: no epoch-scaled setting.
BEST = dataclasses.replace(REFERENCE, min_scale=0.35, tta="multicrop", lr=5e-4)
# For a CPU and a time budget (issue 30): best's crop scale and learning rate on a ResNet-18 at 64 px, where a CPU
# minute buys the most epochs, with flip views only: multicrop's 12 views per image and fold cost 6x flip's in the
# ensemble (in docs/results/fast-60min-shared the test set's 3,044 paintings x 12 views x 4 folds took 24 min after
# training), minutes that buy epochs instead. With train_kfold(budget=...) the size and the epochs are planned to fit:
# 16 epochs is the target (at 64 px, 16 epochs scored above the 60-min run's 35, docs/results/compare), the size the
# largest that keeps it (48 px at 15 min: 0.367 against 0.353 at 64 px, docs/results/fast48-15min-quiet). bf16
# autocast where the CPU has it natively (fp32 elsewhere): at 7 min for fold 0, 17 epochs instead of 11-12 and 0.406
# against 0.381 OOF accuracy, 2 seeds (docs/results/cand7).
FAST = dataclasses.replace(BEST, arch="resnet18", size=64, epochs=16, tta="flip", size_by_budget=True,
                           precision="bf16")
PRESETS = {"reference": REFERENCE, "best": BEST, "fast": FAST}
