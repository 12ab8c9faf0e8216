"""fastai callbacks for the recipe: label-smoothed loss, per-epoch cosine LR, epoch history, fold checkpoints,
a non-finite-loss guard, reproducible seeding, weight EMA and logit adjustment.

fastai calls `before_fit`/`after_fit` (and `before_epoch`/`after_epoch`) not only around `Learner.fit` but
also around `Learner.validate`, `get_preds`, `tta` and inside `lr_find`. The stateful callbacks here ignore
`validate`/`get_preds` (which hold the learner's lock, also when called from inside a fit) and `lr_find`, and
only reset their state once a fit actually trains (`before_train`), so validating never rewrites a history or
a checkpoint, restarts an EMA or reseeds the process.
"""
import math
import numbers
import random
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import TrackerCallback
from fastai.learner import Recorder
from fastai.losses import CrossEntropyLossFlat

from .checkpoint import (
    HISTORY_NAME,
    META_NAME,
    WEIGHTS_NAME,
    atomic_write_csv,
    atomic_write_json,
    load_fold,
    load_weights,
    save_weights,
)
from .rng import fork_global_rng

__all__ = ["LabelSmoothing", "CosineAnnealing", "cosine_lr", "History", "HISTORY_COLUMNS", "FoldCheckpoint",
           "MONITORS", "NonFiniteGuard", "NonFiniteLossError", "Reproducible", "EMA", "LogitAdjustment",
           "data_meta", "load_fold"]

HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "train_acc", "valid_acc", "f1_macro", "lr", "seconds")
# monitor name -> the Recorder names it may have (plain metrics, or `valid_*` with Recorder(train_metrics=True))
MONITORS = {"valid_loss": ("valid_loss",), "valid_acc": ("accuracy", "valid_accuracy"),
            "f1_macro": ("f1_macro", "valid_f1_macro")}


def _check_fraction(name: str, value, low_inclusive: bool = True) -> float:
    """`value` as a float in [0, 1) (or (0, 1)), else ValueError naming it."""
    ok = isinstance(value, numbers.Real) and (value >= 0 if low_inclusive else value > 0) and value < 1
    if not ok:
        bounds = "[0, 1)" if low_inclusive else "(0, 1)"
        raise ValueError(f"{name}={value!r}: need a number in {bounds}")
    return float(value)


def _training_fit(learn) -> bool:
    """False inside `validate`/`get_preds` (they hold `learn.lock`) and `lr_find`: events that are not training."""
    lock = getattr(learn, "lock", None)
    return not hasattr(learn, "lr_finder") and not (lock is not None and lock.locked())


class LabelSmoothing(Callback):
    """The loss is `F.cross_entropy(logits, y, label_smoothing=eps)`, in training AND validation.

    While a fit (or `validate`/`get_preds`) runs, the learner's `loss_func` is a `CrossEntropyLossFlat(
    label_smoothing=eps)`; the original is put back at `after_fit`. So `valid_loss` is the same smoothed
    cross-entropy as `train_loss` and the two curves are comparable, as with the reference's
    `nn.CrossEntropyLoss(label_smoothing=0.05)` criterion. Its minimum is not 0 but the entropy of the smoothed
    target. Composes with fastai's MixUp/CutMix (they mix this loss) and with `LogitAdjustment`.
    """
    order = -5

    def __init__(self, eps: float = 0.05):
        self.eps = _check_fraction("label_smoothing", eps)
        self.smoothed_loss = CrossEntropyLossFlat(label_smoothing=self.eps)
        self._saved, self._owner, self._depth = None, None, 0

    def before_fit(self):
        """Install the smoothed loss (once, also when fastai nests a validate inside a fit)."""
        if self.learn.loss_func is not self.smoothed_loss:
            self._saved, self._owner, self._depth = self.learn.loss_func, self.learn, 0
            self.learn.loss_func = self.smoothed_loss
        self._depth += 1

    def after_fit(self):
        """Put the learner's own loss back when the outermost fit ends."""
        self._depth -= 1
        if self._depth <= 0:
            self.release()

    def release(self):
        """Undo the loss swap (idempotent; also called by `ArtistLearner.fit` when an error escapes)."""
        if self._owner is not None and self._owner.loss_func is self.smoothed_loss:
            self._owner.loss_func = self._saved
        self._saved, self._owner, self._depth = None, None, 0


