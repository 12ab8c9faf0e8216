"""Time budgets: parse '60min', measure this machine's speed on a fold's first batches, plan the epochs per fold so
that the whole run fits, and re-plan after every fold from what it really took.

The planning arithmetic (`plan_epochs`, `FoldPlanner`) is pure and takes a clock, so it is tested with a fake one;
`measure_speed` is the only part that trains (a few batches of a throwaway learner). fastai has no notion of a wall
time budget (its schedules count epochs), hence this module.
"""
import logging
import math
import numbers
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

from fastai.callback.core import Callback, CancelFitException

logger = logging.getLogger("artlearn")

UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60,
         "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600}
SAFETY = 0.04  # fraction of the budget kept back for what the plan cannot see (checkpoint writes, load noise)
HOUR_WARNING_S = 3600  # one fold longer than this gets a plain warning
TIMED_BATCHES, WARMUP_BATCHES, EVAL_BATCHES = 3, 1, 2
# The training sizes a budget may choose (Recipe.size_by_budget), smallest first: 48 px is the smallest measured to
# pay (docs/results/budget7: 0.358 against 0.341 at 64 px in 7 min); 128 px the largest measured (docs/results/compare).
BUDGET_SIZES = (48, 64, 80, 96, 112, 128)


def parse_budget(value) -> float | None:
    """Seconds from '60min', '1.5h', '90s', '2 hours' or a number of seconds; None stays None (no budget)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", value)
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError(f"budget={value!r}: write a duration such as '15min', '60min', '1.5h' or '900s'")
        seconds = float(match.group(1)) * UNITS[match.group(2).lower()]
    else:
        raise ValueError(f"budget={value!r}: write a duration such as '60min' or a number of seconds")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"budget={value!r}: need a positive duration such as '60min'")
    return seconds


def describe_seconds(seconds: float) -> str:
    """'45 s', '12.5 min' or '6.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Speed:
    """What one process of this machine takes: per training batch at each training size, per evaluated view, and
    to build one fold's loaders and learner."""
    train_batch_s: dict  # training size (px) -> seconds per training batch
    eval_view_s: float   # seconds per image and test-time view at the evaluation size
    setup_s: float       # building one fold's DataLoaders + Learner
    bs: int
    threads: int = 1

    def epoch_s(self, n_train: int, n_valid: int, size: int) -> float:
        """One epoch at training size `size`: the training batches plus the validation pass (one view)."""
        return math.ceil(n_train / self.bs) * self.train_batch_s[size] + n_valid * self.eval_view_s


@dataclass(frozen=True)
class FoldShape:
    """The sizes a plan needs: images per split, the resolution schedule, test-time views."""
    n_train: int
    n_valid: int
    size: int
    small_size: int | None = None  # progressive resizing's first size (None: off)
    small_fraction: float = 0.0    # fraction of the epochs trained at small_size
    views: int = 2                 # test-time views per image (OOF and ensemble)
    warmup: int = 0                # the recipe's warmup epochs (a plan trains more than these)

    def mean_epoch_s(self, speed: Speed) -> float:
        """Seconds of an average epoch under the resolution schedule."""
        full = speed.epoch_s(self.n_train, self.n_valid, self.size)
        if not self.small_size or not self.small_fraction:
            return full
        small = speed.epoch_s(self.n_train, self.n_valid, self.small_size)
        return self.small_fraction * small + (1 - self.small_fraction) * full

    def fixed_s(self, speed: Speed, predict_view_s: float | None = None) -> float:
        """Seconds of one fold that do not scale with epochs: building it and its out-of-fold predictions."""
        return speed.setup_s + self.n_valid * self.views * (predict_view_s or speed.eval_view_s)


@dataclass
class FoldTiming:
    """Planned and actual seconds of one fold."""
    fold: int
    epochs: int | None
    planned_s: float | None
    actual_s: float | None = None
    trained: bool = True
    epochs_run: int | None = None  # fewer than `epochs` when the fold's deadline shortened it


