"""`train_kfold`: stratified K-fold training into a resumable run directory, then OOF scores and fold selection.

One orchestration path serves one process and torchrun alike: with one process the distributed context is a
no-op; under torchrun the folds are shared out (fold-parallel) or each fold is trained by every process (`ddp`).
"""
import copy
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .checks import check_choice
from .distributed import DistContext, init_distributed, single_process_view
from .ensemble import ensemble
from .files import atomic_write_csv, atomic_write_json
from .folds import assign_folds, check_duplicates, check_fold_groups, check_n_folds
from .recipe import Recipe
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
    run_config,
    run_lock,
    write_run_dir,
)
from .store import PresizeCache, default_memory_budget, store_presize
from .tables import content_digests, validate_table

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


def _train_fold(job: _FoldJob, k: int, **learner_kw) -> None:
    """Build fold k's DataLoaders and Learner and fit it (`learner_kw` overrides artist_learner's arguments)."""
    from .dls import artist_dls
    from .learner import artist_learner
    data_kw = job.recipe.kwargs_for("dls")
    start = time.time()
    dls = artist_dls(job.df, fold=k, n_folds=job.n_folds, seed=job.seed, cache=job.cache, workers=job.workers,
                     **data_kw)
    kw = dict(seed=job.seed + k, out=job.out, fold=k, progress=job.progress, **job.recipe.kwargs_for("learner"))
    kw.update(learner_kw)
    kw["cbs"] = [*(kw.get("cbs") or []), *(make() for make in job.cbs)]
    if job.recipe.progressive:
        kw["cbs"].append(_progressive_callback(job, k, data_kw))
    learn = artist_learner(dls, **kw)
    _fit_fold(learn, job.recipe.epochs, k)
    logger.info(f"fold {k}: trained in {time.time() - start:.0f} s")


