"""Stratified K-fold training into a resumable run directory, out-of-fold scores and fold selection."""
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .checkpoint import atomic_write_csv, atomic_write_json
from .data import PresizeCache, _check_files_exist, _check_ids, _check_labels, assign_folds, presize_for
from .presets import resolve_preset

HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "train_acc", "valid_acc", "f1_macro", "lr", "seconds"]
RUNTIME_KEYS = ("folds", "workers", "progress", "device", "library_version", "created")


# ---------------------------------------------------------------- the run object


@dataclass
class KFoldRun:
    """A run directory read back: config, per-fold histories and metadata, out-of-fold predictions, summary."""
    path: Path
    config: dict
    histories: dict = field(default_factory=dict)
    metas: dict = field(default_factory=dict)
    oof: pd.DataFrame | None = None
    summary: dict = field(default_factory=dict)

    def fold_dir(self, fold: int) -> Path:
        """The folder of one fold."""
        return self.path / f"fold{fold}"

    @property
    def folds(self) -> list:
        """Folds whose checkpoint is complete."""
        return sorted(k for k, m in self.metas.items() if m.get("complete"))

    @property
    def vocab(self) -> list:
        """The artist vocabulary shared by the folds."""
        return next(iter(self.metas.values()))["vocab"] if self.metas else []

    @property
    def best(self) -> pd.DataFrame:
        """One row per fold: best epoch and its scores, status."""
        rows = [_best_row(k, self.histories.get(k), m) for k, m in sorted(self.metas.items())]
        return pd.DataFrame(rows).set_index("fold") if rows else pd.DataFrame()

    @property
    def oof_scores(self) -> dict:
        """Out-of-fold accuracy and macro-F1 over every trained fold."""
        return oof_scores(self.oof) if self.oof is not None and len(self.oof) else {}

    def __repr__(self) -> str:
        return f"KFoldRun({str(self.path)!r}, folds={self.folds}, oof={self.oof_scores})"


def _best_row(fold: int, history: pd.DataFrame | None, meta: dict) -> dict:
    """Scores of a fold's best (checkpointed) epoch."""
    row = dict(fold=fold, epoch=meta.get("epoch"), monitor=meta.get("monitor"), score=meta.get("score"),
               status=fold_status(meta))
    if history is not None and len(history) and meta.get("epoch") is not None:
        at = history[history["epoch"] == meta["epoch"]]
        if len(at):
            row.update({c: float(at.iloc[0][c]) for c in ("valid_loss", "valid_acc", "f1_macro")})
    return row


def fold_status(meta: dict) -> str:
    """'complete', 'stopped: ...' or 'incomplete'."""
    if meta.get("stopped"):
        return f"stopped: {meta['stopped']}"
    return "complete" if meta.get("complete") else "incomplete"


def _read_json(path: Path) -> dict:
    """A JSON file, with an error naming it when unreadable."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged — delete the fold folder to "
                         "retrain") from None


def load_run(path) -> KFoldRun:
    """Read a run directory written by train_kfold."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not an artlearn run directory (no config.json); train one with train_kfold")
    run = KFoldRun(path=path, config=_read_json(path / "config.json"))
    for fold_dir in sorted(path.glob("fold*")):
        if not fold_dir.name[4:].isdigit() or not (fold_dir / "meta.json").is_file():
            continue
        k = int(fold_dir.name[4:])
        run.metas[k] = _read_json(fold_dir / "meta.json")
        if (fold_dir / "history.csv").is_file():
            run.histories[k] = pd.read_csv(fold_dir / "history.csv")
    oofs = [pd.read_csv(run.fold_dir(k) / "oof.csv") for k in run.folds if (run.fold_dir(k) / "oof.csv").is_file()]
    run.oof = pd.concat(oofs, ignore_index=True) if oofs else None
    if (path / "summary.json").is_file():
        run.summary = _read_json(path / "summary.json")
    return run


# ---------------------------------------------------------------- scores


def oof_scores(oof: pd.DataFrame) -> dict:
    """Accuracy and macro-F1 of out-of-fold predictions."""
    from sklearn.metrics import accuracy_score, f1_score
    return dict(accuracy=float(accuracy_score(oof["artist"], oof["pred"])),
                f1_macro=float(f1_score(oof["artist"], oof["pred"], average="macro", zero_division=0)),
                n=int(len(oof)), folds=sorted(int(f) for f in oof["fold"].unique()))


