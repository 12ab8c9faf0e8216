"""fastai callbacks for the recipe: label-smoothed loss, per-epoch cosine LR, epoch history, fold checkpoints,
a non-finite-loss guard, reproducible seeding, weight EMA, logit adjustment and the CPU's number and memory
settings.

fastai calls `before_fit`/`after_fit` (and `before_epoch`/`after_epoch`) not only around `Learner.fit` but
also around `Learner.validate`, `get_preds`, `tta` and inside `lr_find`. The stateful callbacks here ignore
`validate`/`get_preds` (which hold the learner's lock, also when called from inside a fit) and `lr_find`, and
only reset their state once a fit actually trains (`before_train`), so validating never rewrites a history or
a checkpoint, restarts an EMA or reseeds the process.
"""
import dataclasses
import logging
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
from fastai.callback.schedule import ParamScheduler
from fastai.callback.tracker import TrackerCallback
from fastai.learner import Recorder
from fastai.losses import CrossEntropyLossFlat

from .checkpoint import (HISTORY_NAME, META_NAME, WEIGHTS_NAME, DataMeta, FoldMeta, fold_identity, load_weights,
                         save_weights_digest)
from .checks import check_choice, check_fraction, check_number
from .device import dls_on_cuda, reuse_heap
from .dls import ArtistDataLoaders
from .files import atomic_write_csv, atomic_write_json
from .recipe import MONITORS as MONITOR_NAMES
from .rng import fork_global_rng
from .run import HISTORY_COLUMNS

logger = logging.getLogger("artlearn")

__all__ = ["LabelSmoothing", "CosineAnnealing", "cosine_lr", "History", "HISTORY_COLUMNS", "FoldCheckpoint",
           "MONITORS", "NonFiniteGuard", "NonFiniteLossError", "Reproducible", "EMA", "LogitAdjustment",
           "ProgressiveResize", "TrainingOnly", "FlushDenormals", "ReuseHeap", "data_meta", "is_training_fit",
           "EpochTable"]

# monitor name -> the Recorder names it may have (plain metrics, or `valid_*` with Recorder(train_metrics=True))
MONITORS = {"valid_loss": ("valid_loss",), "valid_acc": ("accuracy", "valid_accuracy"),
            "f1_macro": ("f1_macro", "valid_f1_macro")}
assert tuple(MONITORS) == MONITOR_NAMES  # the recipe owns the names, this module their Recorder spellings


def is_training_fit(learn) -> bool:
    """False inside `validate`/`get_preds` (they hold `learn.lock`) and `lr_find`: events that are not training."""
    lock = getattr(learn, "lock", None)
    return not hasattr(learn, "lr_finder") and not (lock is not None and lock.locked())


class TrainingOnly(Callback):
    """A callback that switches itself off outside a training fit, the way fastai's trackers do (`self.run`).

    `before_fit` sets `self.run = is_training_fit(learn)` (fastai resets `run` after every fit), then calls
    `before_training_fit`; so `validate`, `get_preds` and `lr_find` never reach the other events.
    """

    def before_fit(self):
        """Run only in a training fit."""
        self.run = is_training_fit(self.learn)
        if self.run:
            self.before_training_fit()

    def before_training_fit(self):
        """What the callback does at the start of a training fit."""


class FlushDenormals(Callback):
    """Denormal floats flushed to zero on the CPU during a fit; torch's default (off) again after it.

    Adam's second moments of tiny gradients fall below float32's smallest normal (1.2e-38), where x86 CPUs compute
    many times slower. Measured on 2 cores (ResNet-18, 64 px, 1,184 + 400 real paintings, ready batches): the fastai
    loop cost +1.0 and +1.2 s per epoch over the bare model without it, -0.1 and +0.4 s with it (2 runs each, of
    ~6.3 s). Numbers that small change no update; CUDA is unaffected.
    """
    order = -15

    def before_fit(self):
        """Flush denormals (CPU)."""
        torch.set_flush_denormal(True)

    def after_fit(self):
        """torch's default again."""
        torch.set_flush_denormal(False)

    release = after_fit  # ArtistLearner.fit calls it when an exception escapes the fit