def choose_size(epochs_at: dict, target: int) -> int:
    """The largest size whose plan reaches `target` epochs per fold, else the smallest size: below the target an
    epoch buys more than pixels do, past it pixels buy more than further epochs (docs/performance.md)."""
    if not epochs_at:
        raise ValueError("choose_size needs the planned epochs of at least one size")
    reaching = [size for size, epochs in epochs_at.items() if epochs >= target]
    return max(reaching) if reaching else min(epochs_at)


def size_for_budget(epochs_at_size, target: int, sizes=BUDGET_SIZES) -> tuple:
    """(size chosen, {size: planned epochs}): `epochs_at_size(size)` measures and plans one size; sizes are tried
    smallest first until one falls short of `target` epochs (the larger ones would too), then `choose_size`."""
    planned = {}
    for size in sorted(sizes):
        planned[size] = epochs_at_size(size)
        if planned[size] < target:
            break
    return choose_size(planned, target), planned


def plan_epochs(seconds_left: float, folds_left: int, epoch_s: float, fixed_s: float, final_s: float,
                min_epochs: int = 1) -> int:
    """The most epochs per fold such that `folds_left` folds and the final prediction fit in `seconds_left`."""
    usable = seconds_left - final_s - folds_left * fixed_s
    epochs = math.floor(usable / (folds_left * epoch_s)) if usable > 0 else 0
    if epochs < min_epochs:
        need = final_s + folds_left * (fixed_s + min_epochs * epoch_s)
        raise ValueError(f"the time budget leaves {describe_seconds(max(seconds_left, 0))} for {folds_left} fold(s), "
                         f"but {min_epochs} epoch(s) per fold need about {describe_seconds(need)} on this machine; "
                         "give a larger --budget, fewer folds (--folds), a smaller --size or a smaller --arch")
    return epochs


