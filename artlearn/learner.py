"""`artist_learner`: a fastai Learner with the recipe's defaults (from-scratch model, torch Adam, label-smoothed
cross-entropy, per-epoch cosine LR, accuracy and macro-F1) and its optional extras."""
import functools
import logging
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.hook import summary  # noqa: F401  (fastai adds Learner.summary on import)
from fastai.callback.mixup import CutMix, MixHandler, MixUp
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import lr_find  # noqa: F401  (fastai adds Learner.lr_find, fit_one_cycle)
from fastai.callback.training import GradientAccumulation
from fastai.imports import noop as fastai_noop  # what fastai's ProgressCallback compares `learn.logger` with
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy, skm_to_fastai
from fastai.optimizer import OptimWrapper
from fastai.vision.core import PILImage
from fastai.vision.learner import plot_top_losses  # noqa: F401  (fastai registers the image plot_top_losses here)
from fastcore.basics import noop
from fastcore.foundation import L
from fastprogress import fastprogress

from .callbacks import (
    EMA,
    CosineAnnealing,
    CPUAutocast,
    EpochTable,
    FlushDenormals,
    FoldCheckpoint,
    History,
    LabelSmoothing,
    LogitAdjustment,
    NonFiniteGuard,
    NonFiniteLossError,
    Reproducible,
    ReuseHeap,
)
from .checks import check_choice, check_number
from .device import dls_on_cuda, resolve_precision
from .dls import ArtistDataLoaders
from .models import build_model
from .recipe import OPTIMIZERS as OPTIMIZER_NAMES, REFERENCE, Recipe
from .rng import fork_global_rng

logger = logging.getLogger("artlearn")

__all__ = ["artist_learner", "fold_learner", "ArtistLearner", "f1_macro", "torch_optimizer", "fused", "OPTIMIZERS"]

OPTIMIZERS = dict(zip(OPTIMIZER_NAMES, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)))


class ArtistLearner(Learner):
    """A fastai `Learner` whose `fit` also cleans up when an exception (e.g. Ctrl-C) escapes it.

    fastai only runs `after_fit` for a normal end or a `CancelFitException`; here, on any other exception,
    every callback's `release()` is called (restoring the global RNG state, the loss function and
    EMA-swapped weights) and the learner's loss function is put back before the exception propagates.
    """

    def fit(self, n_epoch, lr=None, wd=None, cbs=None, reset_opt=False, start_epoch=0):
        """`Learner.fit`, with clean-up on errors."""
        loss_func, extra = self.loss_func, list(L(cbs))
        try:
            super().fit(n_epoch, lr=lr, wd=wd, cbs=cbs, reset_opt=reset_opt, start_epoch=start_epoch)
        except BaseException as e:
            for cb in [*self.cbs, *extra]:
                getattr(cb, "release", noop)()
            self.loss_func = loss_func
            self._end_cleanup()
            if isinstance(e, NonFiniteLossError):
                e.args = (e.message,)
            raise

    def predict(self, item, rm_type_tfms=None, with_input=False):
        """`Learner.predict` for what fastai's vision learners take: a path, a PIL image, an ndarray or a tensor."""
        if isinstance(item, (str, Path, pd.Series)):
            return super().predict(str(item) if isinstance(item, Path) else item, rm_type_tfms, with_input)
        with tempfile.TemporaryDirectory(prefix="artlearn-predict-") as tmp:
            path = Path(tmp) / "image.png"
            _as_pil(item).save(path)
            return super().predict(str(path), rm_type_tfms, with_input)

    def load(self, file, device=None, **kwargs):
        """`Learner.load`; an artlearn fold checkpoint (best.safetensors) is refused with the loader to use."""
        weights = Path(file).with_suffix(".safetensors")
        fastai_file = Path(self.path) / self.model_dir / f"{file}.pth"
        if not fastai_file.is_file() and weights.is_file():
            raise FileNotFoundError(f"{weights} is an artlearn fold checkpoint (safetensors + meta.json), which "
                                    f"fastai's Learner.load does not read: use al.fold_learner('{weights.parent}') "
                                    f"for a ready Learner, or al.load_fold('{weights.parent}') for the model")
        return super().load(file, device=device, **kwargs)