def majority_baseline(df: pd.DataFrame) -> dict:
    """Scores of always predicting the most frequent artist."""
    from sklearn.metrics import f1_score
    top = df["artist"].value_counts().index[0]
    return dict(artist=str(top), accuracy=float((df["artist"] == top).mean()),
                f1_macro=float(f1_score(df["artist"], [top] * len(df), average="macro", zero_division=0)))


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
                 max_gap: float = 0.05, score: str = "valid_acc") -> FoldSelection:
    """Choose the stable folds: reproducible rule over the histories, or the folds named by hand.

    Rule: a complete fold is excluded when (a) its valid-loss volatility (std of epoch-to-epoch changes over the second
    half of training, relative to the mean loss there) exceeds both `min_volatility` and `max_volatility_ratio` times
    the median volatility of the folds, or (b) its best `score` is more than `max_gap` below the median best score of
    the folds. Incomplete or stopped folds are always excluded. At least the best fold is kept.
    """
    run = run if isinstance(run, KFoldRun) else load_run(run)
    rows = {}
    for k in sorted(run.metas):
        h = run.histories.get(k)
        best = _best_row(k, h, run.metas[k])
        rows[k] = dict(status=best["status"], best=best.get(score, np.nan),
                       volatility=_volatility(h) if h is not None and len(h) else float("nan"))
    table = pd.DataFrame.from_dict(rows, orient="index")
    if folds is not None:
        chosen = [int(f) for f in folds]
        unknown = [f for f in chosen if f not in run.folds]
        if unknown:
            raise ValueError(f"folds {unknown} have no complete checkpoint in {run.path}; complete folds: {run.folds}")
        excluded = {k: "not named by hand" for k in run.metas if k not in chosen}
        return FoldSelection(chosen, excluded, "folds named by hand", table)
    excluded = {k: f"fold is {r['status']}" for k, r in rows.items() if r["status"] != "complete"}
    ok = table[table["status"] == "complete"]
    if ok.empty:
        raise ValueError(f"{run.path}: no fold has a complete checkpoint; train the run first (train_kfold)")
    med_vol, med_best = float(np.nanmedian(ok["volatility"])), float(np.nanmedian(ok["best"]))
    for k, r in ok.iterrows():
        limit = max(min_volatility, max_volatility_ratio * med_vol)
        if not np.isfinite(r["volatility"]) or r["volatility"] > limit:
            excluded[k] = (f"unstable valid loss: volatility {r['volatility']:.3f} > {limit:.3f} "
                           f"({max_volatility_ratio:g} x median {med_vol:.3f}, floor {min_volatility:g})")
        elif r["best"] < med_best - max_gap:
            excluded[k] = f"best {score} {r['best']:.3f} is more than {max_gap:g} below the median {med_best:.3f}"
    chosen = [int(k) for k in ok.index if k not in excluded]
    if not chosen:
        keep = int(ok["best"].idxmax())
        chosen, excluded = [keep], {k: v for k, v in excluded.items() if k != keep}
    rule = (f"exclude incomplete folds; volatility > max({min_volatility:g}, {max_volatility_ratio:g} x median); "
            f"best {score} < median - {max_gap:g}; keep at least the best fold")
    return FoldSelection(chosen, dict(sorted(excluded.items())), rule, table)


# ---------------------------------------------------------------- training


def data_fingerprint(df: pd.DataFrame) -> str:
    """Hash of the (img_path, artist, fold) assignment, to refuse mixing runs over different data."""
    cols = [c for c in ("img_path", "artist", "fold") if c in df.columns]
    text = df[cols].astype(str).sort_values(cols).to_csv(index=False)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _check_config(out: Path, config: dict) -> None:
    """Refuse a run directory made with different settings or data."""
    old = _read_json(out / "config.json")
    diffs = [f"{k}: {old.get(k)!r} in the run dir, {config.get(k)!r} now" for k in sorted(set(old) | set(config))
             if k not in RUNTIME_KEYS and old.get(k) != config.get(k)]
    if diffs:
        raise ValueError(f"{out} was made with a different configuration ({'; '.join(diffs)}); use another --out "
                         "folder, or delete this one to start over")


def _fold_is_complete(fold_dir: Path) -> bool:
    """A fold is done when meta.json says complete and its weights file exists."""
    meta_path = fold_dir / "meta.json"
    if not meta_path.is_file() or not (fold_dir / "best.safetensors").is_file():
        return False
    meta = _read_json(meta_path)
    return bool(meta.get("complete") or meta.get("stopped"))


def _clear_fold(fold_dir: Path) -> None:
    """Remove the files of an interrupted fold so it restarts cleanly."""
    if fold_dir.is_dir():
        for f in fold_dir.iterdir():
            if f.is_file():
                f.unlink()