@dataclass
class FoldPlanner:
    """Epochs per fold: fixed by the recipe (no budget; the estimate is logged) or planned to fit a budget.

    `start` is the run's start on `clock` (the budget counts from there: the store and checks included); the folds
    this process trains come in order through `before_fold` / `after_fold`; `final_s` is kept for what follows
    the folds (the ensemble and submission of `predict_after` images).
    """
    shape: FoldShape
    speed: Speed
    folds: list
    epochs: int | None = None       # the recipe's epochs when there is no budget
    budget_s: float | None = None
    start: float = 0.0
    predict_after: int = 0
    n_models: int = 1               # folds averaged by the final prediction
    clock: object = time.monotonic
    decode_image_s: float = 0.0     # decoding one image into the store (the predicted images are decoded too)
    timings: dict = field(default_factory=dict)
    _epoch_s: float | None = None   # seconds per epoch, corrected by each finished fold

    def __post_init__(self):
        self._epoch_s = self.shape.mean_epoch_s(self.speed)

    _predict_view_s: float | None = None  # seconds per predicted view, measured on a fold's OOF predictions

    @property
    def predict_view_s(self) -> float:
        """Seconds per image and view of `ensemble` (what the OOF predictions took, once a fold has written them)."""
        return self._predict_view_s if self._predict_view_s is not None else self.speed.eval_view_s

    @property
    def final_s(self) -> float:
        """Seconds kept for the prediction after the folds."""
        return self.predict_after * (self.shape.views * self.n_models * self.predict_view_s + self.decode_image_s)

    def epochs_for(self, folds_left: int) -> int:
        """Epochs per fold for the folds left: the recipe's, or the most that fit the budget. Before any fold is
        trained a budget too small is a ValueError; later (a fold took longer than planned) the folds left get the
        fewest epochs the recipe allows, with a warning, so that nothing already trained is wasted."""
        if self.budget_s is None:
            return self.epochs
        seconds_left = self.budget_s * (1 - SAFETY) - (self.clock() - self.start)
        least = self.shape.warmup + 1
        try:
            return plan_epochs(seconds_left, folds_left, self._epoch_s, self._fixed_s, self.final_s, min_epochs=least)
        except ValueError as e:
            if not any(t.trained and t.actual_s is not None for t in self.timings.values()):
                raise
            logger.warning(f"{e}: training the {folds_left} fold(s) left with {least} epoch(s) each, past the budget")
            return least

    @property
    def _fixed_s(self) -> float:
        return self.shape.fixed_s(self.speed, self._predict_view_s)

    def fold_deadline(self, todo: list) -> float | None:
        """When training of the first fold of `todo` must end (its share of the budget left, less its OOF
        predictions and the final prediction), on the planner's clock; None without a budget."""
        if self.budget_s is None:
            return None
        now = self.clock()
        share = (self.budget_s * (1 - SAFETY) - (now - self.start) - self.final_s) / len(todo)
        return now + share - self.shape.n_valid * self.shape.views * self.predict_view_s

    def fold_seconds(self, epochs: int) -> float:
        """Predicted seconds of one fold of `epochs` epochs."""
        return self._fixed_s + epochs * self._epoch_s

    def before_fold(self, fold: int, todo: list) -> int:
        """The epochs of `fold` (the first of `todo`, the folds this process still trains), logged with the time."""
        epochs = self.epochs_for(len(todo))
        self.timings[fold] = FoldTiming(fold, epochs, self.fold_seconds(epochs))
        return epochs

    def after_fold(self, fold: int, seconds: float, predict_s: float | None = None,
                   epochs_run: int | None = None) -> None:
        """Record what `fold` took (`predict_s` of it writing its OOF predictions, `epochs_run` when a deadline
        shortened it) and correct the seconds per epoch and per predicted view (re-plan the next folds)."""
        timing = self.timings[fold]
        timing.actual_s = seconds
        timing.epochs_run = epochs_run if epochs_run is not None else timing.epochs
        if predict_s is not None and predict_s > 0:
            self._predict_view_s = predict_s / max(1, self.shape.n_valid * self.shape.views)
        epochs = epochs_run or timing.epochs
        if epochs:
            measured = (seconds - self._fixed_s) / epochs
            if measured > 0:
                self._epoch_s = measured

    def skipped(self, fold: int) -> None:
        """`fold` was complete already (a resumed run): nothing trained, nothing planned."""
        self.timings[fold] = FoldTiming(fold, None, None, 0.0, trained=False)

    def plan_text(self, todo: list, n_processes: int = 1) -> str:
        """'4 folds x 34 epochs at 64 px, about 58 min on this machine (2 processes x 1 thread)'."""
        epochs = self.epochs_for(len(todo))
        total = len(todo) * self.fold_seconds(epochs) + self.final_s
        sizes = (f"{self.shape.small_size}->{self.shape.size} px" if self.shape.small_size and
                 self.shape.small_fraction else f"{self.shape.size} px")
        how = f"{n_processes} process{'es' if n_processes > 1 else ''} x {self.speed.threads} thread" + \
            ("s" if self.speed.threads > 1 else "")
        within = f" (budget {describe_seconds(self.budget_s)})" if self.budget_s else ""
        return (f"{len(todo)} fold{'s' if len(todo) > 1 else ''} x {epochs} epochs at {sizes}, about "
                f"{describe_seconds(total)} on this machine{within} ({how})")

    def hour_warning(self, todo: list) -> str | None:
        """A plain warning when one fold will take over an hour here, with what to try; None otherwise."""
        if not todo:
            return None
        fold_s = self.fold_seconds(self.epochs_for(len(todo)))
        if fold_s <= HOUR_WARNING_S:
            return None
        return (f"one fold will take about {describe_seconds(fold_s)} on this machine; for a shorter run try "
                "--preset fast, or --budget 60min (train_kfold(..., preset='fast', budget='60min'))")

    def record(self) -> dict:
        """summary.json's 'timing' entry: the budget, the planned and actual seconds per fold."""
        folds = {str(k): asdict(t) for k, t in sorted(self.timings.items())}
        return dict(budget_seconds=self.budget_s, folds=folds, threads=self.speed.threads,
                    seconds_per_epoch_measured=round(self.shape.mean_epoch_s(self.speed), 3),
                    seconds_per_eval_view=self.speed.eval_view_s, seconds_per_predicted_view=self._predict_view_s)


