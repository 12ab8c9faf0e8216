"""`train_kfold`: stratified K-fold training into a resumable run directory, then OOF scores and fold selection.

One orchestration path serves one process and torchrun alike: with one process the distributed context is a
no-op; under torchrun the folds are shared out (fold-parallel) or each fold is trained by every process (`ddp`).
"""
import contextlib
import copy
import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .budget import (
    EVAL_BATCHES,
    TIMED_BATCHES,
    WARMUP_BATCHES,
    FoldDeadline,
    FoldPlanner,
    FoldShape,
    cpu_count,
    describe_seconds,
    measure_speed,
    parse_budget,
    size_for_budget,
)
from .checks import MIN_SIDE, check_choice
from .distributed import DistContext, init_distributed, single_process_view
from .ensemble import ensemble
from .files import atomic_write_csv, atomic_write_json
from .folds import assign_folds, check_duplicates, check_fold_groups, check_n_folds
from .recipe import Recipe
from .rng import keep_global_rng
from .runconfig import config_as_now, read_config
from .run import (
    CONFIG_NAME,
    FOLDS_NAME,
    OOF_NAME,
    SUMMARY_NAME,
    KFoldRun,
    best_row,
    check_config,
    check_data_unchanged,
    check_out_dir,
    clear_fold,
    clear_run,
    data_fingerprint,
    fold_dir,
    fold_is_complete,
    load_run,
    majority_baseline,
    read_folds,
    read_history,
    run_config,
    run_lock,
    write_run_dir,
)
from .store import PresizeCache, default_memory_budget, store_presize
from .tables import content_digests, validate_table
from .tta import tta_spec

logger = logging.getLogger("artlearn")
FOLD_RULES = ("complete", "stable")  # select_folds: every complete fold, or the report's stability rule


# ---------------------------------------------------------------- fold selection


@dataclass
class FoldSelection:
    """The folds chosen for the ensemble, why the others were left out, and the rule applied."""
    folds: list
    excluded: dict
    rule: str
    table: pd.DataFrame

    def __iter__(self):
        return iter(self.folds)

    def __len__(self) -> int:
        return len(self.folds)

    def as_dict(self) -> dict:
        """JSON-able form for summary.json."""
        return dict(folds=[int(f) for f in self.folds], excluded={str(k): v for k, v in self.excluded.items()},
                    rule=self.rule, table=json.loads(self.table.to_json(orient="index")))