def cosine_lr(epoch: int, base_lr: float, t_max: int, eta_min: float = 0.0) -> float:
    """LR of `torch.optim.lr_scheduler.CosineAnnealingLR(T_max=t_max, eta_min)` after `epoch` `.step()` calls.

    Uses torch's own (chainable) recurrence, so the values are bit-identical to the scheduler's, including
    past `t_max`, where torch's cosine climbs back towards `base_lr` (period `2 * t_max`).
    """
    lr = base_lr
    for e in range(1, epoch + 1):
        if (e - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + (base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            ratio = (1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max))
            lr = ratio * (lr - eta_min) + eta_min
    return lr


class CosineAnnealing(Callback):
    """Per-epoch LR exactly as `CosineAnnealingLR(T_max=t_max, eta_min)` stepped once per epoch.

    The base LR is the one the fit starts with (`learn.fit(n, lr)` or the learner's `lr`), per parameter group;
    `t_max` defaults to the fit's number of epochs. Epoch `e` (0-based) trains with `cosine_lr(e, base, t_max,
    eta_min)`; the LR is set at `before_epoch` and constant within the epoch.

    With `warmup=w > 0`: epochs `e < w` use `base * (e + 1) / (w + 1)` (linear), then epoch `e >= w` uses
    `cosine_lr(e - w, base, t_max - w, eta_min)`, i.e. torch's `SequentialLR([LinearLR(start_factor=1/(w+1),
    total_iters=w), CosineAnnealingLR(T_max=t_max-w, eta_min)], milestones=[w])`: `t_max` still counts from
    epoch 0, so with the default `t_max` the cosine ends with the fit.
    """

    def __init__(self, t_max: int | None = None, eta_min: float = 0.0, warmup: int = 0):
        if t_max is not None and (not isinstance(t_max, numbers.Integral) or t_max < 1):
            raise ValueError(f"t_max={t_max!r}: need a positive number of epochs (or None for the fit's length)")
        if not isinstance(warmup, numbers.Integral) or warmup < 0:
            raise ValueError(f"warmup={warmup!r}: need a number of epochs >= 0")
        if not isinstance(eta_min, numbers.Real) or eta_min < 0:
            raise ValueError(f"eta_min={eta_min!r}: need a learning rate >= 0")
        self.t_max, self.eta_min, self.warmup = t_max, float(eta_min), int(warmup)
        self.base_lrs, self.t_total = None, None

    def before_fit(self):
        """Read the base LR of each parameter group and the schedule length."""
        if not _training_fit(self.learn):
            return
        self.base_lrs = None if self.opt is None else [h["lr"] for h in self.opt.hypers]
        self.t_total = int(self.t_max or self.n_epoch)
        if self.base_lrs is not None and self.t_total <= self.warmup:
            raise ValueError(f"t_max={self.t_total} must exceed warmup={self.warmup} epochs")

    def lr_at(self, epoch: int, base_lr: float) -> float:
        """The LR of 0-based `epoch` for a group whose base LR is `base_lr`."""
        w = self.warmup
        if epoch < w:
            return base_lr * (epoch + 1) / (w + 1)
        return cosine_lr(epoch - w, base_lr, self.t_total - w, self.eta_min)

    def before_epoch(self):
        """Set this epoch's LR on every parameter group."""
        if self.base_lrs is not None and _training_fit(self.learn):
            self.opt.set_hyper("lr", [self.lr_at(self.epoch, b) for b in self.base_lrs])


class History(Callback):
    """One row per epoch: `epoch, train_loss, valid_loss, train_acc, valid_acc, f1_macro, lr, seconds`.

    `train_loss` is the plain mean of the epoch's training-batch losses (not fastai's exponentially smoothed
    `train_loss` in the Recorder), `train_acc` the accuracy on the training batches as they were trained
    (augmented, in train mode, on the raw logits), `lr` the LR the epoch trained with (last parameter group),
    `seconds` the wall time of training plus validation. Validation columns come from the Recorder
    (`valid_loss`, `accuracy`, `f1_macro`). `learn.history.frame()` is the table as a DataFrame.
    """
    order, run_valid = Recorder.order + 1, False

    def __init__(self):
        self.rows, self._new_fit, self._trained = [], False, False

    def before_fit(self):
        """Mark a possible new fit (rows are reset once it actually trains)."""
        if _training_fit(self.learn):
            self._new_fit = True

    def before_epoch(self):
        """Start the epoch's clock and counters."""
        if not _training_fit(self.learn):
            return
        self._t0, self._trained = time.perf_counter(), False
        self._loss_sum, self._n_batches, self._correct, self._seen = 0.0, 0, 0, 0

    def before_train(self):
        """Reset the table at the first epoch of a fit; note the epoch's LR."""
        if not _training_fit(self.learn):
            return
        if self._new_fit:
            self.rows, self._new_fit = [], False
        self._trained = True
        self._lr = float(self.opt.hypers[-1]["lr"])

    def after_pred(self):
        """Count correct training predictions (before any logit adjustment)."""
        if not self._trained:
            return
        y = self.learn.yb[0] if len(self.learn.yb) else None
        if y is None or y.is_floating_point() or self.learn.pred.ndim != 2:
            return
        self._correct = self._correct + (self.learn.pred.detach().argmax(-1) == y).sum()
        self._seen += y.shape[0]

    def after_batch(self):
        """Add the batch's mean loss."""
        if not self._trained:
            return
        self._loss_sum = self._loss_sum + self.learn.loss.detach().float().mean()
        self._n_batches += 1

    def after_epoch(self):
        """Append the epoch's row (training epochs only, not `learn.validate()`)."""
        if not self._trained or not _training_fit(self.learn):
            return
        self._trained = False
        rec = dict(zip(self.recorder.metric_names[1:], self.recorder.values[-1]))

        def pick(*names):
            return next((float(rec[n]) for n in names if rec.get(n) is not None), math.nan)
        self.rows.append(dict(
            epoch=int(self.epoch),
            train_loss=float(self._loss_sum) / self._n_batches if self._n_batches else math.nan,
            valid_loss=pick("valid_loss"), train_acc=float(self._correct) / self._seen if self._seen else math.nan,
            valid_acc=pick(*MONITORS["valid_acc"]), f1_macro=pick(*MONITORS["f1_macro"]),
            lr=self._lr, seconds=time.perf_counter() - self._t0))

    def frame(self) -> pd.DataFrame:
        """The history as a DataFrame with exactly `HISTORY_COLUMNS`."""
        return pd.DataFrame(self.rows, columns=list(HISTORY_COLUMNS))


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; `.message` says where and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NonFiniteGuard(Callback):
    """Stops the fit when a training loss is NaN/inf, before that batch's update (so no weights are poisoned).

    Raises `CancelFitException` so that every callback still gets `after_fit` (the fold checkpoint keeps its
    best epoch and records `stopped`), then raises `NonFiniteLossError` naming fold, epoch and batch from its
    own `after_fit`, which runs last.
    """
    order, run_valid = 100, False

    def __init__(self, fold: int | None = None):
        self.fold_id, self.reason, self._message = fold, None, None

    def before_fit(self):
        """Forget a previous stop (inactive in `lr_find`, which diverges on purpose, and in `validate`)."""
        if _training_fit(self.learn):
            self.reason, self._message = None, None

    def _fold_label(self) -> str:
        """'fold k: ' when the fold is known."""
        fold = self.fold_id if self.fold_id is not None else getattr(self.dls, "artlearn_meta", {}).get("fold")
        return "" if fold is None else f"fold {fold}: "

    def after_loss(self):
        """Cancel the fit on a non-finite training loss."""
        if hasattr(self.learn, "lr_finder"):
            return
        loss = self.learn.loss.detach()
        if bool(torch.isfinite(loss).all()):
            return
        lr = float(self.opt.hypers[-1]["lr"])
        self.reason = f"non-finite loss at epoch {self.epoch}"
        self._message = (
            f"{self._fold_label()}the training loss became {float(loss.float().mean()):g} at epoch {self.epoch}, "
            f"batch {self.iter} (lr={lr:.3g}); training stopped before that update, so no non-finite weights "
            f"were saved and the best checkpoint so far is kept. Lower the learning rate (e.g. lr={lr / 10:.3g}), "
            "add warmup epochs, or train in fp32")
        raise CancelFitException()

    def after_fit(self):
        """Raise the error once every other callback has finished the fit."""
        if self._message is not None:
            message, self._message = self._message, None
            raise NonFiniteLossError(message)


def _find_normalize(dls):
    """The first `Normalize` batch transform of the training loader, or None."""
    from fastai.data.transforms import Normalize
    pipeline = getattr(getattr(dls, "train", dls), "after_batch", None)
    return next((t for t in getattr(pipeline, "fs", []) if isinstance(t, Normalize)), None)


def _stat_list(x):
    """Per-channel statistics as a list of floats."""
    return [float(v) for v in torch.as_tensor(x).detach().cpu().flatten()]


def _find_size(dls):
    """The image size from the training item transforms (an int when square), or None."""
    pipeline = getattr(getattr(dls, "train", dls), "after_item", None)
    for t in getattr(pipeline, "fs", []):
        size = getattr(t, "size", None)
        if size is None:
            continue
        size = [int(s) for s in size] if isinstance(size, (tuple, list)) else int(size)
        return size[0] if isinstance(size, list) and len(set(size)) == 1 else size
    return None


def data_meta(dls) -> dict:
    """What a checkpoint needs to know about the data: vocab, size, mean, std (0-1 scale), fold, ...

    From `dls.artlearn_meta` (set by `artist_dls`); otherwise from `dls.vocab`, the `Normalize` batch transform
    and the item transforms' size.
    """
    meta = dict(getattr(dls, "artlearn_meta", None) or {})
    if "vocab" not in meta:
        meta["vocab"] = list(dls.vocab)
    meta["vocab"] = [str(v) for v in meta["vocab"]]
    if meta.get("mean") is None or meta.get("std") is None:
        norm = _find_normalize(dls)
        meta["mean"], meta["std"] = (None, None) if norm is None else (_stat_list(norm.mean), _stat_list(norm.std))
    if meta.get("size") is None:
        meta["size"] = _find_size(dls)
    return meta


def _all_finite(state: dict) -> bool:
    """True when every floating tensor of a state dict is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class FoldCheckpoint(TrackerCallback):
    """Keeps one fold's best epoch on disk, in `out/fold{k}/`, and its history.

    After every training epoch `history.csv` (see `History`) is rewritten atomically. When the monitored value
    improves (`monitor` in 'valid_loss' (lower is better), 'valid_acc', 'f1_macro' (higher is better)),
    `best.safetensors` is written atomically, then `meta.json` with `complete: false`. At `after_fit` the best
    weights are loaded back into the model and meta.json is rewritten with `complete: true` and `epochs_run`.
    An interrupted fit (Ctrl-C, an exception) leaves the best epoch's files valid and `complete: false`; a fit
    stopped by `NonFiniteGuard` also records `stopped: 'non-finite loss at epoch N'`. With `EMA` on, the EMA
    weights are the ones saved. Starting a new training fit removes the folder's previous files first.

    meta.json: `model` (the model config, for `build_model(**meta['model'])`), arch, depth, pool, n_classes,
    vocab, size, mean, std, fold, epoch, monitor, score, complete, artlearn_version, the data's n_folds and
    split_seed when known, ema (decay or None), then the entries of `meta=` (which cannot override these).
    """
    order = TrackerCallback.order + 1

    def __init__(self, out, fold: int, monitor: str = "valid_loss", meta: dict | None = None, min_delta: float = 0.0):
        if monitor not in MONITORS:
            raise ValueError(f"monitor={monitor!r} is not supported; choose one of {list(MONITORS)}")
        if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or fold < 0:
            raise ValueError(f"fold={fold!r}: need a fold number >= 0")
        super().__init__(monitor=monitor, comp=np.less if "loss" in monitor else np.greater, min_delta=min_delta)
        self.monitor_name, self.fold_index = monitor, int(fold)
        self.fold_dir = Path(out) / f"fold{int(fold)}"
        self.extra_meta = dict(meta or {})
        self.best_epoch, self.stop_reason, self._pending, self._fitting = None, None, False, False

    @property
    def weights_path(self) -> Path:
        """`fold_dir/best.safetensors`."""
        return self.fold_dir / WEIGHTS_NAME

    @property
    def meta_path(self) -> Path:
        """`fold_dir/meta.json`."""
        return self.fold_dir / META_NAME

    @property
    def history_path(self) -> Path:
        """`fold_dir/history.csv`."""
        return self.fold_dir / HISTORY_NAME

    def before_fit(self):
        """Resolve the monitor's Recorder name; make sure a `History` runs; arm a reset for the training."""
        if not _training_fit(self.learn):
            return
        names = list(self.recorder.metric_names[1:])
        found = [n for n in MONITORS[self.monitor_name] if n in names]
        if not found:
            raise ValueError(f"FoldCheckpoint monitor {self.monitor_name!r}: the Recorder has no "
                             f"{' or '.join(MONITORS[self.monitor_name])} (it records {names}); add the metric")
        self.monitor, self.idx = found[0], names.index(found[0])
        config = getattr(self.model, "config", None)
        if config is None:
            raise ValueError("FoldCheckpoint needs a model with a `config` (build it with artlearn's build_model)")
        n_vocab = len(data_meta(self.dls)["vocab"])
        if config["n_classes"] != n_vocab:
            raise ValueError(f"the model has {config['n_classes']} outputs but the data has {n_vocab} artists")
        if not hasattr(self.learn, "history"):
            self.learn.add_cb(History())
            self.learn.history.before_fit()
        self._pending, self._fitting = True, False

    def before_train(self):
        """At the first training epoch of a fit: reset the best score and clear the folder's old files."""
        if not _training_fit(self.learn):
            return
        self._fitting = True
        if not self._pending:
            return
        self._pending = False
        self.best = math.inf if self.comp == np.less else -math.inf
        self.best_epoch, self.stop_reason = None, None
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.meta_path, self.weights_path, self.history_path):
            path.unlink(missing_ok=True)

    def after_epoch(self):
        """Rewrite history.csv; save weights and meta on a new best."""
        if not self._fitting or not _training_fit(self.learn):
            return
        atomic_write_csv(self.history_path, self.learn.history.frame())
        if len(self.recorder.values[-1]) <= self.idx:
            return
        super().after_epoch()
        if self.new_best:
            self._save()

    def _weights(self) -> dict:
        """The state to checkpoint: the EMA weights when an EMA is on, else the model's."""
        ema = getattr(self.learn, "ema", None)
        shadow = getattr(ema, "shadow", None)
        return shadow if shadow is not None else self.model.state_dict()

    def _save(self):
        """Write best.safetensors, then meta.json (incomplete)."""
        state = self._weights()
        if not _all_finite(state):
            warnings.warn(f"fold {self.fold_index}, epoch {self.epoch}: the weights hold NaN/inf; not saved",
                          stacklevel=2)
            return
        save_weights(self.weights_path, state)
        self.best_epoch = int(self.epoch)
        atomic_write_json(self.meta_path, self._meta(complete=False))

    def _meta(self, complete: bool, **extra) -> dict:
        """The meta.json content."""
        from . import __version__
        config = self.model.config
        data = data_meta(self.dls)
        ema = getattr(self.learn, "ema", None)
        meta = dict(self.extra_meta)
        meta.update(model=config, arch=config["arch"], depth=config.get("depth"), pool=config.get("pool"),
                    n_classes=config["n_classes"], vocab=data["vocab"], size=data.get("size"),
                    mean=data.get("mean"), std=data.get("std"), fold=self.fold_index, epoch=self.best_epoch,
                    monitor=self.monitor_name, score=None if self.best_epoch is None else float(self.best),
                    complete=bool(complete), artlearn_version=__version__, n_folds=data.get("n_folds"),
                    split_seed=data.get("seed"), class_counts=data.get("class_counts"),
                    ema=getattr(ema, "decay", None), **extra)
        if self.stop_reason:
            meta["stopped"] = self.stop_reason
        return meta

    def after_fit(self):
        """Load the best weights back; mark the checkpoint complete (unless the fit was stopped)."""
        super().after_fit()
        if not self._fitting or not _training_fit(self.learn):
            return
        self._fitting = False
        guard = getattr(self.learn, "non_finite_guard", None)
        self.stop_reason = getattr(guard, "reason", None)
        epochs_run = len(self.learn.history.rows)
        if self.best_epoch is None:
            self.stop_reason = self.stop_reason or f"no epoch with a finite {self.monitor_name}"
            atomic_write_json(self.meta_path, self._meta(complete=False, epochs_run=epochs_run))
            return
        self.model.load_state_dict(load_weights(self.weights_path))
        atomic_write_json(self.meta_path, self._meta(complete=self.stop_reason is None, epochs_run=epochs_run))