class FoldDeadline(Callback):
    """Ends a fold's fit by `deadline` (on `clock`): after each epoch, when the epochs left at the pace measured so
    far would pass it, the fit is shortened and the cosine schedule re-aimed at the new last epoch (or the fit ends
    now). A budget is kept even when the machine slows down during a fold (other work, a throttled CPU)."""
    order = 150  # after the checkpoint and the history have recorded the epoch

    def __init__(self, deadline: float, clock=time.time):
        self.deadline, self.clock, self.total, self.started = deadline, clock, None, None

    def before_fit(self):
        self.started, self.total = self.clock(), self.n_epoch

    def after_epoch(self):
        done, now = self.epoch + 1, self.clock()
        pace = (now - self.started) / done
        left = self.total - done
        if pace > 0 and now + left * pace > self.deadline:  # the epochs left would pass the deadline
            total = done + max(0, math.floor((self.deadline - now) / pace))
            logger.info(f"behind the plan ({pace:.0f} s per epoch): this fold ends after epoch {total} of "
                        f"{self.n_epoch}, its learning-rate schedule shortened to match")
            self.total = total
            self._shorten_schedule(total)
        if done >= self.total:
            raise CancelFitException()

    def _shorten_schedule(self, total: int) -> None:
        """Re-aim the per-epoch cosine (CosineAnnealing) at `total` epochs, when it has more than its warmup."""
        for cb in self.learn.cbs:
            if hasattr(cb, "t_total") and hasattr(cb, "warmup") and cb.t_total is not None and total > cb.warmup:
                cb.t_total = total


# ---------------------------------------------------------------- measuring this machine


def _median(xs: list) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class BatchTimer(Callback):
    """Times the training batches of a fit and cancels it after `n` of them (no validation pass)."""
    order = 200  # after every other callback of the batch

    def __init__(self, n: int):
        self.n, self.stamps = n, []

    def before_train(self):
        self.stamps = [time.perf_counter()]

    def after_batch(self):
        if self.training:
            self.stamps.append(time.perf_counter())
            if len(self.stamps) > self.n:
                raise CancelFitException()

    def after_train(self):
        raise CancelFitException()


def measure_speed(build, sizes: list, bs: int) -> Speed:
    """Time a throwaway learner's first training batches at each size and a few evaluation batches.

    `build(size)` returns `(dls, learner)` for one fold at training size `size` (the run's own recipe, no
    checkpoint): what one process of this machine takes, loaders and callbacks included.
    """
    import torch
    train_s, setup, eval_s = {}, [], float("nan")
    for size in sizes:
        started = time.perf_counter()
        dls, learn = build(size)
        setup.append(time.perf_counter() - started)
        timer = BatchTimer(WARMUP_BATCHES + TIMED_BATCHES)
        learn.fit(1, cbs=[timer])
        gaps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
        train_s[size] = _median(gaps[WARMUP_BATCHES:] or gaps)
        if size == sizes[-1]:
            eval_s = _eval_view_seconds(learn, dls, torch)
    return Speed(train_batch_s=train_s, eval_view_s=eval_s, setup_s=min(setup), bs=bs,
                 threads=torch.get_num_threads())


def _eval_view_seconds(learn, dls, torch) -> float:
    """Seconds per evaluated image: the median over a few validation batches (after one warm-up batch)."""
    model, times, seen = learn.model.eval(), [], []
    with torch.no_grad():
        started = time.perf_counter()
        for i, batch in enumerate(dls.valid):
            model(batch[0])
            now = time.perf_counter()
            times.append(now - started)
            seen.append(len(batch[0]))
            started = now
            if i >= EVAL_BATCHES:
                break
    pairs = list(zip(times, seen))[1:] or list(zip(times, seen))
    return _median([t / max(n, 1) for t, n in pairs])


def cpu_count() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