def _volatility(history: pd.DataFrame) -> float:
    """Std of epoch-to-epoch valid-loss changes over the second half of training, relative to its mean."""
    losses = history["valid_loss"].to_numpy(dtype=float)
    half = losses[len(losses) // 2:]
    if len(half) < 3 or not np.isfinite(half).all():
        return float("nan") if len(half) >= 3 else 0.0
    return float(np.std(np.diff(half)) / max(np.mean(half), 1e-12))


def select_folds(run, folds=None, max_volatility_ratio: float = 2.0, min_volatility: float = 0.02,
                 max_gap: float = 0.05, score: str = "valid_acc", rule: str = "complete") -> FoldSelection:
    """Choose the folds to ensemble: by a reproducible rule, or the folds named by hand.

    rule='complete' (default): every complete fold. On issue 16's held-out study (docs/results/compare/
    fold_selection-*.md) the ensemble of all folds matched or beat the stability rule and every single fold.
    rule='stable' (the report's rule): a complete fold is also excluded when (a) its valid-loss volatility (std of
    epoch-to-epoch changes over the second half of training, relative to the mean loss there) exceeds both
    `min_volatility` and `max_volatility_ratio` times the median volatility of the folds, or (b) its best `score` is
    more than `max_gap` below the median best score of the folds; at least the best fold is kept. Incomplete or
    stopped folds are always excluded.
    """
    check_choice("rule", rule, FOLD_RULES)
    run = run if isinstance(run, KFoldRun) else load_run(run)
    rows = {}
    for k in sorted(run.metas):
        h = run.histories.get(k)
        best = best_row(k, h, run.metas[k])
        usable = h is not None and len(h) and "valid_loss" in h.columns
        rows[k] = dict(status=best["status"], best=best.get(score, np.nan),
                       volatility=_volatility(h) if usable else float("nan"))
    table = pd.DataFrame.from_dict(rows, orient="index")
    if folds is not None:
        chosen = _hand_picked(folds, run)
        excluded = {k: "not named by hand" for k in run.metas if k not in chosen}
        return FoldSelection(chosen, excluded, "folds named by hand", table)
    excluded = {k: f"fold is {r['status']}" for k, r in rows.items() if r["status"] != "complete"}
    ok = table[table["status"] == "complete"] if len(table) else table
    if ok.empty:
        raise ValueError(f"{run.path}: no fold has a complete checkpoint; train the run first (train_kfold)")
    if rule == "complete":
        chosen = [int(k) for k in ok.index]
        return FoldSelection(chosen, dict(sorted(excluded.items())), "every complete fold", table)
    problems = getattr(run, "history_problems", {})
    med_vol, med_best = float(np.nanmedian(ok["volatility"])), float(np.nanmedian(ok["best"]))
    for k, r in ok.iterrows():
        limit = max(min_volatility, max_volatility_ratio * med_vol)
        if k in problems or k not in run.histories:
            excluded[k] = (f"its history cannot be judged ({problems.get(k, 'no history.csv')}); name it by hand "
                           "(select_folds(folds=...), --select) to use it")
        elif not np.isfinite(r["volatility"]) or r["volatility"] > limit:
            excluded[k] = (f"unstable valid loss: volatility {r['volatility']:.3f} > {limit:.3f} "
                           f"({max_volatility_ratio:g} x median {med_vol:.3f}, floor {min_volatility:g})")
        elif r["best"] < med_best - max_gap:
            excluded[k] = f"best {score} {r['best']:.3f} is more than {max_gap:g} below the median {med_best:.3f}"
    chosen = [int(k) for k in ok.index if k not in excluded]
    if not chosen and ok["best"].notna().any():
        keep = int(ok["best"].idxmax())
        chosen, excluded = [keep], {k: v for k, v in excluded.items() if k != keep}
    elif not chosen:  # no fold has a usable history: nothing to judge, so every complete fold is kept
        logger.warning(f"{run.path}: no complete fold has a usable history.csv; every complete fold is selected")
        chosen = [int(k) for k in ok.index]
        excluded = {k: v for k, v in excluded.items() if k not in chosen}
    rule = (f"exclude incomplete folds; volatility > max({min_volatility:g}, {max_volatility_ratio:g} x median); "
            f"best {score} < median - {max_gap:g}; keep at least the best fold")
    return FoldSelection(chosen, dict(sorted(excluded.items())), rule, table)


def _hand_picked(folds, run) -> list:
    """Folds named by hand, validated: integers with a complete checkpoint, at least one."""
    try:
        chosen = [int(f) for f in folds]
    except (TypeError, ValueError):
        raise ValueError(f"folds={folds!r}: need fold numbers such as [0, 2]") from None
    unknown = [f for f in chosen if f not in run.folds]
    if unknown or not chosen:
        raise ValueError(f"folds {unknown or chosen} have no complete checkpoint in {run.path}; "
                         f"complete folds: {run.folds}")
    return sorted(set(chosen))


# ---------------------------------------------------------------- the run's inputs, checked before anything is written


def _given_folds(df: pd.DataFrame, n_folds: int) -> pd.DataFrame:
    """A table's own 'fold' column (integers, as numbers or text) checked against n_folds."""
    folds = pd.to_numeric(df["fold"].astype(str).str.strip(), errors="coerce")
    bad = sorted({str(v) for v, f in zip(df["fold"], folds) if pd.isna(f) or f != int(f) or not 0 <= int(f) < n_folds})
    if bad:
        raise ValueError(f"column 'fold' has values {bad[:5]} outside 0..{n_folds - 1} (n_folds={n_folds}); use "
                         "integers 0..n_folds-1, or drop the column to let artlearn assign the folds")
    return df.assign(fold=folds.astype(int))


def _prepare_folds(df: pd.DataFrame, n_folds: int, seed: int) -> tuple[pd.DataFrame, list]:
    """The training table checked (labels, ids, files, identical images) with a fold column, and its digests."""
    df = validate_table(df, "training table", kind="train").reset_index(drop=True)
    check_n_folds(n_folds, len(df))
    digests = content_digests(df["img_path"], source="training table")
    if "fold" not in df.columns:
        return assign_folds(df, n_folds, seed, groups=digests, source="training table").reset_index(drop=True), digests
    df = _given_folds(df, n_folds)
    check_duplicates(df, digests, "training table")
    check_fold_groups(df, digests, "training table")
    return df, digests


def _uses_batchnorm(arch: str) -> bool:
    """True when the architecture has BatchNorm layers (built on the 'meta' device: nothing allocated)."""
    import torch
    from torch import nn

    from .models import build_model
    with torch.device("meta"):
        model = build_model(arch, n_classes=2)
    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)) for m in model.modules())


def _check_splits(df: pd.DataFrame, n_folds: int, recipe: Recipe, per_process_bs: int) -> None:
    """Refuse empty validation splits and (BatchNorm) batches or training splits of a single image."""
    sizes = df["fold"].value_counts().reindex(range(n_folds), fill_value=0)
    empty = [k for k in range(n_folds) if sizes[k] == 0]
    if empty:
        raise ValueError(f"column 'fold' leaves fold(s) {empty} without validation rows (n_folds={n_folds}); number "
                         "the folds 0..n_folds-1 with rows in each, or use fewer folds")
    smallest = int(len(df) - sizes.max())
    if (per_process_bs < 2 or smallest < 2) and _uses_batchnorm(recipe.arch):
        what = (f"bs={recipe.bs}" + (f" ({per_process_bs} per process)" if per_process_bs != recipe.bs else "")
                if per_process_bs < 2 else f"the smallest training split ({smallest} image)")
        raise ValueError(f"{what}: {recipe.arch} uses BatchNorm, which needs at least 2 images per training batch; "
                         "use bs >= 2 and at least 2 training images per fold (fewer folds or more images), or a "
                         "convnext (LayerNorm)")