class Reproducible(Callback):
    """Seeds a fit without leaving the process reseeded.

    At `before_fit`: saves Python's `random` and numpy's global states, forks torch's RNG
    (`torch.random.fork_rng`, CPU and every CUDA device), seeds all three with `seed`, and gives the training
    loader its own `random.Random(seed)` (fastai's shuffling RNG). At `after_fit` (which fastai also reaches
    after a cancelled fit) everything is restored; `ArtistLearner.fit` also restores it when an exception
    escapes the fit. Bit-identical runs on CPU; on GPU, cuDNN kernels may still differ slightly.
    """
    order = -20

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed={seed!r}: need an integer >= 0")
        self.seed, self._saved = int(seed), None

    def before_fit(self):
        """Save the global RNG states and seed them (not for `validate`/`get_preds`/`lr_find`)."""
        if not _training_fit(self.learn):
            return
        self.release()
        fork = fork_global_rng()
        fork.__enter__()
        train_dl = getattr(self.dls, "train", None)
        self._saved = (random.getstate(), np.random.get_state(), fork, train_dl, getattr(train_dl, "rng", None))
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)
        if train_dl is not None and hasattr(train_dl, "rng"):
            train_dl.rng = random.Random(self.seed)

    def after_fit(self):
        """Restore the global RNG states."""
        if _training_fit(self.learn):
            self.release()

    def release(self):
        """Restore the saved states (idempotent)."""
        if self._saved is None:
            return
        py_state, np_state, fork, train_dl, rng = self._saved
        self._saved = None
        fork.__exit__(None, None, None)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if rng is not None:
            train_dl.rng = rng