class CPUAutocast(Callback):
    """bf16 autocast of the forward pass and loss on the CPU (fastai's `MixedPrecision` autocasts CUDA only).

    Weights, gradients and the optimizer stay float32 (no loss scaling: bf16 has float32's range); predictions are
    handed to the loss and metrics as float32. Measured with one thread on a CPU with AVX-512 BF16 (ResNet-18, bs 32,
    model-only step): 1.55x float32's images/s at 48 px, 1.73x at 96 px (docs/performance.md).
    """
    order = 10  # where fastai's MixedPrecision runs

    def __init__(self):
        self.context = None

    def before_batch(self):
        """Enter bf16 autocast for the forward pass."""
        self.context = torch.autocast("cpu", dtype=torch.bfloat16)
        self.context.__enter__()

    def after_pred(self):
        """float32 predictions for the loss and metrics."""
        self.learn.pred = _to_float(self.pred)

    def after_loss(self):
        """Leave autocast before the backward pass."""
        self.release()

    def release(self):
        """Leave autocast if it is entered (idempotent; also when an exception ends the batch)."""
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None

    after_cancel_batch = after_fit = release


def _to_float(pred):
    """float32 copies of the floating-point tensors in `pred` (a tensor or a tuple of them)."""
    if isinstance(pred, (tuple, list)):
        return type(pred)(_to_float(p) for p in pred)
    return pred.float() if torch.is_tensor(pred) and pred.is_floating_point() else pred


class ReuseHeap(TrainingOnly):
    """On the CPU, malloc keeps freed memory during a training fit (`device.reuse_heap`), glibc's defaults after it.

    Each training step frees and allocates the same activation buffers; by default glibc maps the big ones fresh
    and returns freed heap to the kernel, so every step page-faults and zero-fills them again (measured:
    98,000-453,000 minor faults per 36 batches of ResNet-18 at 64 px). Kept, they are reused.
    `validate`/`get_preds`/`lr_find` leave the setting alone; GPU training is untouched; under another C library
    than glibc it does nothing.
    """
    order = -15

    def before_training_fit(self):
        """Keep freed memory (CPU training)."""
        self.applied = not dls_on_cuda(self.dls) and reuse_heap(True)

    def after_fit(self):
        """glibc's defaults again, the free heap handed back."""
        if getattr(self, "applied", False):
            reuse_heap(False)
            self.applied = False

    release = after_fit  # ArtistLearner.fit calls it when an exception escapes the fit


class LabelSmoothing(Callback):
    """The learner's loss is `CrossEntropyLossFlat(label_smoothing=eps)`, in training AND validation.

    Installed when the callback joins a learner (`after_create`, or the first fit when added later) and kept: it
    is fastai's own flattened loss, so it honours fastai's reduction protocol (`loss_not_reduced`, hence
    `get_preds(with_loss=True)`, `ClassificationInterpretation`, `plot_top_losses`) and MixUp/CutMix mix it.
    `valid_loss` is then the same smoothed cross-entropy as `train_loss`, as with the reference's
    `nn.CrossEntropyLoss(label_smoothing=0.05)` criterion; its minimum is the entropy of the smoothed target.
    """
    order = -5

    def __init__(self, eps: float = 0.05):
        self.eps = check_fraction("label_smoothing", eps)

    def after_create(self):
        """Install the smoothed loss on a new learner."""
        self._install()

    def before_fit(self):
        """Install the smoothed loss unless the learner already has it (keeping its current reduction)."""
        self._install()

    def _install(self):
        """Set `learn.loss_func` to the smoothed cross-entropy (idempotent)."""
        current = self.learn.loss_func
        func = getattr(current, "func", None)
        if isinstance(current, CrossEntropyLossFlat) and getattr(func, "label_smoothing", None) == self.eps:
            return
        reduction = getattr(current, "reduction", "mean")
        self.learn.loss_func = CrossEntropyLossFlat(label_smoothing=self.eps, reduction=reduction)


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


class CosineAnnealing(TrainingOnly):
    """Per-epoch LR exactly as `CosineAnnealingLR(T_max=t_max, eta_min)` stepped once per epoch.

    The base LR is the one the fit starts with (`learn.fit(n, lr)` or the learner's `lr`), per parameter group;
    `t_max` defaults to the fit's number of epochs. Epoch `e` (0-based) trains with `cosine_lr(e, base, t_max,
    eta_min)`; the LR is set at `before_epoch` and constant within the epoch. It stands aside when another
    fastai `ParamScheduler` drives the LR (`fit_one_cycle`, `fit_flat_cos`, ...).

    With `warmup=w > 0`: epochs `e < w` use `base * (e + 1) / (w + 1)` (linear), then epoch `e >= w` uses
    `cosine_lr(e - w, base, t_max - w, eta_min)`, i.e. torch's `SequentialLR([LinearLR(start_factor=1/(w+1),
    total_iters=w), CosineAnnealingLR(T_max=t_max-w, eta_min)], milestones=[w])`: `t_max` still counts from
    epoch 0, so with the default `t_max` the cosine ends with the fit.
    """

    def __init__(self, t_max: int | None = None, eta_min: float = 0.0, warmup: int = 0):
        if t_max is not None:
            check_number("t_max", t_max, low=1, integer=True)
        check_number("warmup", warmup, integer=True)
        check_number("eta_min", eta_min)
        self.t_max, self.eta_min, self.warmup = t_max, float(eta_min), int(warmup)
        self.base_lrs, self.t_total = None, None

    def before_training_fit(self):
        """Read the base LR of each parameter group and the schedule length; stand aside for a ParamScheduler."""
        if any(isinstance(cb, ParamScheduler) for cb in self.learn.cbs):
            logger.info("CosineAnnealing stands aside: another ParamScheduler drives the learning rate in this fit")
            self.run = False
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
        if self.base_lrs is not None:
            self.opt.set_hyper("lr", [self.lr_at(self.epoch, b) for b in self.base_lrs])