def _folds_to_train(folds, n_folds: int) -> list:
    """Validated list of folds asked for."""
    try:
        chosen = list(range(n_folds)) if folds is None else sorted({int(f) for f in folds})
    except (TypeError, ValueError):
        raise ValueError(f"folds={folds!r}: need fold numbers such as [0, 2]") from None
    bad = [f for f in chosen if not 0 <= f < n_folds]
    if bad or not chosen:
        raise ValueError(f"folds {bad or folds} out of range: with n_folds={n_folds} use 0..{n_folds - 1}")
    return chosen


def _check_run_args(n_folds, seed, workers, overwrite) -> None:
    """ValueError for a bad fold count, seed, worker count or overwrite flag (before any write)."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds={n_folds!r}: need an integer of at least 2")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed={seed!r}: need an integer in 0..2**32-1")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0):
        raise ValueError(f"workers={workers!r}: need None (automatic) or an integer >= 0")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite={overwrite!r}: need True or False")


def _callback_factories(cbs) -> list:
    """Per-fold callback makers: a Callback class or factory (called once here to check it), an instance copied."""
    from fastai.callback.core import Callback
    if cbs is None:
        return []
    if isinstance(cbs, (Callback, type, str)) or callable(cbs) or not hasattr(cbs, "__iter__"):
        cbs = [cbs]
    makers = []
    for cb in cbs:
        if isinstance(cb, Callback):
            makers.append(lambda cb=cb: copy.deepcopy(cb))
        elif isinstance(cb, type) and issubclass(cb, Callback):
            makers.append(cb)
        elif callable(cb) and not isinstance(cb, type):
            made = cb()
            if not isinstance(made, Callback):
                raise ValueError(f"cbs: the factory {cb!r} returned {made!r}, not a fastai Callback")
            makers.append(cb)
        else:
            raise ValueError(f"cbs: {cb!r} is neither a fastai Callback nor a factory returning one")
    return makers


# ---------------------------------------------------------------- one fold


@dataclass
class _FoldJob:
    """Everything needed to train, resume and score one fold of a run (shared by every fold of `train_kfold`)."""
    df: pd.DataFrame
    out: Path
    recipe: Recipe
    cache: PresizeCache
    n_folds: int
    seed: int
    workers: int | None
    progress: bool
    cbs: list
    config: dict
    budget_s: float | None = None
    started: float = 0.0       # the run's start (time.time()): a budget counts from there
    predict_after: int = 0     # images the caller predicts after training (a budget keeps time for them)
    decode_image_s: float = 0.0  # what decoding one image into the store took (the predicted images need it too)


def _small_size(size: int) -> int:
    """Progressive resizing's first training size: half the size (at least MIN_SIDE px)."""
    return max(MIN_SIDE, size // 2)


def _fold_dls(job: _FoldJob, k: int, size: int | None = None):
    """Fold k's DataLoaders with the recipe's data settings (at `size` when given)."""
    from .dls import artist_dls
    return artist_dls(job.df, fold=k, size=size, recipe=job.recipe, n_folds=job.n_folds, seed=job.seed,
                      cache=job.cache, workers=job.workers)


def _train_fold(job: _FoldJob, k: int, *, epochs: int, deadline: float | None = None, **learner_kw) -> None:
    """Build fold k's DataLoaders and Learner and fit it for `epochs` (`learner_kw` overrides artist_learner's)."""
    from .learner import artist_learner
    start = time.time()
    dls = _fold_dls(job, k)
    kw = dict(recipe=job.recipe, seed=job.seed + k, out=job.out, fold=k, progress=job.progress)
    kw.update(learner_kw, epochs=epochs)
    kw["cbs"] = [*(kw.get("cbs") or []), *(make() for make in job.cbs)]
    if job.recipe.progressive:
        kw["cbs"].append(_progressive_callback(job, k, epochs))
    if deadline is not None:
        kw["cbs"].append(FoldDeadline(deadline))
    learn = artist_learner(dls, **kw)
    _fit_fold(learn, epochs, k)
    logger.info(f"fold {k}: trained in {time.time() - start:.0f} s")


def _progressive_callback(job: _FoldJob, k: int, epochs: int):
    """ProgressiveResize training the first `progressive` fraction of the epochs at half the size."""
    from .callbacks import ProgressiveResize
    small = _fold_dls(job, k, _small_size(job.recipe.size))
    return ProgressiveResize(small.train, round(job.recipe.progressive * epochs))


def _fold_shape(df: pd.DataFrame, k: int, r: Recipe) -> FoldShape:
    """Fold k's sizes for the planner: images per split, the resolution schedule, test-time views."""
    n_valid = int((df["fold"] == k).sum())
    return FoldShape(n_train=len(df) - n_valid, n_valid=n_valid, size=r.size,
                     small_size=_small_size(r.size) if r.progressive else None, small_fraction=r.progressive,
                     views=tta_spec(r.tta).views, warmup=r.warmup)


def _planner(job: _FoldJob, k: int, folds: list, n_models: int) -> FoldPlanner:
    """Measure this process's speed on fold k's first batches and plan the epochs of `folds` (budget or not)."""
    from .learner import artist_learner

    def build(size):
        dls = _fold_dls(job, k, size)
        return dls, artist_learner(dls, recipe=job.recipe, seed=job.seed + k, progress=False)
    shape = _fold_shape(job.df, k, job.recipe)
    sizes = [shape.small_size, shape.size] if shape.small_size else [shape.size]
    with keep_global_rng():  # the throwaway learner's weight init and loaders draw from the global RNGs
        speed = measure_speed(build, sizes, job.recipe.bs)
    return FoldPlanner(shape, speed, folds, epochs=job.recipe.epochs, budget_s=job.budget_s, start=job.started,
                       predict_after=job.predict_after, n_models=n_models, clock=time.time,
                       decode_image_s=job.decode_image_s)


# ---------------------------------------------------------------- the size a budget affords (Recipe.size_by_budget)


def _timing_sample(df: pd.DataFrame, k: int, bs: int) -> pd.DataFrame:
    """Enough of fold k's training and validation rows, spread over the table, to time a few batches of each."""
    train, valid = df[df["fold"] != k], df[df["fold"] == k]
    n_train, n_valid = bs * (WARMUP_BATCHES + TIMED_BATCHES + 1), bs * (EVAL_BATCHES + 1)
    return pd.concat([train.iloc[::max(1, len(train) // n_train)].head(n_train),
                      valid.iloc[::max(1, len(valid) // n_valid)].head(n_valid)])


def _choose_budget_size(recipe: Recipe, df: pd.DataFrame, a: "_RunArgs", procs: int, todo: list) -> int:
    """The size this machine affords under the budget: each candidate size timed on a sample of fold todo[0]'s
    images (stored once at the largest size's side, with the threads each fold process will have) and planned for
    the folds one process will train, the store's filling and the final prediction included."""
    import torch

    from .budget import BUDGET_SIZES
    from .dls import artist_dls
    from .learner import artist_learner
    k, sample = todo[0], _timing_sample(df, todo[0], recipe.bs)
    cache = PresizeCache(store_presize(recipe.store, max(BUDGET_SIZES), recipe.min_scale, len(sample)))
    filling = time.time()
    cache.fill(sample["img_path"], source="training table")
    decode_image_s = (time.time() - filling) / len(sample)
    per_process = -(-len(todo) // procs)

    def build(size):
        dls = artist_dls(sample, fold=k, size=size, recipe=recipe, n_folds=a.n_folds, seed=a.seed, cache=cache,
                         workers=a.workers)
        return dls, artist_learner(dls, recipe=recipe, seed=a.seed + k, progress=False)

    def epochs_at(size: int) -> int:
        sized = recipe.replace(size=size)
        speed = measure_speed(build, [size, _small_size(size)] if sized.progressive else [size], recipe.bs)
        planner = FoldPlanner(_fold_shape(df, k, sized), speed, list(range(per_process)), budget_s=a.budget_s,
                              start=a.started - len(df) * decode_image_s, predict_after=a.predict_after,
                              n_models=len(todo), clock=time.time, decode_image_s=decode_image_s)
        try:
            return planner.epochs_for(per_process)
        except ValueError:  # not even the fewest epochs fit at this size
            return 0

    threads = torch.get_num_threads()
    if procs > 1:
        torch.set_num_threads(max(1, cpu_count() // procs))
    try:
        with keep_global_rng():
            size, planned = size_for_budget(epochs_at, recipe.epochs, BUDGET_SIZES)
    finally:
        torch.set_num_threads(threads)
    tried = ", ".join(f"{e} at {s} px" for s, e in planned.items())
    logger.info(f"budget: training at {size} px, the largest size at which every fold still gets the recipe's "
                f"{recipe.epochs} epochs (else the smallest); epochs per fold the budget affords: {tried}")
    return size


def _recorded_budget_size(out: Path, overwrite: bool) -> int | None:
    """The size a budget chose for the run in `out` (resumed at that size, not chosen again); None for a new run."""
    if overwrite or not (out / CONFIG_NAME).is_file():
        return None
    try:
        config = config_as_now(read_config(out))
    except ValueError:  # check_config says what is wrong with it
        return None
    size = config.get("size")
    return size if config.get("size_by_budget") is True and isinstance(size, int) else None


def _budget_sized(recipe: Recipe, df: pd.DataFrame, out: Path, a: "_RunArgs", ctx: DistContext, procs: int,
                  todo: list) -> Recipe:
    """The recipe at the size its budget affords when it says size_by_budget (else as it is)."""
    if a.budget_s is None or not recipe.size_by_budget or a.size_planned:
        return recipe
    size = _recorded_budget_size(out, a.overwrite)
    if size is not None:
        logger.info(f"budget: resuming at {size} px, the size this run's budget chose")
    else:
        size = ctx.broadcast(_choose_budget_size(recipe, df, a, procs, todo) if ctx.is_main else None)
    return recipe.replace(size=size)


def _fit_fold(learn, epochs: int, fold: int) -> None:
    """Fit one fold; a non-finite loss stops this fold (best checkpoint kept) and the run goes on."""
    from .callbacks import NonFiniteLossError
    try:
        learn.fit(epochs)
    except NonFiniteLossError as e:
        logger.warning(str(e) if str(e).startswith(f"fold {fold}:") else f"fold {fold}: {e}")


def _write_oof(job: _FoldJob, k: int) -> None:
    """Predict a fold's validation rows with its best checkpoint and write fold<k>/oof.csv."""
    valid = job.df[job.df["fold"] == k]
    probs, vocab = ensemble([fold_dir(job.out, k)], valid, tta=job.recipe.tta, bs=job.recipe.bs, cache=job.cache,
                            workers=job.workers)
    cols = [c for c in ("id", "img_path", "fold", "artist") if c in valid.columns]
    oof = valid[cols].reset_index(drop=True)
    oof["pred"] = [vocab[i] for i in probs.argmax(1)]
    oof = pd.concat([oof, pd.DataFrame(probs, columns=[f"p_{a}" for a in vocab])], axis=1)
    atomic_write_csv(fold_dir(job.out, k) / OOF_NAME, oof)


def _write_missing_oof(job: _FoldJob, k: int) -> None:
    """Write fold<k>/oof.csv when the fold is complete and its OOF is not there yet."""
    folder = fold_dir(job.out, k)
    if not (folder / OOF_NAME).is_file() and fold_is_complete(folder, job.config):
        _write_oof(job, k)


def _run_fold(job: _FoldJob, k: int, epochs: int, deadline: float | None = None) -> float:
    """Fold k, trained afresh for `epochs` (whatever an interrupted try left is cleared), then its OOF; returns
    the seconds the OOF predictions took. The images are checked unchanged before and after training."""
    check_data_unchanged(job.df, job.config, f"fold {k}")
    clear_fold(fold_dir(job.out, k))
    _train_fold(job, k, epochs=epochs, deadline=deadline)
    started = time.time()
    check_data_unchanged(job.df, job.config, f"fold {k}'s out-of-fold predictions")
    _write_missing_oof(job, k)
    return time.time() - started


# ---------------------------------------------------------------- the folds, shared out over the processes


def _fold_parallel(ctx: DistContext, job: _FoldJob, todo: list, pending: list) -> dict | None:
    """Each process handles its share of the folds (all of them with one process) in fold order; the folds left
    to train are shared out first. Returns this process's timing record (None when it trained nothing)."""
    mine = sorted(ctx.share(pending + [k for k in todo if k not in pending]))
    train = [k for k in mine if k in pending]
    if ctx.enabled:
        logger.info(f"fold-parallel: this process handles folds {mine} of {todo}" if mine else
                    f"fold-parallel: nothing to do here ({len(todo)} folds for {ctx.world_size} processes)")
    with single_process_view(ctx.enabled):
        planner = _start_plan(ctx, job, train, n_models=len(todo)) if train else None
        for k in mine:
            if k not in pending:
                logger.info(f"fold {k}: complete checkpoint found in {fold_dir(job.out, k)}, not retrained")
                check_data_unchanged(job.df, job.config, f"fold {k}")
                _write_missing_oof(job, k)
                continue
            left = [f for f in train if f >= k]
            epochs = planner.before_fold(k, left)
            logger.info(f"fold {k} ({train.index(k) + 1} of {len(train)} to train): {epochs} epochs, about "
                        f"{describe_seconds(sum(planner.fold_seconds(epochs) for _ in left) + planner.final_s)} "
                        "left")
            started = time.time()
            predict_s = _run_fold(job, k, epochs, planner.fold_deadline(left))
            planner.after_fold(k, time.time() - started, predict_s, _epochs_run(job, k))
    return planner.record() if planner is not None else None


def _epochs_run(job: _FoldJob, k: int) -> int | None:
    """The epochs fold k recorded in its history.csv (None when it has none)."""
    path = fold_dir(job.out, k) / "history.csv"
    return len(read_history(path)) if path.is_file() else None


def _start_plan(ctx: DistContext, job: _FoldJob, train: list, n_models: int) -> FoldPlanner:
    """Measure the speed, log the plan before the first fold and warn when one fold will take over an hour."""
    planner = _planner(job, train[0], train, n_models if ctx.is_main else 0)
    logger.info(f"plan: {planner.plan_text(train, ctx.world_size)}")
    warning = planner.hour_warning(train)
    if warning:
        logger.warning(warning)
    return planner


def _data_parallel(ctx: DistContext, job: _FoldJob, todo: list, pending: list, sync_bn) -> None:
    """Every fold trained by all processes together (DDPTrainer); rank 0 writes its checkpoint, history and OOF."""
    from .distributed import DDPTrainer
    logger.info(f"data-parallel: folds {todo} one after another, each on {ctx.world_size} processes "
                f"(global batch {job.recipe.bs}, {job.recipe.bs // ctx.world_size} per process)")
    for k in todo:
        folder = fold_dir(job.out, k)
        if k in pending:
            if ctx.is_main:
                clear_fold(folder)
            _train_fold(job, k, epochs=job.recipe.epochs, out=job.out if ctx.is_main else None,
                        cbs=[DDPTrainer(sync_bn=sync_bn)])
        elif ctx.is_main:
            logger.info(f"fold {k}: complete checkpoint found in {folder}, not retrained")
        ctx.on_main(lambda k=k: _write_missing_oof(job, k))  # the others wait (long timeout) while rank 0 predicts


# ---------------------------------------------------------------- train_kfold


class _Forward(logging.Handler):
    """Sends artlearn's log messages to a callable (train_kfold's `log=`)."""

    def __init__(self, fn):
        super().__init__(logging.INFO)
        self.fn = fn

    def emit(self, record):
        self.fn(record.getMessage())


def train_kfold(df: pd.DataFrame, out, n_folds: int = 4, folds=None, preset: str | None = "reference",
                seed: int = 42, workers: int | None = None, progress: bool = True,
                cache: PresizeCache | None = None, cbs=None, log=None, ddp: bool = False,
                sync_bn: bool | None = None, overwrite: bool = False, protect=(), budget=None,
                predict_after: int = 0, procs: int | None = None, **overrides) -> KFoldRun:
    """Train the folds into `out` (resumable), then write OOF scores and summary.json.

    `preset` ('reference', 'best' or 'fast') supplies every `Recipe` setting; `overrides` (the same names: arch,
    size, epochs, lr, min_scale, ...) replace them. Everything (arguments, table, identical images, every image's
    pixels, the run directory) is validated before anything is written. A fold whose checkpoint is complete is not
    retrained; an interrupted fold restarts from scratch; a run directory made with another configuration or other
    data is refused (`overwrite=True` deletes the files artlearn wrote there first, after every check). `out` must
    be a new or empty folder or an artlearn run, and never holds the images (or the `protect` paths); a lock file
    refuses a second process training into it. `cbs`: extra fastai callbacks (classes or factories, made anew for
    every fold). Messages go to the 'artlearn' logger (`log=callable` receives them too). `tta` (a setting like the
    others: 'flip', 'multicrop' or None/'none') is the view set of the OOF predictions.

    Before the first fold the speed of this machine is measured on a few batches and the plan is logged ("4 folds x
    30 epochs at 288 px, about 6.1 h on this machine"), with a warning when one fold will take over an hour.
    `budget` ('60min', '1.5h', or seconds) makes the run fit that wall time, counted from this call: the epochs
    are planned from the measured speed (replacing `epochs`), re-planned after every fold from what it took, and
    `predict_after` images (a test set the caller predicts with the fold ensemble afterwards) are kept time for;
    with `size_by_budget` (preset 'fast') the size is chosen too: the largest that keeps the recipe's epochs.
    `procs`: processes training folds side by side on the CPU, each with its share of the cores (None: one per core
    with a budget on a CPU, where that is measured faster than one process using every core; else 1).
    summary.json's 'timing' records the plan and what each fold took.

    Launched by torchrun (WORLD_SIZE > 1), the processes share the work (see `artlearn.distributed`): by default
    each process trains its own folds (fold-parallel); with `ddp=True` every fold is trained by all processes
    together (DistributedDataParallel, `bs` is the global batch; `sync_bn`: SyncBatchNorm, default on CUDA).
    Rank 0 holds the lock and writes config.json, folds.csv and summary.json; every rank returns the finished run.
    """
    if log is not None and not callable(log):
        raise ValueError(f"log={log!r}: pass None (the 'artlearn' logger) or a callable taking each message")
    handler, level = (_Forward(log) if log is not None else None), logger.level
    if handler is not None:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        run_args = _RunArgs(n_folds, folds, preset, seed, workers, progress, cbs, ddp, sync_bn, overwrite,
                            list(protect or ()), parse_budget(budget), predict_after, procs, time.time())
        return _train_kfold(df, Path(out), cache, run_args, overrides, log is not None)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)


@dataclass
class _RunArgs:
    """train_kfold's own arguments (not recipe settings), as given."""
    n_folds: int
    folds: object
    preset: str | None
    seed: int
    workers: int | None
    progress: bool
    cbs: object
    ddp: bool
    sync_bn: bool | None
    overwrite: bool
    protect: list
    budget_s: float | None
    predict_after: int
    procs: int | None
    started: float
    size_planned: bool = False  # a fold process: the parent chose the budget's size


def _check_out(out: Path, config: dict, legacy: dict, protect: list, overwrite: bool) -> None:
    """Refuse a run directory artlearn may not use, or (unless overwriting) one made with other settings or data."""
    if check_out_dir(out, protect) and not overwrite:
        check_config(out, config, legacy)


def _open_run(stack: ExitStack, out: Path, config: dict, legacy: dict, protect: list, overwrite: bool,
              df: pd.DataFrame) -> None:
    """Take the run's lock (held until `stack` closes), check the directory again under it, write config and folds."""
    stack.enter_context(run_lock(out))
    if check_out_dir(out, protect):
        if overwrite:
            logger.info(f"--overwrite: deleting the run in {out}")
            clear_run(out)
        else:
            check_config(out, config, legacy)
    write_run_dir(out, config, df)


def _check_budget_args(a: _RunArgs, ctx: DistContext) -> None:
    """ValueError for a bad predict_after or procs, or a budget with data-parallel folds."""
    if isinstance(a.predict_after, bool) or not isinstance(a.predict_after, (int, np.integer)) or a.predict_after < 0:
        raise ValueError(f"predict_after={a.predict_after!r}: need the number of images predicted after training "
                         "(an integer >= 0)")
    if a.procs is not None and (isinstance(a.procs, bool) or not isinstance(a.procs, (int, np.integer))
                                or a.procs < 1):
        raise ValueError(f"procs={a.procs!r}: need None (automatic) or a number of processes >= 1")
    if a.budget_s is not None and a.ddp and ctx.enabled:
        raise ValueError("a time budget plans fold-parallel runs; drop ddp=True (--ddp) or the budget")


def _process_count(a: _RunArgs, ctx: DistContext, n_todo: int, cbs_given: bool) -> int:
    """Processes to spawn for fold-parallel CPU training (1: train here). Automatic: one per core with a budget on
    a CPU (two single-threaded processes trained fold 0 about 3x faster than one two-threaded one on the 2-core
    machine, docs/performance.md)."""
    import torch
    if ctx.enabled or n_todo < 2:
        return 1
    if a.procs is None:
        if a.budget_s is None or torch.cuda.is_available() or cbs_given:
            return 1
        return min(cpu_count(), n_todo)
    if a.procs > 1 and cbs_given:
        raise ValueError(f"procs={a.procs}: extra callbacks (cbs=, log=) cannot travel to other processes; use "
                         "procs=1, or drop them")
    return min(int(a.procs), n_todo)


def _train_kfold(df, out, cache, a: _RunArgs, overrides, log_given: bool) -> KFoldRun:
    """train_kfold's sequence: check everything, fill the store, lock and write the run dir, run the folds, finish."""
    _check_run_args(a.n_folds, a.seed, a.workers, a.overwrite)
    if "tta" in overrides and overrides["tta"] is None:
        overrides = {**overrides, "tta": "none"}  # tta=None means no TTA, as in ensemble(), not "the preset's"
    if overrides.get("size") is not None and overrides.get("size_by_budget") is None:
        overrides = {**overrides, "size_by_budget": False}  # a size given explicitly is the size trained
    recipe = Recipe.preset("reference" if a.preset is None else a.preset).replace(**overrides).validate()
    todo = _folds_to_train(a.folds, a.n_folds)
    makers = _callback_factories(a.cbs)
    ctx = init_distributed()
    _check_budget_args(a, ctx)
    if a.ddp and ctx.enabled:
        ctx.check_ddp(recipe.bs, a.sync_bn)
    df, digests = _prepare_folds(df, a.n_folds, a.seed)
    _check_splits(df, a.n_folds, recipe, recipe.bs // ctx.world_size if a.ddp and ctx.enabled else recipe.bs)
    procs = _process_count(a, ctx, len(todo), bool(makers) or log_given)
    recipe = _budget_sized(recipe, df, Path(out), a, ctx, procs, todo)
    overrides = {**overrides, "size": recipe.size, "size_by_budget": recipe.size_by_budget}
    settings = {**recipe.as_dict(), **({"epochs": None} if a.budget_s is not None else {})}  # a budget plans them
    config = run_config(settings, df, digests, preset=a.preset, n_folds=a.n_folds, seed=a.seed, budget=a.budget_s)
    legacy, protect = {"data": data_fingerprint(df)}, [*df["img_path"], *a.protect]
    ctx.everywhere(lambda: _check_out(out, config, legacy, protect, a.overwrite))
    if procs > 1:
        return _spawn_folds(df, out, a, overrides, procs)
    if cache is None:
        memory = default_memory_budget() // ctx.local_world_size
        side = store_presize(recipe.store, recipe.size, recipe.min_scale, len(df), memory)
        cache = PresizeCache(side, max_memory=memory)
    filling = time.time()
    ctx.everywhere(lambda: cache.fill(df["img_path"], source="training table"))  # unreadable images refused here
    decode_image_s = (time.time() - filling) / len(df)
    with ExitStack() as stack:
        ctx.on_main(lambda: _open_run(stack, out, config, legacy, protect, a.overwrite, df))
        if ctx.enabled:
            ctx.everywhere(lambda: check_config(out, config, legacy))
        job = _FoldJob(df=df, out=out, recipe=recipe, cache=cache, n_folds=a.n_folds, seed=a.seed,
                       workers=a.workers, progress=bool(a.progress and ctx.is_main), cbs=makers, config=config,
                       budget_s=a.budget_s, started=a.started, predict_after=a.predict_after,
                       decode_image_s=decode_image_s)
        pending = ctx.broadcast([k for k in todo if not fold_is_complete(fold_dir(out, k), config)]
                                if ctx.is_main else None)
        with ctx.tagged_logs(logger):
            if a.ddp and ctx.enabled:
                _data_parallel(ctx, job, todo, pending, a.sync_bn)
                records = []
            else:
                records = ctx.gather(_fold_parallel(ctx, job, todo, pending))
            ctx.barrier()
            timing = _timing(records, a, ctx)
            run = ctx.on_main(lambda: (ctx.await_files(out, todo), finish_run(out, df, timing=timing))[1])
    return run if ctx.is_main else load_run(out)


def _timing(records: list, a: _RunArgs, ctx: DistContext) -> dict:
    """summary.json's 'timing': the budget, the processes, and the planned and actual seconds of every fold."""
    folds, first = {}, next((r for r in records if r), {})
    for record in records:
        folds.update((record or {}).get("folds", {}))
    return dict(budget_seconds=a.budget_s, train_seconds=round(time.time() - a.started, 1), cpu_count=cpu_count(),
                processes=ctx.world_size, threads_per_process=first.get("threads"),
                seconds_per_epoch_measured=first.get("seconds_per_epoch_measured"),
                folds=dict(sorted(folds.items(), key=lambda kv: int(kv[0]))))


# ---------------------------------------------------------------- fold-parallel processes on one machine


def _spawn_folds(df: pd.DataFrame, out: Path, a: _RunArgs, overrides: dict, procs: int) -> KFoldRun:
    """Train the folds in `procs` processes of this machine (torch.multiprocessing, the torchrun code path), each
    with its share of the cores; a refusal in a process comes back as a ValueError here."""
    import torch.multiprocessing as mp
    threads = max(1, cpu_count() // procs)
    logger.info(f"fold-parallel on this machine: {procs} processes x {threads} thread{'s' if threads > 1 else ''}")
    kwargs = dict(n_folds=a.n_folds, folds=a.folds, preset=a.preset, seed=a.seed, workers=a.workers,
                  progress=a.progress, overwrite=a.overwrite, protect=a.protect, budget=a.budget_s,
                  predict_after=a.predict_after, procs=1, size_planned=True, **overrides)
    errors = mp.get_context("spawn").SimpleQueue()
    port = _free_port()
    try:
        with _children_quiet_about_fastai_import():
                mp.start_processes(_fold_process, args=(procs, threads, port, df, str(out), kwargs, a.started, errors,
                                                    logger.getEffectiveLevel()), nprocs=procs, start_method="spawn")
    except mp.ProcessExitedException:
        if not errors.empty():
            raise ValueError(errors.get()) from None
        raise
    return load_run(out)


@contextlib.contextmanager
def _children_quiet_about_fastai_import():
    """Spawned processes import fastai before any artlearn code runs in them: the one FutureWarning artlearn's own
    import hides (fastai's `torch.jit.script`, see artlearn/__init__.py) is hidden there through PYTHONWARNINGS."""
    rule = "ignore:`torch.jit.script` is deprecated:FutureWarning"
    before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = f"{before},{rule}" if before else rule
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = before


def _free_port() -> int:
    """A free TCP port on the loopback interface for the processes' rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fold_process(rank: int, procs: int, threads: int, port: int, df, out: str, kwargs: dict, started: float,
                  errors, level: int) -> None:
    """One spawned fold-parallel process: torchrun's environment, its thread count, then train_kfold."""
    import sys

    import torch
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_WORLD_SIZE=str(procs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    if not (logger.handlers or logging.getLogger().handlers):  # the caller's script may configure logging itself
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    from .distributed import shutdown
    try:
        args = _RunArgs(kwargs.pop("n_folds"), kwargs.pop("folds"), kwargs.pop("preset"), kwargs.pop("seed"),
                        kwargs.pop("workers"), kwargs.pop("progress"), None, False, None, kwargs.pop("overwrite"),
                        kwargs.pop("protect"), kwargs.pop("budget"), kwargs.pop("predict_after"), kwargs.pop("procs"),
                        started, kwargs.pop("size_planned"))
        _train_kfold(df, Path(out), None, args, kwargs, False)
    except ValueError as e:
        errors.put(str(e))
        sys.exit(2)
    finally:
        shutdown()


def finish_run(out, df: pd.DataFrame | None = None, select=None, timing: dict | None = None) -> KFoldRun:
    """Score the out-of-fold predictions, write them all to oof.csv, select the folds, write summary.json.

    `select`: None (select_folds' default rule), a rule name ('complete', 'stable') or the folds to ensemble;
    `timing`: the run's plan and seconds (None keeps what summary.json holds)."""
    from . import __version__
    out = Path(out)
    if not (out / CONFIG_NAME).is_file():
        raise ValueError(f"{out}: not an artlearn run directory (no config.json); train one with train_kfold")
    with run_lock(out):
        run = load_run(out)
        by_rule = isinstance(select, str)
        chosen = dict(rule=select) if by_rule else dict(folds=select)
        selection = select_folds(run, **chosen) if run.folds or (select is not None and not by_rule) else None
        if df is None and (run.path / FOLDS_NAME).is_file():
            df = read_folds(run.path / FOLDS_NAME)
        if run.oof is not None:
            atomic_write_csv(run.path / OOF_NAME, run.oof)
        best = run.best
        summary = dict(
            folds=json.loads(best.to_json(orient="index")) if len(best) else {},
            oof=run.oof_scores,
            majority_baseline=majority_baseline(df) if df is not None else None,
            selection=selection.as_dict() if selection is not None else None,
            ignored=dict(run.ignored),
            timing=_merged_timing(_previous_timing(run.path), timing),
            library_version=__version__)
        atomic_write_json(run.path / SUMMARY_NAME, summary)
    run.summary = summary
    return run


def _previous_timing(out: Path) -> dict | None:
    """The 'timing' entry of an existing summary.json (kept when the folds are only re-selected)."""
    path = out / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("timing")
    except (OSError, ValueError, AttributeError):
        return None


def _merged_timing(previous: dict | None, timing: dict | None) -> dict | None:
    """This call's timing, keeping the records of folds trained by earlier calls of a resumed run."""
    if timing is None or previous is None:
        return timing if timing is not None else previous
    return {**timing, "folds": {**(previous.get("folds") or {}), **(timing.get("folds") or {})}}


def record_wall_time(out, seconds: float) -> None:
    """Add the whole run's wall time (training, ensemble, submission: what the caller measured) to summary.json."""
    path = Path(out) / SUMMARY_NAME
    summary = json.loads(path.read_text())
    summary["timing"] = {**(summary.get("timing") or {}), "wall_seconds": round(float(seconds), 1)}
    atomic_write_json(path, summary)