def _as_pil(item) -> PILImage:
    """A PILImage from a PIL image, an (h, w[, c]) ndarray or a (c, h, w) tensor (uint8, or floats in [0, 1])."""
    try:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu()
            item = (item.permute(1, 2, 0) if item.ndim == 3 and item.shape[0] in (1, 3, 4) else item).numpy()
        if isinstance(item, np.ndarray) and item.dtype != np.uint8:
            item = np.clip(np.round(item * 255 if item.max() <= 1 else item), 0, 255).astype(np.uint8)
        if isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[-1] == 1:
            item = item[..., 0]
        return PILImage.create(item).convert("RGB")
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"predict: cannot read {type(item).__name__} as an image ({e}); pass a path, a PIL "
                         "image, an (h, w, 3) ndarray or a (3, h, w) tensor") from None


def f1_macro():
    """Macro-averaged F1 over the validation set (sklearn `f1_score`, absent classes scored 0), named 'f1_macro'."""
    from sklearn.metrics import f1_score
    return skm_to_fastai(f1_score, average="macro", zero_division=0, name="f1_macro")


def fused(cls):
    """A maker of torch optimizer `cls` with `fused=True` (one kernel per step; torch's CPU default loops over the
    tensors in Python, ~10x slower per ResNet-18 Adam step here), or torch's default where fusing is refused."""
    def make(params, **kwargs):
        params = list(params)
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):  # a device or dtype without fused kernels: same math, unfused
            return cls(params, **kwargs)
    make.__name__ = make.__qualname__ = f"fused_{cls.__name__}"
    return make


def torch_optimizer(name: str = "adam", wd: float = 0.0):
    """fastai `opt_func` wrapping torch's own optimizer, fused where possible: Adam (L2 `weight_decay`, as torch),
    AdamW (decoupled) or SGD with Nesterov momentum 0.9 (L2)."""
    check_choice("optimizer", name, tuple(OPTIMIZERS))
    if name == "sgd":
        return partial(OptimWrapper, opt=fused(torch.optim.SGD), momentum=0.9, nesterov=True, weight_decay=wd)
    return partial(OptimWrapper, opt=fused(OPTIMIZERS[name]), betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)


def _check_mix_cbs(mixup, cutmix, cbs) -> None:
    """ValueError when mixup=/cutmix= and a MixUp/CutMix in `cbs` would both mix the same batches."""
    mixers = [cb for cb in L(cbs)
              if isinstance(cb, MixHandler) or (isinstance(cb, type) and issubclass(cb, MixHandler))]
    if mixers and (mixup or cutmix):
        given = f"mixup={mixup!r}" if mixup else f"cutmix={cutmix!r}"
        name = getattr(mixers[0], "__name__", type(mixers[0]).__name__)
        raise ValueError(f"{given} and cbs=[{name}(...)] would mix every batch twice: pass {given} or the "
                         "callback in cbs=, not both")


def _seeded_model(seed, recipe: Recipe, n_classes: int, **kw):
    """The recipe's from-scratch model; with a seed, initialised under a forked, seeded torch RNG (global state
    untouched)."""
    def build():
        return build_model(recipe.arch, n_classes=n_classes, pool=recipe.pool, drop_path=recipe.drop_path,
                           zero_init_residual=recipe.zero_init_residual, grad_checkpoint=recipe.grad_checkpoint, **kw)
    if seed is None:
        return build()
    with fork_global_rng():
        torch.manual_seed(seed)
        return build()