class History(TrainingOnly):
    """One row per epoch: `epoch, train_loss, valid_loss, train_acc, valid_acc, f1_macro, lr, seconds`.

    `train_loss` is the plain mean of the epoch's training-batch losses (not fastai's exponentially smoothed
    `train_loss` in the Recorder), `train_acc` the accuracy on the training batches as they were trained
    (augmented, in train mode, on the raw logits), `lr` the LR the epoch's first training batch used (last
    parameter group: `learn.recorder.lrs` at that batch, whatever schedule set it), `seconds` the wall time of
    training plus validation. Validation columns come from the Recorder (`valid_loss`, `accuracy`, `f1_macro`).
    `learn.history.frame()` is the table as a DataFrame; with `csv_path`, it is written there (atomically) after
    every epoch.
    """
    order, run_valid = Recorder.order + 1, False

    def __init__(self, csv_path=None):
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.rows, self._new_fit, self._trained = [], False, False

    def before_training_fit(self):
        """Mark a new fit (rows are reset once it actually trains)."""
        self._new_fit = True

    def before_epoch(self):
        """Start the epoch's clock and counters."""
        self._t0, self._trained, self._lr = time.perf_counter(), False, math.nan
        self._loss_sum, self._n_batches, self._correct, self._seen = 0.0, 0, 0, 0

    def before_train(self):
        """Reset the table at the first epoch of a fit."""
        if self._new_fit:
            self.rows, self._new_fit = [], False
        self._trained = True

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
        """Add the batch's mean loss; note the LR of the epoch's first batch."""
        if not self._trained:
            return
        if self._n_batches == 0:
            self._lr = float(self.opt.hypers[-1]["lr"])
        self._loss_sum = self._loss_sum + self.learn.loss.detach().float().mean()
        self._n_batches += 1

    def epoch_totals(self) -> list | None:
        """[loss sum, correct, seen] of the training epoch so far (None outside training), e.g. to reduce them."""
        if not self._trained:
            return None
        return [float(self._loss_sum), float(self._correct), float(self._seen)]

    def set_epoch_totals(self, loss_sum: float, correct: float, seen: int) -> None:
        """Replace the epoch's totals (the data-parallel trainer sets the values reduced over the processes)."""
        self._loss_sum, self._correct, self._seen = loss_sum, correct, seen

    def after_epoch(self):
        """Append the epoch's row (training epochs only) and write the table when it has a path."""
        if not self._trained:
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
        if self.csv_path is not None:
            atomic_write_csv(self.csv_path, self.frame())

    def frame(self) -> pd.DataFrame:
        """The history as a DataFrame with exactly `HISTORY_COLUMNS`."""
        return pd.DataFrame(self.rows, columns=list(HISTORY_COLUMNS))