class ProgressiveResize(Callback):
    """Progressive resizing: the first `epochs` epochs of each fit train on `small_train` (e.g. half the size).

    Only the training loader is swapped (validation, checkpoint metadata and the cosine schedule keep the full
    size); the original training loader is put back for the remaining epochs and after the fit.
    """
    order = 0

    def __init__(self, small_train, epochs: int):
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
            raise ValueError(f"ProgressiveResize epochs={epochs!r}: need a whole number of epochs >= 0")
        self.small_train, self.epochs, self.full_train = small_train, int(epochs), None

    def before_fit(self):
        self.full_train = self.dls.loaders[0]

    def before_epoch(self):
        self.dls.loaders[0] = self.small_train if self.epoch < self.epochs else self.full_train

    def after_fit(self):
        if self.full_train is not None:
            self.dls.loaders[0] = self.full_train

    release = after_fit


class EMA(Callback):
    """Exponential moving average of the weights (and BatchNorm statistics), used for validation.

    After every optimizer step: `shadow = d * shadow + (1 - d) * weights` with `d = min(decay, (1 + n) / (10 + n))`
    after `n` updates (`warmup=True`, so early epochs are not dominated by the initial weights) or `d = decay`.
    Validation runs on the shadow weights, then the training weights are put back; `FoldCheckpoint` saves the
    shadow. At the end of the fit the model holds the shadow weights (or, with a FoldCheckpoint, the best
    epoch's shadow weights).
    """
    order = 20

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = _check_fraction("ema decay", decay, low_inclusive=False), bool(warmup)
        self.shadow, self.n_updates, self._pending, self._backup = None, 0, False, None

    def before_fit(self):
        """Arm a fresh average for a new training fit."""
        if _training_fit(self.learn):
            self._pending = True

    def before_train(self):
        """Start the average from the current weights at the first epoch of a fit."""
        if self._pending and _training_fit(self.learn):
            self.shadow = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.n_updates, self._pending = 0, False

    def after_step(self):
        """Update the average."""
        if self.shadow is None or self._pending or hasattr(self.learn, "lr_finder"):
            return
        n, self.n_updates = self.n_updates, self.n_updates + 1
        d = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        state = self.model.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        with torch.no_grad():
            torch._foreach_lerp_([self.shadow[k] for k in floats], [state[k].detach() for k in floats], 1.0 - d)
            for k, v in self.shadow.items():
                if not v.is_floating_point():
                    v.copy_(state[k])

    def before_validate(self):
        """Swap the averaged weights in (during a training fit)."""
        if self.shadow is None or self._pending or self._backup is not None or not _training_fit(self.learn):
            return
        self._backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._model = self.model
        self.model.load_state_dict(self.shadow)

    def after_validate(self):
        """Put the training weights back."""
        self.release()

    def after_fit(self):
        """Leave the averaged weights in the model."""
        if not _training_fit(self.learn):
            return
        self.release()
        if self.shadow is not None and not self._pending:
            self.model.load_state_dict(self.shadow)
            self._pending = True

    def release(self):
        """Restore the training weights if the averaged ones are swapped in (idempotent)."""
        if self._backup is not None:
            self._model.load_state_dict(self._backup)
            self._backup = None