def learner_recipe(recipe: Recipe | None = None, epochs: int | None = None, **settings) -> tuple[Recipe, dict]:
    """(the validated recipe a learner uses, the keywords left for the model): `recipe` (default `Recipe()`, the
    reference) with the settings given by name exactly as given (None included: `ema=None` turns EMA off)."""
    recipe = recipe if recipe is not None else REFERENCE
    given = {k: v for k, v in settings.items() if k in Recipe.names()}
    others = sorted(k for k in given if Recipe.consumer(k) == "artist_dls")
    if others:
        raise ValueError(f"{others} are data settings: pass them to artist_dls (or give the whole recipe=)")
    recipe = recipe.override(**given, **({} if epochs is None else {"epochs": epochs})).validate()
    return recipe, {k: v for k, v in settings.items() if k not in given}


def _gpu_callbacks(dls, precision, channels_last) -> list:
    """Mixed precision (CUDA) and channels-last callbacks (every device unless channels_last=False: measured
    1.2-1.4x faster on the CPU too, ResNet-18/50 at 64-128 px)."""
    cuda = dls_on_cuda(dls)
    cbs = []
    if channels_last is not False:
        cbs.append(ChannelsLast())
    mode = resolve_precision(precision, cuda)
    if mode != "fp32" and cuda:
        cbs.append(MixedPrecision(amp_mode=mode))
    elif mode == "bf16":
        cbs.append(CPUAutocast())
    elif precision == "bf16" and not cuda:
        _note_fp32_fallback()
    return cbs


@functools.cache
def _note_fp32_fallback() -> None:
    """Say once per process that precision='bf16' trains in fp32 on this CPU."""
    logger.info("precision='bf16': this CPU has no native bf16 (AVX-512 BF16 or AMX, as oneDNN reports), so training "
                "runs in fp32, the faster choice here")


def _fold_of(dls, fold):
    """The fold number: as given, else the one `artist_dls` recorded."""
    meta = dls.data_meta if isinstance(dls, ArtistDataLoaders) else None
    fold = fold if fold is not None else getattr(meta, "fold", None)
    if fold is None:
        raise ValueError("out= was given without fold=, and the DataLoaders do not say which fold they hold")
    return fold


def artist_learner(dls, arch: str | None = None, pool: str | None = None, *, recipe: Recipe | None = None,
                   epochs: int | None = None, seed=None, out=None, fold=None, progress=True, channels_last=None,
                   cbs=None, model=None, **settings) -> ArtistLearner:
    """A fastai Learner for `dls`: the recipe's from-scratch model (`build_model`), torch Adam, label-smoothed CE,
    per-epoch cosine LR, metrics accuracy and f1_macro, a `History`, and the recipe's optional extras.

    The settings come from `recipe` (default `Recipe()`, the reference recipe), whole; `arch`, `pool` and any other
    model / optimisation / extras setting given by name (`lr=5e-4`, `ema=0.999`, ...) override it (each one's
    meaning and check: `Recipe`). `epochs` is the cosine's `t_max`: given, or the recipe's when `recipe=` is
    given, else the length of each `fit`. `out`+`fold` add a `FoldCheckpoint`; `seed` seeds the model's
    initialisation and each fit (`Reproducible`) without reseeding the process; `progress=False` trains silently;
    `channels_last=False` keeps the default memory format; `model` replaces the recipe's model. Other keywords go
    to the model (e.g. `gem_p`, `drop_rate`).
    """
    t_max = epochs if epochs is not None or recipe is None else recipe.epochs
    settings = {**({} if arch is None else {"arch": arch}), **({} if pool is None else {"pool": pool}), **settings}
    recipe, model_kw = learner_recipe(recipe, epochs, **settings)
    if seed is not None:
        check_number("seed", seed, integer=True)
    _check_mix_cbs(recipe.mixup, recipe.cutmix, cbs)
    if getattr(dls.train, "bs", 2) < 2:
        raise ValueError(f"bs={dls.train.bs}: BatchNorm needs at least 2 images per training batch; use bs >= 2")
    if model is None:
        model = _seeded_model(seed, recipe, len(dls.vocab), **model_kw)
    if recipe.compile:
        model.compile()  # in place, unlike torch.compile(model): state_dict keys keep no '_orig_mod.' prefix
    r = recipe
    callbacks = [LabelSmoothing(r.label_smoothing), CosineAnnealing(t_max, r.eta_min, r.warmup), History(),
                 NonFiniteGuard(fold), FlushDenormals(), ReuseHeap()]
    if out is not None:
        callbacks.append(FoldCheckpoint(out, _fold_of(dls, fold), r.monitor))
    if seed is not None:
        callbacks.append(Reproducible(seed))
    if r.logit_adjust:
        callbacks.append(LogitAdjustment(r.logit_adjust))
    callbacks += _gpu_callbacks(dls, r.precision, channels_last)
    if r.grad_accum > 1:
        callbacks.append(GradientAccumulation(r.grad_accum * dls.train.bs))
    if r.mixup:
        callbacks.append(MixUp(r.mixup))
    if r.cutmix:
        callbacks.append(CutMix(r.cutmix))
    if r.ema is not None:
        callbacks.append(EMA(r.ema))
    learn = ArtistLearner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=torch_optimizer(r.optimizer, r.wd),
                          lr=r.lr, wd=r.wd, metrics=[accuracy, f1_macro()], cbs=callbacks + list(L(cbs)))
    learn.logger = fastai_noop  # fastai's printed table (smoothed train_loss, 'accuracy') gives way to EpochTable
    if not (progress and show_bars()):
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
    if progress:
        learn.add_cb(EpochTable())
    return learn