class EpochTable(TrainingOnly):
    """The console's per-epoch table: one line per epoch, with `History`'s column names and values (history.csv's).

    Stands in for fastai's printed table (whose `train_loss` is smoothed and whose accuracy is named `accuracy`);
    `write` prints each line (default `print`, like fastai's `Learner.logger`).
    """
    order = History.order + 1
    WIDTHS = dict(epoch=5, train_loss=10, valid_loss=10, train_acc=9, valid_acc=9, f1_macro=8, lr=8, seconds=7)

    def __init__(self, write=print):
        self.write, self._last = write, None

    def before_training_fit(self):
        """Print the header again at the first row of this fit."""
        self._header = False

    def after_epoch(self):
        """Print the row `History` just recorded (none when the epoch did not train)."""
        history = getattr(self.learn, "history", None)
        row = history.rows[-1] if history is not None and history.rows else None
        if row is None or row is self._last:
            return
        self._last = row
        if not self._header:
            self.write("  ".join(f"{name:>{w}}" for name, w in self.WIDTHS.items()))
            self._header = True
        self.write("  ".join(f"{self.format(name, row.get(name)):>{w}}" for name, w in self.WIDTHS.items()))

    @staticmethod
    def format(name: str, value) -> str:
        """A value of `name` as the table shows it."""
        if name == "epoch":
            return str(value)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "nan"
        return f"{value:.2e}" if name == "lr" else f"{value:.1f}" if name == "seconds" else f"{value:.4f}"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; `.message` says where and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NonFiniteGuard(TrainingOnly):
    """Stops the fit when a training loss is NaN/inf, before that batch's update (so no weights are poisoned).

    Raises `CancelFitException` so that every callback still gets `after_fit` (the fold checkpoint keeps its
    best epoch and records `stopped`), then raises `NonFiniteLossError` naming fold, epoch and batch from its
    own `after_fit`, which runs last.
    """
    order, run_valid = 100, False

    def __init__(self, fold: int | None = None):
        self.fold_id, self.reason, self._message = fold, None, None

    def before_training_fit(self):
        """Forget a previous stop (inactive in `lr_find`, which diverges on purpose, and in `validate`)."""
        self.reason, self._message = None, None

    def _fold_label(self) -> str:
        """'fold k: ' when the fold is known."""
        fold = self.fold_id if self.fold_id is not None else data_meta(self.dls).fold
        return "" if fold is None else f"fold {fold}: "

    def after_loss(self):
        """Cancel the fit on a non-finite training loss."""
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


def data_meta(dls) -> DataMeta:
    """What a checkpoint needs to know about the data (a `DataMeta`: vocab, size, mean, std (0-1 scale), fold, ...).

    The `data_meta` of `ArtistDataLoaders` (made by `artist_dls`, `eval_dls`); for other loaders, vocab from
    `dls.vocab`, mean/std from the `Normalize` batch transform and size from the item transforms (None if absent).
    """
    meta = dls.data_meta if isinstance(dls, ArtistDataLoaders) else None
    if meta is not None and meta.vocab is not None and None not in (meta.mean, meta.std, meta.size):
        return meta
    meta = meta or DataMeta()
    vocab = meta.vocab if meta.vocab is not None else [str(v) for v in dls.vocab]
    mean, std = meta.mean, meta.std
    if mean is None or std is None:
        norm = _find_normalize(dls)
        mean, std = (None, None) if norm is None else (_stat_list(norm.mean), _stat_list(norm.std))
    size = meta.size if meta.size is not None else _find_size(dls)
    return dataclasses.replace(meta, vocab=vocab, mean=mean, std=std, size=size)