def train_label_counts(dls, n_classes: int) -> np.ndarray:
    """Per-class counts of the training split's labels (read from the label pipeline, no images decoded)."""
    ds = dls.train_ds
    tls = getattr(ds, "tls", None)
    labels = [int(y) for y in tls[-1]] if tls is not None else [int(item[-1]) for item in ds]
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]


class LogitAdjustment(Callback):
    """Logit-adjusted training loss (Menon et al. 2021): the training loss sees `logits + tau * log(prior)`.

    Priors are the training labels' frequencies (a class without training rows counts as one row), or
    `priors=` given. Validation, metrics and predictions use the raw logits, so rare artists are no longer
    under-predicted. `tau=1` is the paper's default; 0 turns it off.
    """
    order, run_valid = History.order + 1, False

    def __init__(self, tau: float = 1.0, priors=None):
        if not isinstance(tau, numbers.Real) or tau < 0:
            raise ValueError(f"logit_adjust={tau!r}: need tau >= 0")
        self.tau, self.priors, self._adjust = float(tau), priors, None

    def before_fit(self):
        """Compute `tau * log(prior)` on the model's device."""
        n = len(self.dls.vocab)
        counts = np.asarray(self.priors if self.priors is not None else train_label_counts(self.dls, n), np.float64)
        counts = np.maximum(counts, 1.0 if self.priors is None else 1e-12)
        device = next(self.model.parameters()).device
        self._adjust = torch.as_tensor(self.tau * np.log(counts / counts.sum()), dtype=torch.float32, device=device)

    def after_pred(self):
        """Shift the training logits (after `History` counted accuracy on the raw ones)."""
        self.learn.pred = self.learn.pred + self._adjust