def _progressive_callback(job: _FoldJob, k: int, data_kw: dict):
    """ProgressiveResize training the first `progressive` fraction of the epochs at half the size."""
    from .callbacks import ProgressiveResize
    from .dls import artist_dls
    small = artist_dls(job.df, fold=k, n_folds=job.n_folds, seed=job.seed, cache=job.cache, workers=job.workers,
                       **{**data_kw, "size": max(8, data_kw["size"] // 2)})
    return ProgressiveResize(small.train, round(job.recipe.progressive * job.recipe.epochs))


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


def _run_fold(job: _FoldJob, k: int) -> None:
    """Fold k, resumably: skip it when its checkpoint is complete, else train it afresh; then write its OOF."""
    folder = fold_dir(job.out, k)
    check_data_unchanged(job.df, job.config, f"fold {k}")  # issue 29: images changed under the run are named
    if fold_is_complete(folder, job.config):
        logger.info(f"fold {k}: complete checkpoint found in {folder}, not retrained")
    else:
        clear_fold(folder)
        _train_fold(job, k)
        check_data_unchanged(job.df, job.config, f"fold {k}'s out-of-fold predictions")
    _write_missing_oof(job, k)


# ---------------------------------------------------------------- the folds, shared out over the processes


def _fold_parallel(ctx: DistContext, job: _FoldJob, todo: list, pending: list) -> None:
    """Each process handles its share of the folds (all of them with one process), folds left to train first."""
    mine = ctx.share(pending + [k for k in todo if k not in pending])
    if ctx.enabled:
        logger.info(f"fold-parallel: this process handles folds {sorted(mine)} of {todo}" if mine else
                    f"fold-parallel: nothing to do here ({len(todo)} folds for {ctx.world_size} processes)")
    started = time.time()
    with single_process_view(ctx.enabled):
        for i, k in enumerate(mine):
            _log_progress(i, len(mine), k, started)
            _run_fold(job, k)


def _log_progress(i: int, n: int, k: int, started: float) -> None:
    """'fold k (i+1 of n), ETA ...' from the mean time of the folds done so far."""
    eta = "" if i == 0 else f", about {(time.time() - started) / i * (n - i) / 60:.1f} min left"
    logger.info(f"fold {k} ({i + 1} of {n}){eta}")


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
            _train_fold(job, k, out=job.out if ctx.is_main else None, cbs=[DDPTrainer(sync_bn=sync_bn)])
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
                sync_bn: bool | None = None, overwrite: bool = False, protect=(), **overrides) -> KFoldRun:
    """Train the folds one after another into `out` (resumable), then write OOF scores and summary.json.

    `preset` ('reference' or 'best') supplies every `Recipe` setting; `overrides` (the same names: arch, size,
    epochs, lr, min_scale, ...) replace them. Everything (arguments, table, identical images, every image's pixels,
    the run directory) is validated before anything is written. A fold whose checkpoint is complete is not
    retrained; an interrupted fold restarts from scratch; a run directory made with another configuration or other
    data is refused (`overwrite=True` deletes the files artlearn wrote there first, after every check). `out` must
    be a new or empty folder or an artlearn run, and never holds the images (or the `protect` paths); a lock file
    refuses a second process training into it. `cbs`: extra fastai callbacks (classes or factories, made anew for
    every fold). Messages go to the 'artlearn' logger (`log=callable` receives them too). `tta` (a setting like the
    others: 'flip', 'multicrop' or None/'none') is the view set of the OOF predictions.

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
        return _train_kfold(df, Path(out), n_folds, folds, preset, seed, workers, progress, cache, cbs, ddp,
                            sync_bn, overwrite, list(protect or ()), overrides)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)


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


def _train_kfold(df, out, n_folds, folds, preset, seed, workers, progress, cache, cbs, ddp, sync_bn, overwrite,
                 protect, overrides) -> KFoldRun:
    """train_kfold's sequence: check everything, fill the store, lock and write the run dir, run the folds, finish."""
    _check_run_args(n_folds, seed, workers, overwrite)
    if "tta" in overrides and overrides["tta"] is None:
        overrides = {**overrides, "tta": "none"}  # tta=None means no TTA, as in ensemble(), not "the preset's"
    recipe = Recipe.preset("reference" if preset is None else preset).replace(**overrides).validate()
    todo = _folds_to_train(folds, n_folds)
    makers = _callback_factories(cbs)
    ctx = init_distributed()
    if ddp and ctx.enabled:
        ctx.check_ddp(recipe.bs, sync_bn)
    df, digests = _prepare_folds(df, n_folds, seed)
    _check_splits(df, n_folds, recipe, recipe.bs // ctx.world_size if ddp and ctx.enabled else recipe.bs)
    config = run_config(recipe.as_dict(), df, digests, preset=preset, n_folds=n_folds, seed=seed)
    legacy, protect = {"data": data_fingerprint(df)}, [*df["img_path"], *protect]
    ctx.everywhere(lambda: _check_out(out, config, legacy, protect, overwrite))
    if cache is None:
        budget = default_memory_budget() // ctx.local_world_size
        side = store_presize(recipe.store, recipe.size, recipe.min_scale, len(df), budget)
        cache = PresizeCache(side, max_memory=budget)
    ctx.everywhere(lambda: cache.fill(df["img_path"], source="training table"))  # unreadable images refused here
    with ExitStack() as stack:
        ctx.on_main(lambda: _open_run(stack, out, config, legacy, protect, overwrite, df))
        if ctx.enabled:
            ctx.everywhere(lambda: check_config(out, config, legacy))
        job = _FoldJob(df=df, out=out, recipe=recipe, cache=cache, n_folds=n_folds, seed=seed, workers=workers,
                       progress=bool(progress and ctx.is_main), cbs=makers, config=config)
        pending = ctx.broadcast([k for k in todo if not fold_is_complete(fold_dir(out, k), config)]
                                if ctx.is_main else None)
        with ctx.tagged_logs(logger):
            if ddp and ctx.enabled:
                _data_parallel(ctx, job, todo, pending, sync_bn)
            else:
                _fold_parallel(ctx, job, todo, pending)
            ctx.barrier()
            run = ctx.on_main(lambda: (ctx.await_files(out, todo), finish_run(out, df))[1])
    return run if ctx.is_main else load_run(out)


def finish_run(out, df: pd.DataFrame | None = None, select=None) -> KFoldRun:
    """Score the out-of-fold predictions, write them all to oof.csv, select the folds, write summary.json.

    `select`: None (select_folds' default rule), a rule name ('complete', 'stable') or the folds to ensemble."""
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
            library_version=__version__)
        atomic_write_json(run.path / SUMMARY_NAME, summary)
    run.summary = summary
    return run