def _all_finite(state: dict) -> bool:
    """True when every floating tensor of a state dict is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class FoldCheckpoint(TrackerCallback):
    """Keeps one fold's best epoch on disk, in `out/fold{k}/`, shaped like fastai's `SaveModelCallback`.

    When the monitored value improves (`monitor` in 'valid_loss' (lower is better), 'valid_acc', 'f1_macro'
    (higher is better)), `best.safetensors` is written atomically, then `meta.json` with `complete: false`
    (`artlearn.checkpoint.FoldMeta`). At `after_fit` the best weights are loaded back into the model and
    meta.json is rewritten with `complete: true` and `epochs_run`. The learner's `History` writes `history.csv`
    beside them after every epoch (one is added when missing). An interrupted fit (Ctrl-C, an exception) leaves
    the best epoch's files valid and `complete: false`; a fit stopped by `NonFiniteGuard` also records `stopped`.
    With `EMA` on, the EMA weights are the ones saved. Starting a new training fit removes the folder's previous
    files first. Off outside training fits (`validate`, `get_preds`, `lr_find`), as fastai's trackers.
    """
    order = TrackerCallback.order + 1

    def __init__(self, out, fold: int, monitor: str = "valid_loss", meta: dict | None = None, min_delta: float = 0.0):
        check_choice("monitor", monitor, MONITOR_NAMES)
        if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or fold < 0:
            raise ValueError(f"fold={fold!r}: need a fold number >= 0")
        super().__init__(monitor=monitor, comp=np.less if "loss" in monitor else np.greater, min_delta=min_delta)
        self.monitor_name, self.fold_index = monitor, int(fold)
        self.fold_dir = Path(out) / f"fold{int(fold)}"
        self.extra_meta = dict(meta or {})
        self.best_epoch, self.stop_reason, self.identity = None, None, None

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
        """Resolve the monitor's Recorder name, check the model, clear the folder and point History at it."""
        if not is_training_fit(self.learn):
            self.run = False
            return
        names = list(self.recorder.metric_names[1:])
        found = [n for n in MONITORS[self.monitor_name] if n in names]
        if not found:
            raise ValueError(f"FoldCheckpoint monitor {self.monitor_name!r}: the Recorder has no "
                             f"{' or '.join(MONITORS[self.monitor_name])} (it records {names}); add the metric")
        self.monitor = found[0]
        super().before_fit()
        config = getattr(self.model, "config", None)
        if config is None:
            raise ValueError("FoldCheckpoint needs a model with a `config` (build it with artlearn's build_model)")
        n_vocab = len(data_meta(self.dls).vocab)
        if config["n_classes"] != n_vocab:
            raise ValueError(f"the model has {config['n_classes']} outputs but the data has {n_vocab} artists")
        if not hasattr(self.learn, "history"):
            self.learn.add_cb(History())
            self.learn.history.before_fit()
        self.learn.history.csv_path = self.history_path
        self.best_epoch, self.stop_reason, self.identity = None, None, None
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.meta_path, self.weights_path, self.history_path):
            path.unlink(missing_ok=True)

    def after_epoch(self):
        """Save weights and meta on a new best."""
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
        self.identity = fold_identity(self.fold_dir, digest=save_weights_digest(self.weights_path, state))
        self.best_epoch = int(self.epoch)
        self._write_meta(complete=False)

    def _write_meta(self, complete: bool, epochs_run: int | None = None) -> None:
        """Write meta.json (atomically): the checkpoint's `FoldMeta` as JSON."""
        atomic_write_json(self.meta_path, self._meta(complete, epochs_run).to_json())

    def _meta(self, complete: bool, epochs_run: int | None = None) -> FoldMeta:
        """The checkpoint's meta."""
        ema = getattr(self.learn, "ema", None)
        return FoldMeta.build(self.model.config, data_meta(self.dls), fold=self.fold_index, epoch=self.best_epoch,
                              monitor=self.monitor_name, score=None if self.best_epoch is None else float(self.best),
                              complete=complete, ema=getattr(ema, "decay", None), stopped=self.stop_reason,
                              epochs_run=epochs_run, identity=self.identity, extra=self.extra_meta)

    def after_fit(self):
        """Load the best weights back; mark the checkpoint complete (unless the fit was stopped)."""
        guard = getattr(self.learn, "non_finite_guard", None)
        self.stop_reason = getattr(guard, "reason", None)
        epochs_run = len(self.learn.history.rows)
        if self.best_epoch is None:
            self.stop_reason = self.stop_reason or f"no epoch with a finite {self.monitor_name}"
            self._write_meta(complete=False, epochs_run=epochs_run)
            return
        self.model.load_state_dict(load_weights(self.weights_path))
        self._write_meta(complete=self.stop_reason is None, epochs_run=epochs_run)


class Reproducible(TrainingOnly):
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

    def before_training_fit(self):
        """Save the global RNG states and seed them (not for `validate`/`get_preds`/`lr_find`)."""
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


class EMA(TrainingOnly):
    """Exponential moving average of the weights (and BatchNorm statistics), used for validation.

    After every optimizer step: `shadow = d * shadow + (1 - d) * weights` with `d = min(decay, (1 + n) / (10 + n))`
    after `n` updates (`warmup=True`, so early epochs are not dominated by the initial weights) or `d = decay`.
    Validation runs on the shadow weights, then the training weights are put back; `FoldCheckpoint` saves the
    shadow. At the end of the fit the model holds the shadow weights (or, with a FoldCheckpoint, the best
    epoch's shadow weights).
    """
    order = 20

    def __init__(self, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = check_fraction("ema decay", decay, low_inclusive=False), bool(warmup)
        self.shadow, self.n_updates, self._pending, self._backup = None, 0, False, None

    def before_training_fit(self):
        """Arm a fresh average for a new training fit."""
        self._pending = True

    def before_train(self):
        """Start the average from the current weights at the first epoch of a fit."""
        if self._pending:
            self.shadow = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.n_updates, self._pending = 0, False

    def after_step(self):
        """Update the average."""
        if self.shadow is None or self._pending:
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
        if self.shadow is None or self._pending or self._backup is not None:
            return
        self._backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._model = self.model
        self.model.load_state_dict(self.shadow)

    def after_validate(self):
        """Put the training weights back."""
        self.release()

    def after_fit(self):
        """Leave the averaged weights in the model."""
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
        check_number("logit_adjust", tau)
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