def show_bars() -> bool:
    """Whether progress bars can be drawn: a terminal or a notebook, unless fastprogress' `NO_BAR` is set (a log
    file would get a chain of carriage returns per epoch)."""
    if fastprogress.NO_BAR:
        return False
    return fastprogress.IN_NOTEBOOK or bool(getattr(sys.stdout, "isatty", lambda: False)())


def _fold_validation_rows(fold_dir, meta):
    """The fold's own validation rows from the run's folds.csv (None when the fold is not inside a run)."""
    from .run import FOLDS_NAME, read_folds
    folds_csv = Path(fold_dir).parent / FOLDS_NAME
    if not folds_csv.is_file():
        return None
    table = read_folds(folds_csv)
    return table[table["fold"] == int(meta.fold)]


def fold_learner(fold_dir, items=None, bs: int = 64, device=None, progress: bool = False) -> ArtistLearner:
    """A ready fastai Learner of one trained fold, rebuilt from `best.safetensors` + `meta.json` (no pickle).

    For `predict`, `get_preds`, `validate`, `ClassificationInterpretation`: `items` (img_path[, artist]) become its
    validation set; by default the fold's own validation rows from the run's folds.csv. The loss is the run's
    label-smoothed cross-entropy (from the run's config.json when there, else the reference recipe's).
    """
    from .checkpoint import load_fold
    from .dls import eval_dls
    from .files import read_json
    if items is not None and hasattr(items, "columns") and "artist" not in items.columns:
        raise ValueError(f"items has no 'artist' column (columns are {list(items.columns)}): the learner's validate() "
                         "and metrics need each row's true artist (without it every row would be scored against the "
                         "first artist); pass a labelled table, or use artlearn.predict/ensemble for new paintings")
    model, meta = load_fold(fold_dir, device="cpu")
    items = _fold_validation_rows(fold_dir, meta) if items is None else items
    if items is None or len(items) == 0:
        raise ValueError(f"{fold_dir}: not inside a run directory with folds.csv; pass items= (a table with "
                         "img_path[, artist]) to give the learner its data")
    config_path = Path(fold_dir).parent / "config.json"
    smoothing = read_json(config_path).get("label_smoothing", REFERENCE.label_smoothing) if config_path.is_file() \
        else REFERENCE.label_smoothing
    dls = eval_dls(meta, items, bs=bs, device=device)
    return artist_learner(dls, model=model, arch=meta.arch, pool=meta.pool or "avg",
                          label_smoothing=smoothing, monitor=meta.monitor or REFERENCE.monitor,
                          progress=progress)