def _write_oof(run_dir: Path, fold: int, df: pd.DataFrame, cache: PresizeCache, tta, bs: int, workers) -> None:
    """Predict a fold's validation rows with its best checkpoint and write fold<k>/oof.csv."""
    from .ensemble import ensemble
    valid = df[df["fold"] == fold]
    probs, vocab = ensemble([run_dir / f"fold{fold}"], valid, tta=tta, bs=bs, cache=cache, workers=workers)
    cols = [c for c in ("id", "img_path", "fold", "artist") if c in valid.columns]
    oof = valid[cols].reset_index(drop=True)
    oof["pred"] = [vocab[i] for i in probs.argmax(1)]
    oof = pd.concat([oof, pd.DataFrame(probs, columns=[f"p_{a}" for a in vocab])], axis=1)
    atomic_write_csv(run_dir / f"fold{fold}" / "oof.csv", oof)


def _prepare_folds(df: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """The training table (labels, ids and files checked) with a validated fold column."""
    for col in ("img_path", "artist"):
        if col not in df.columns:
            raise ValueError(f"train_kfold needs columns 'img_path' and 'artist' (missing {col!r}); "
                             "use read_artworks(train.csv)")
    _check_labels(df, "training table")
    if "id" in df.columns:
        _check_ids(df, "training table")
    _check_files_exist(df, "training table")
    if "fold" in df.columns:
        bad = sorted(set(df["fold"]) - set(range(n_folds)))
        if bad:
            raise ValueError(f"column 'fold' has values {bad[:5]} outside 0..{n_folds - 1} (n_folds={n_folds})")
        return df.reset_index(drop=True)
    return assign_folds(df, n_folds, seed).reset_index(drop=True)


def _folds_to_train(folds, n_folds: int) -> list:
    """Validated list of folds asked for."""
    chosen = list(range(n_folds)) if folds is None else sorted({int(f) for f in folds})
    bad = [f for f in chosen if not 0 <= f < n_folds]
    if bad:
        raise ValueError(f"folds {bad} out of range: with n_folds={n_folds} use 0..{n_folds - 1}")
    return chosen


@dataclass
class _FoldJob:
    """Everything needed to train, resume and score one fold of a run (shared by every fold of `train_kfold`)."""
    df: pd.DataFrame
    out: Path
    settings: dict
    cache: PresizeCache
    n_folds: int
    seed: int
    tta: str | None
    workers: int | None
    progress: bool
    log: object = print


def _write_run_dir(out: Path, config: dict, df: pd.DataFrame) -> None:
    """Create the run directory: config.json (unless there) and folds.csv (a config.json there is checked first)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.json").is_file():
        atomic_write_json(out / "config.json", config)
    fold_cols = [c for c in ("id", "img_path", "artist", "fold") if c in df.columns]
    atomic_write_csv(out / "folds.csv", df[fold_cols])


def _train_fold(job: _FoldJob, k: int, **learner_kw) -> None:
    """Build fold k's DataLoaders and Learner and fit it (`learner_kw` overrides artist_learner's arguments)."""
    from .data import artist_dls
    from .learner import artist_learner
    data_kw, learn_kw = _split_settings(job.settings)
    progressive = learn_kw.pop("progressive", 0.0)
    start = time.time()
    dls = artist_dls(job.df, fold=k, n_folds=job.n_folds, seed=job.seed, cache=job.cache, workers=job.workers,
                     **data_kw)
    kw = dict(seed=job.seed + k, out=job.out, fold=k, progress=job.progress, **learn_kw)
    kw.update(learner_kw)
    if progressive:
        kw["cbs"] = [*(kw.get("cbs") or []), _progressive_callback(job, k, data_kw, progressive)]
    learn = artist_learner(dls, **kw)
    _fit_fold(learn, job.settings, k, job.log)
    job.log(f"fold {k}: trained in {time.time() - start:.0f} s")


def _progressive_callback(job: _FoldJob, k: int, data_kw: dict, fraction: float):
    """ProgressiveResize training the first `fraction` of the epochs at half the size (same cache and folds)."""
    from .callbacks import ProgressiveResize
    from .data import artist_dls
    if not 0 < fraction < 1:
        raise ValueError(f"progressive={fraction!r}: the fraction of epochs at half size must be in (0, 1)")
    small = artist_dls(job.df, fold=k, n_folds=job.n_folds, seed=job.seed, cache=job.cache, workers=job.workers,
                       **{**data_kw, "size": max(8, data_kw["size"] // 2)})
    return ProgressiveResize(small.train, round(fraction * job.settings["epochs"]))


def _run_fold(job: _FoldJob, k: int) -> None:
    """Fold k, resumably: skip it when its checkpoint is complete, else train it afresh; then write its OOF."""
    fold_dir = job.out / f"fold{k}"
    if _fold_is_complete(fold_dir):
        job.log(f"fold {k}: complete checkpoint found in {fold_dir}, not retrained")
    else:
        _clear_fold(fold_dir)
        _train_fold(job, k)
    _write_missing_oof(job, k)


def _write_missing_oof(job: _FoldJob, k: int) -> None:
    """Write fold<k>/oof.csv when the fold is complete and its OOF is not there yet."""
    fold_dir = job.out / f"fold{k}"
    if not (fold_dir / "oof.csv").is_file() and _fold_is_complete(fold_dir):
        _write_oof(job.out, k, job.df, job.cache, job.tta, job.settings["bs"], job.workers)


def train_kfold(df: pd.DataFrame, out, n_folds: int = 4, folds=None, preset: str | None = "reference",
                arch: str | None = None, pool: str | None = None, size: int | None = None, epochs: int | None = None,
                bs: int | None = None, lr: float | None = None, seed: int = 42, tta: str | None = "flip",
                workers: int | None = None, progress: bool = True, cache: PresizeCache | None = None,
                log=print, ddp: bool = False, sync_bn: bool | None = None, **options) -> KFoldRun:
    """Train the folds one after another into `out` (resumable), then write OOF scores and summary.json.

    `preset` ('reference' or 'best') supplies every default; explicit arguments override it. A fold whose checkpoint
    is complete is not retrained; an interrupted fold restarts from scratch. A run directory made with another
    configuration or other data is refused.

    Launched by torchrun (WORLD_SIZE > 1), the processes share the work (see `artlearn.distributed`): by default
    each process trains its own folds (fold-parallel); with `ddp=True` every fold is trained by all processes
    together (DistributedDataParallel, `bs` is the global batch; `sync_bn`: SyncBatchNorm, default on CUDA).
    Rank 0 writes config.json, folds.csv and summary.json; every rank returns the finished run.
    """
    from .distributed import init_distributed

    settings = resolve_preset(preset, dict(arch=arch, pool=pool, size=size, epochs=epochs, bs=bs, lr=lr, **options))
    out = Path(out)
    df = _prepare_folds(df, n_folds, seed)
    todo = _folds_to_train(folds, n_folds)
    config = dict(preset=preset, n_folds=n_folds, seed=seed, tta=tta, **settings, n_images=len(df),
                  n_artists=int(df["artist"].nunique()), data=data_fingerprint(df), library_version=__version__)
    job = _FoldJob(df=df, out=out, settings=settings, cache=cache, n_folds=n_folds, seed=seed, tta=tta,
                  workers=workers, progress=progress, log=log)
    dist = init_distributed()
    if dist.enabled:
        from .distributed import train_kfold_distributed
        return train_kfold_distributed(dist, job, config, todo, ddp=ddp, sync_bn=sync_bn)
    if (out / "config.json").is_file():
        _check_config(out, config)
    job.cache = cache if cache is not None else PresizeCache(presize_for(settings["size"]))
    job.cache.fill(df["img_path"], source="training table")  # unreadable images are refused before anything is written
    _write_run_dir(out, config, df)
    for k in todo:
        _run_fold(job, k)
    return finish_run(out, df)


def _fit_fold(learn, settings: dict, fold: int, log) -> None:
    """Fit one fold; a non-finite loss stops this fold (best checkpoint kept) and the run goes on."""
    from .callbacks import NonFiniteLossError
    try:
        learn.fit(settings["epochs"], settings["lr"])
    except NonFiniteLossError as e:
        log(str(e) if str(e).startswith(f"fold {fold}:") else f"fold {fold}: {e}")  # the guard names the fold


DATA_KEYS = ("size", "bs", "min_scale", "max_rotate", "sampler", "flip")


def _split_settings(settings: dict) -> tuple[dict, dict]:
    """Settings for artist_dls and for artist_learner."""
    data_kw = {k: v for k, v in settings.items() if k in DATA_KEYS}
    learn_kw = {k: v for k, v in settings.items() if k not in DATA_KEYS}
    return data_kw, learn_kw


def finish_run(out, df: pd.DataFrame | None = None, select: list | None = None) -> KFoldRun:
    """Score the out-of-fold predictions, write them all to oof.csv, select the folds, write summary.json."""
    run = load_run(out)
    if run.oof is not None:
        atomic_write_csv(run.path / "oof.csv", run.oof)
    if df is None and (run.path / "folds.csv").is_file():
        df = pd.read_csv(run.path / "folds.csv")
    selection = select_folds(run, folds=select) if run.folds else None
    best = run.best
    summary = dict(
        folds=json.loads(best.to_json(orient="index")) if len(best) else {},
        oof=run.oof_scores,
        majority_baseline=majority_baseline(df) if df is not None else None,
        selection=selection.as_dict() if selection is not None else None,
        library_version=__version__)
    atomic_write_json(run.path / "summary.json", summary)
    run.summary = summary
    return run
