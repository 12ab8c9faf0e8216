"""The report's figures: training curves per fold or per run, the artist long tail, and out-of-fold errors.

Every function builds a `matplotlib.figure.Figure` directly (no pyplot state), so it works headless, in scripts
and in notebooks (a returned `Figure` displays in Jupyter once `%matplotlib inline` has run); save with
`fig.savefig(path)` or `save_figure(fig, path)` (atomic).
"""

import io
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator, PercentFormatter

from .files import atomic_write_bytes
from .run import HISTORY_COLUMNS  # noqa: F401  (the columns plots read; re-exported)
from .run import CONFIG_NAME, load_run, read_config, read_history, read_oof

METRICS = ("train_acc", "train_loss", "valid_loss", "valid_acc", "lr")
TITLES = {"train_loss": "train loss", "valid_loss": "valid loss", "train_acc": "train accuracy",
          "valid_acc": "valid accuracy", "f1_macro": "valid macro-F1", "lr": "learning rate",
          "seconds": "seconds per epoch"}
_ALIASES = {"accuracy": "valid_acc", "valid_accuracy": "valid_acc", "train_accuracy": "train_acc",
            "learning_rate": "lr"}
# config.json keys that name what differs between compared runs, in the order labels show them
LABEL_KEYS = ("preset", "arch", "depth", "size", "pool", "label_smoothing", "lr", "epochs", "bs", "n_folds", "seed",
              "tta")
_PATH_KEYS = ("out", "path", "data", "dest", "root", "source", "version", "created", "time", "started", "finished")
BAND = "min..max over folds"
_MAX_TICK_LABELS = 80  # more artists than this and the bar/confusion tick labels are dropped
_MAX_CELL_TEXT = 20  # confusion matrices up to this size get a number in each cell


# ---------------------------------------------------------------- histories from any source


def canonical_metric(name: str) -> str:
    """History column for a metric name, mapping fastai's recorder names ('accuracy', 'f1_score', ...)."""
    name = str(name)
    if name in _ALIASES:
        return _ALIASES[name]
    if "f1" in name:
        return "train_f1" if name.startswith("train_") else "f1_macro"
    return name


def _number(x) -> float:
    """A recorder value (float, tensor, None) as a float; None becomes NaN."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _first_lr_per_epoch(recorder, n_epochs: int) -> list | None:
    """The learning rate at the first batch of each epoch from fastai's per-batch `recorder.lrs`."""
    lrs = list(getattr(recorder, "lrs", None) or [])
    if not lrs or not n_epochs:
        return None
    iters = list(getattr(recorder, "iters", None) or [])
    if len(iters) == n_epochs:  # cumulative batch counts at each epoch's end
        starts = [0, *iters[:-1]]
    else:
        starts = [round(e * len(lrs) / n_epochs) for e in range(n_epochs)]
    return [_number(lrs[s]) if s < len(lrs) else math.nan for s in starts]


def learner_history(learn) -> pd.DataFrame:
    """History DataFrame (epoch, train_loss, valid_loss, valid_acc, f1_macro, lr, ...) from a fastai Learner.

    Reads only `learn.recorder.values`, `metric_names`, `lrs` and `iters`; epochs count from 0 as fastai shows them.
    """
    recorder = getattr(learn, "recorder", None)
    if recorder is None or not hasattr(recorder, "values") or not hasattr(recorder, "metric_names"):
        raise ValueError(f"{type(learn).__name__} has no fastai recorder with values and metric_names; fit it first")
    names = [canonical_metric(n) for n in list(recorder.metric_names)[1:] if n != "time"]
    rows = [dict(zip(names, map(_number, values))) for values in recorder.values]
    if not rows:
        raise ValueError("the learner's recorder holds no epochs yet; call fit first")
    df = pd.DataFrame(rows, columns=names)
    df.insert(0, "epoch", range(len(df)))
    lrs = _first_lr_per_epoch(recorder, len(df))
    if lrs is not None and "lr" not in df.columns:
        df["lr"] = lrs
    return df


def _fit_history(learn) -> pd.DataFrame:
    """artlearn's `learn.history.frame()` (has train_acc) when the learner carries it, else the fastai recorder's."""
    frame = getattr(getattr(learn, "history", None), "frame", None)
    if callable(frame):
        df = frame()
        if isinstance(df, pd.DataFrame) and len(df):
            return _normalise(df, "learn.history")
    return learner_history(learn)


def _normalise(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Numeric history with canonical column names and an 'epoch' column, sorted by epoch."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{where}: expected a history DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError(f"{where}: the history is empty (no epochs)")
    df = df.rename(columns={c: canonical_metric(c) for c in df.columns})
    df = df.loc[:, ~df.columns.duplicated()]
    df = df.apply(pd.to_numeric, errors="coerce")
    if "epoch" not in df.columns:
        df.insert(0, "epoch", range(len(df)))
    return df.sort_values("epoch", kind="stable").reset_index(drop=True)


def _dir_histories(run_dir: Path) -> dict:
    """{'fold k': history} of a run directory (`load_run`), in fold order."""
    found = load_run(run_dir).histories
    if not found:
        raise ValueError(f"{run_dir}: no fold<k>/history.csv found; is this a train_kfold run directory?")
    return {f"fold {k}": _normalise(h, str(run_dir / f"fold{k}" / "history.csv")) for k, h in sorted(found.items())}


def _fold_label(key) -> str:
    """'fold 2' for the int 2, the key itself otherwise."""
    return f"fold {key}" if isinstance(key, (int, np.integer)) else str(key)


def _frame_histories(df: pd.DataFrame, where: str) -> dict:
    """One history, or one per fold when the frame has a 'fold' column with several values."""
    if "fold" in df.columns and df["fold"].nunique() > 1:
        return {_fold_label(k): _normalise(g.drop(columns="fold"), f"{where} fold {k}")
                for k, g in df.groupby("fold", sort=True)}
    label = _fold_label(df["fold"].iloc[0]) if "fold" in df.columns and len(df) else "history"
    return {label: _normalise(df.drop(columns="fold", errors="ignore"), where)}


def histories(source) -> tuple[dict, bool]:
    """({label: history DataFrame}, from_learner) for a run dir, run object, Learner, DataFrame, dict or list."""
    if isinstance(source, pd.DataFrame):
        return _frame_histories(source, "history DataFrame"), False
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _dir_histories(path), False
        if path.is_file() and path.suffix == ".csv":
            return _frame_histories(read_history(path), str(path)), False
        raise ValueError(f"{path}: not a run directory or a history CSV")
    if hasattr(source, "histories"):
        hist = source.histories
        if not isinstance(hist, Mapping) or not hist:
            raise ValueError(f"{type(source).__name__}.histories is empty or not a dict of fold -> DataFrame")
        items = sorted(hist.items(), key=_key_order)
        return {_fold_label(k): _normalise(v, f"histories[{k!r}]") for k, v in items}, False
    if hasattr(source, "recorder"):
        return {"fit": _fit_history(source)}, True
    if isinstance(source, Mapping):
        if not source:
            raise ValueError("the dict of histories is empty")
        return {_fold_label(k): _normalise(v, f"histories[{k!r}]") for k, v in source.items()}, False
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("the list of histories is empty")
        return {f"fold {i}": _normalise(v, f"histories[{i}]") for i, v in enumerate(source)}, False
    raise ValueError(f"cannot read training histories from a {type(source).__name__}: pass a run directory, a run "
                     "object with .histories, a fastai Learner, a history DataFrame, a dict or a list of them")


def _key_order(item) -> tuple:
    """Sort key for (fold, value) pairs: ints numerically, then strings."""
    key = item[0]
    return (0, int(key), "") if isinstance(key, (int, np.integer)) else (1, 0, str(key))


def _select_folds(hist: dict, folds) -> dict:
    """The histories of the folds asked for (ints or labels), in the order asked."""
    if folds is None:
        return hist
    wanted = [folds] if isinstance(folds, (int, np.integer, str)) else list(folds)
    labels = [_fold_label(f) for f in wanted]
    missing = [lab for lab in labels if lab not in hist]
    if missing:
        raise ValueError(f"folds={folds!r}: {missing} not found; available: {list(hist)}")
    return {lab: hist[lab] for lab in labels}


def _check_metrics(metrics, hist: dict, from_learner: bool) -> list:
    """Canonical metric names present in the histories; unknown ones raise (or, for a Learner, warn and drop)."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("metrics=(): ask for at least one history column")
    available = sorted({c for df in hist.values() for c in df.columns if c != "epoch"})
    wanted = [canonical_metric(m) for m in metrics]
    missing = [m for m in wanted if m not in available]
    if missing and not from_learner:
        raise ValueError(f"metric(s) {missing} not in the history; available columns: {available}")
    if missing:
        warnings.warn(f"the learner did not record {missing} (recorded: {available}); those panels are skipped "
                      "(fastai records train accuracy only with Recorder(train_metrics=True))", stacklevel=3)
    kept = [m for m in wanted if m in available]
    if not kept:
        raise ValueError(f"none of metrics={metrics!r} was recorded; available columns: {available}")
    return kept


# ---------------------------------------------------------------- drawing curves


def _panel_axes(n: int, axs, width: float = 4.2, height: float = 3.2) -> tuple:
    """(figure, list of n axes): new panels in a grid of up to 3 columns (2 x 2 for four), or the axes given."""
    if axs is not None:
        axs = list(np.ravel(np.asarray(axs, dtype=object)))
        if len(axs) != n:
            raise ValueError(f"axs has {len(axs)} axes but {n} metric panel(s) are drawn; pass one axis per metric")
        return axs[0].figure, axs
    ncols = 2 if n == 4 else min(n, 3)  # four panels (the report's figure) as 2 x 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[n:]:
        fig.delaxes(ax)
    return fig, list(grid[:n])


SPIKE_RATIO = 10.0  # logy='auto': a loss panel whose values span more than this factor goes on a log scale


def _spans(frames, metric: str) -> float:
    """max / min of the positive finite values of `metric` over the histories (1 when there are none)."""
    values = pd.concat([df[metric] for df in frames if metric in df.columns], ignore_index=True) if frames else None
    values = values[np.isfinite(values) & (values > 0)] if values is not None else []
    return float(values.max() / values.min()) if len(values) else 1.0


def _log_metrics(logy, metrics: list, hist: dict | None = None) -> set:
    """The metrics drawn on a log y-axis: 'auto' = loss panels with a spike (values spanning > SPIKE_RATIO, e.g.
    the from-scratch first epoch), True = every loss panel, an iterable names them."""
    if logy == "auto":
        frames = list((hist or {}).values())
        return {m for m in metrics if "loss" in m and _spans(frames, m) > SPIKE_RATIO}
    if logy is True:
        return {m for m in metrics if "loss" in m}
    if not logy:
        return set()
    names = {canonical_metric(m) for m in ([logy] if isinstance(logy, str) else logy)}
    unknown = sorted(names - set(metrics))
    if unknown:
        raise ValueError(f"logy={logy!r}: {unknown} not among the panels {metrics}")
    return names


def _style_panel(ax, metric: str, log: bool = False) -> None:
    """Title, labels, integer epochs and a light grid for one metric panel."""
    ax.set_title(TITLES.get(metric, metric) + (" (log scale)" if log else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # '2.5', not '2.5 x 10^0'
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    elif metric == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)


def plot_history(source, metrics=METRICS, folds=None, axs=None, title=None, logy="auto") -> Figure:
    """One panel per metric, one line per fold (labelled 'fold k'), x = epoch.

    `source`: a run directory (`<run>/fold<k>/history.csv`), a run object with `.histories` (fold -> DataFrame), a
    fitted fastai `Learner` (its recorder, or artlearn's `learn.history` table when present; metrics it did not
    record are skipped with a warning), one history
    DataFrame (split by its 'fold' column when present), a dict {label: DataFrame} or a list of DataFrames.
    `logy='auto'` (default) draws a loss panel on a log scale when its values span more than 10x (a from-scratch
    first-epoch spike would flatten every other point; on a log axis the spike stays visible and the rest
    readable); True: every loss panel; False: none; a list of metric names picks the panels.
    """
    hist, from_learner = histories(source)
    hist = _select_folds(hist, folds)
    metrics = _check_metrics(metrics, hist, from_learner)
    logs = _log_metrics(logy, metrics, hist)
    own_figure = axs is None
    fig, axs = _panel_axes(len(metrics), axs)
    colors = _colors(len(hist))
    for ax, metric in zip(axs, metrics):
        for (label, df), color in zip(hist.items(), colors):
            if metric in df.columns:
                ax.plot(df["epoch"], df[metric], marker="o", ms=3, color=color, label=label)
        _style_panel(ax, metric, metric in logs)
    if len(hist) > 1 or not from_learner:
        axs[0].legend(fontsize="small")
    if title is not None or own_figure:  # never retitle a figure the caller owns unless asked
        fig.suptitle(title if title is not None else _default_title(source, len(hist)))
    return fig


def _colors(n: int) -> list:
    """n distinct colours from matplotlib's default cycle (tab10), repeating past 10."""
    return [f"C{i % 10}" for i in range(n)]


def _default_title(source, n: int) -> str:
    """'<run dir name>: 4 folds' style title; 'learner: last fit' for a Learner."""
    if hasattr(source, "recorder"):
        return "learner: last fit"
    path = _run_path(source)
    name = path.resolve().name if path is not None else "history"
    return f"{name}: {n} fold{'s' if n != 1 else ''}" if n > 1 or path is not None else name


def _run_path(run) -> Path | None:
    """The run directory of a path or a run object with `.path` (not a Learner's `.path`), else None."""
    if isinstance(run, (str, os.PathLike)):
        return Path(run)
    path = getattr(run, "path", None) if not hasattr(run, "recorder") else None
    return Path(path) if isinstance(path, (str, os.PathLike)) else None


# ---------------------------------------------------------------- comparing runs


def run_config(run) -> dict:
    """A run's settings: `run.config` when it is a dict, else `<run>/config.json` flattened one level, else {}."""
    config = getattr(run, "config", None)
    if not isinstance(config, Mapping):
        path = _run_path(run)
        config = {}
        if path is not None and (path / CONFIG_NAME).is_file():
            config = read_config(path)
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items() if _scalar(v)})
        elif _scalar(value):
            flat[key] = value
    return flat


def _scalar(value) -> bool:
    """True for values a label can show (str, number, bool, None)."""
    return value is None or isinstance(value, (str, int, float, bool))


def _label_part(key: str, value) -> str:
    """'resnet50' for the arch, 'size=288' for anything else."""
    return str(value) if key in ("arch", "model.arch") else f"{key.split('.')[-1]}={value}"


def default_labels(runs: list) -> list:
    """Labels from the config.json keys that differ between runs (arch, size, pool first), else the dir names."""
    configs = [run_config(r) for r in runs]
    keys = [k for k in dict.fromkeys(k for c in configs for k in c)
            if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    keys = [k for k in keys if k.split(".")[-1] not in _PATH_KEYS]
    preferred = [k for k in keys if k.split(".")[-1] in LABEL_KEYS]
    preferred.sort(key=lambda k: LABEL_KEYS.index(k.split(".")[-1]))
    keys = preferred or keys[:3]
    if len(runs) > 1 and keys:
        labels = [", ".join(_label_part(k, c.get(k)) for k in keys) for c in configs]
    else:
        labels = [_run_name(r, i) for i, r in enumerate(runs)]
    return _unique(labels)


def _run_name(run, i: int) -> str:
    """The run's directory name, or 'run i'."""
    path = _run_path(run)
    return path.name if path is not None and path.name else f"run {i}"


def _unique(labels: list) -> list:
    """Labels with repeats made distinct by a ' #n' suffix."""
    seen, out = {}, []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if labels.count(lab) == 1 else f"{lab} #{seen[lab]}")
    return out


def fold_summary(hist: dict, metric: str) -> pd.DataFrame:
    """Per-epoch mean, min, max and std of a metric over the folds' histories (index: epoch)."""
    frames = [df[["epoch", metric]] for df in hist.values() if metric in df.columns]
    if not frames:
        return pd.DataFrame(columns=["mean", "min", "max", "std", "n"])
    stacked = pd.concat(frames, ignore_index=True).dropna()
    return stacked.groupby("epoch")[metric].agg(["mean", "min", "max", "std", "count"]).rename(columns={"count": "n"})


def compare_runs(runs, labels=None, metrics=METRICS, fold=None, title=None, logy="auto") -> Figure:
    """Overlay several runs (architectures, resolutions, poolings): one line per run per metric panel.

    `runs`: a list of runs (anything `plot_history` reads) or a dict {label: run}. `fold=None` or 'mean' draws the
    per-epoch mean over each run's folds with a shaded band from the min to the max over folds; an int draws that
    fold only. Labels default to the config.json settings that differ between runs (e.g. arch, size, pool).
    `logy` as in `plot_history`.
    """
    if isinstance(runs, Mapping):
        labels = list(runs) if labels is None else labels
        runs = list(runs.values())
    elif isinstance(runs, (str, os.PathLike, pd.DataFrame)) or not hasattr(runs, "__iter__"):
        raise ValueError(f"runs={runs!r}: pass a list of runs (or a dict label -> run) to compare")
    runs = list(runs)
    if not runs:
        raise ValueError("runs=[]: nothing to compare")
    labels = default_labels(runs) if labels is None else [str(lab) for lab in labels]
    if len(labels) != len(runs):
        raise ValueError(f"labels has {len(labels)} entries for {len(runs)} runs")
    if not (fold is None or fold == "mean" or isinstance(fold, (int, np.integer))):
        raise ValueError(f"fold={fold!r}: use None or 'mean' (mean over folds with a min..max band) or a fold number")
    loaded = [histories(r) for r in runs]
    if fold is not None and fold != "mean":
        loaded = [(_select_folds(h, [fold]), learner) for h, learner in loaded]
    merged = {f"{lab}/{k}": df for lab, (h, _) in zip(labels, loaded) for k, df in h.items()}
    metrics = _check_metrics(metrics, merged, any(learner for _, learner in loaded))
    logs = _log_metrics(logy, metrics, merged)
    fig, axs = _panel_axes(len(metrics), None)
    for ax, metric in zip(axs, metrics):
        for (hist, _), label, color in zip(loaded, labels, _colors(len(runs))):
            stats = fold_summary(hist, metric)
            if stats.empty:
                continue
            ax.plot(stats.index, stats["mean"], marker="o", ms=3, color=color, label=label)
            if (stats["n"] > 1).any():
                ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.18, linewidth=0)
        _style_panel(ax, metric, metric in logs)
    axs[0].legend(fontsize="small")
    if title is None:
        title = f"fold {fold}" if fold is not None and fold != "mean" else f"mean over folds (shaded: {BAND})"
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- the data set


def _artist_table(df: pd.DataFrame) -> pd.Series:
    """The non-empty artist column of a training table."""
    if not isinstance(df, pd.DataFrame) or "artist" not in df.columns:
        cols = list(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ValueError(f"expected a training table with an 'artist' column, got {cols}")
    artists = df["artist"].dropna()
    if artists.empty:
        raise ValueError("the table has no labelled rows (column 'artist' is empty)")
    return artists


def works_per_artist(df: pd.DataFrame) -> pd.Series:
    """Works per artist, most frequent first (ties by name)."""
    counts = _artist_table(df).value_counts()
    order = sorted(counts.index, key=lambda a: (-counts[a], str(a)))
    return counts.loc[order].rename("works")


def _image_stats(paths) -> dict:
    """Width/height min, median, max and mode counts, opening each file lazily (header only, no decoding)."""
    from PIL import Image

    sizes, modes, unreadable = [], {}, []
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
                modes[im.mode] = modes.get(im.mode, 0) + 1
        except (OSError, ValueError):
            unreadable.append(str(p))
    out = {"modes": dict(sorted(modes.items(), key=lambda kv: -kv[1])), "unreadable": unreadable}
    arr = np.array(sizes, dtype=float).reshape(-1, 2)
    for i, name in enumerate(("width", "height")):
        col = arr[:, i]
        out[name] = {"min": int(col.min()), "median": float(np.median(col)), "max": int(col.max())} if len(col) \
            else {"min": None, "median": None, "max": None}
    return out


def describe_artworks(df: pd.DataFrame, n_folds: int = 4, images: bool = False) -> dict:
    """Counts that explain the task: images, artists, the long tail, artists too rare for n_folds, image sizes."""
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise ValueError(f"n_folds={n_folds!r}: need a positive integer")
    counts = works_per_artist(df)
    total = int(counts.sum())
    share = counts / total
    out = {
        "n_images": len(df), "n_artists": len(counts), "works_per_artist": counts,
        "top1_share": float(share.iloc[:1].sum()), "top2_share": float(share.iloc[:2].sum()),
        "top5_share": float(share.iloc[:5].sum()), "median_works": float(counts.median()),
        "min_works": int(counts.min()), "rare_artists": sorted(counts[counts < n_folds].index.tolist()),
    }
    if images:
        if "img_path" not in df.columns:
            raise ValueError(f"images=True needs an 'img_path' column (columns are {list(df.columns)})")
        out.update(_image_stats(df["img_path"]))
    return out


def plot_artist_counts(df: pd.DataFrame, n_folds: int = 4, ax=None) -> Figure:
    """Sorted bars of works per artist (the long tail), cumulative share on a twin axis, a line at n_folds."""
    counts = works_per_artist(df)
    n = len(counts)
    if ax is None:
        fig = Figure(figsize=(min(max(6.0, 0.2 * n + 2), 18), 4.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    x = np.arange(n)
    rare = (counts < n_folds).to_numpy()
    ax.bar(x, counts.to_numpy(), color=np.where(rare, "C3", "C0"), width=0.8)
    below = int(rare.sum())
    ax.axhline(n_folds, color="C3", ls="--", lw=1,
               label=f"n_folds = {n_folds} ({below} artist{'' if below == 1 else 's'} below, in red)")
    ax.set_ylabel("works")
    ax.set_xlim(-0.6, n - 0.4)
    if n <= _MAX_TICK_LABELS:
        ax.set_xticks(x, [str(a) for a in counts.index], rotation=90, fontsize=7 if n > 20 else 9)
        ax.set_xlabel("artist (most works first)")
    else:
        ax.set_xlabel(f"artist rank (1 = most works; {n} artists)")
    twin = ax.twinx()
    twin.plot(x, counts.cumsum().to_numpy() / counts.sum(), color="C1", marker=".", ms=3, label="cumulative share")
    twin.set_ylim(0, 1.02)
    twin.yaxis.set_major_formatter(PercentFormatter(1.0))
    twin.set_ylabel("cumulative share of works")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize="small")
    top = counts.iloc[0] / counts.sum()
    ax.set_title(f"works per artist: {int(counts.sum())} works, {n} artists; top artist {top:.1%}, "
                 f"smallest {int(counts.iloc[-1])}")
    return fig


# ---------------------------------------------------------------- out-of-fold errors


def _oof(source) -> pd.DataFrame:
    """The out-of-fold table (artist, pred[, p_<artist>...]) of a run dir, run object, CSV path or DataFrame."""
    where = "oof DataFrame"
    if isinstance(source, pd.DataFrame):
        oof = source
    else:
        oof = getattr(source, "oof", None) if not isinstance(source, (str, os.PathLike)) else None
        if oof is None:
            path = _run_path(source)
            if path is None:
                raise ValueError(f"cannot read out-of-fold predictions from a {type(source).__name__}: pass a run "
                                 "directory, a run object with .oof, an oof.csv path or the DataFrame")
            where, oof = str(path), _read_oof(path)
    return _check_oof(oof, where)


def _read_oof(path: Path) -> pd.DataFrame:
    """An oof.csv file, or the out-of-fold predictions of a run directory (`load_run`: its complete folds)."""
    if path.is_file():
        return read_oof(path)
    oof = load_run(path).oof if (path / CONFIG_NAME).is_file() else None
    if oof is None or oof.empty:
        raise ValueError(f"{path}: no out-of-fold predictions found (oof.csv or fold<k>/oof.csv)")
    return oof


def _check_oof(oof: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validated OOF rows with an 'artist' and a 'pred' column ('pred' from the p_<artist> argmax when absent)."""
    if "artist" not in oof.columns:
        raise ValueError(f"{where}: missing column 'artist' (columns are {list(oof.columns)})")
    oof = oof.dropna(subset=["artist"])
    if "pred" not in oof.columns:
        prob_cols = [c for c in oof.columns if str(c).startswith("p_")]
        if not prob_cols:
            raise ValueError(f"{where}: needs a 'pred' column or p_<artist> probability columns "
                             f"(columns are {list(oof.columns)})")
        best = oof[prob_cols].to_numpy(dtype=float).argmax(axis=1)
        oof = oof.assign(pred=[prob_cols[i][2:] for i in best])
    if oof.empty:
        raise ValueError(f"{where}: no out-of-fold rows")
    return oof.astype({"artist": str, "pred": str})


def _frequency_order(oof: pd.DataFrame) -> list:
    """Artists by frequency (most works first, ties by name), then predicted-only names.

    Every training image is in the OOF table once (when all folds are trained), so this is the training frequency.
    """
    order = works_per_artist(oof).index.tolist()
    extra = sorted(set(oof["pred"]) - set(order))
    return order + extra


def oof_confusion(source) -> pd.DataFrame:
    """Count confusion matrix (rows: true artist, columns: predicted), artists ordered by training frequency."""
    oof = _oof(source)
    order = _frequency_order(oof)
    true = pd.Categorical(oof["artist"], categories=order).codes
    pred = pd.Categorical(oof["pred"], categories=order).codes
    cm = np.zeros((len(order), len(order)), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    return pd.DataFrame(cm, index=pd.Index(order, name="artist"), columns=pd.Index(order, name="pred"))


def artist_recall(source) -> pd.DataFrame:
    """Per-artist works, correct predictions and recall from out-of-fold predictions, most frequent first."""
    cm = oof_confusion(source)
    works = cm.sum(axis=1)
    table = pd.DataFrame({"works": works, "correct": np.diag(cm.to_numpy())}, index=cm.index)
    table = table[table["works"] > 0]
    return table.assign(recall=table["correct"] / table["works"])


def _tick_fontsize(n: int) -> float:
    """Tick label size that keeps n artist names readable."""
    return 9 if n <= 15 else 7 if n <= 40 else 6


def plot_confusion(source, normalize: bool = True, ax=None) -> Figure:
    """Out-of-fold confusion matrix, artists ordered by training frequency on both axes.

    Computed directly from the OOF table (fastai's ClassificationInterpretation needs a Learner and its DataLoaders,
    which a finished run does not keep). `normalize=True` divides each row by the artist's works (diagonal = recall).
    `source`: a run dir (`<run>/oof.csv` or `<run>/fold<k>/oof.csv`), a run object with `.oof`, an OOF CSV path, or
    the OOF DataFrame (columns artist, pred or p_<artist>).
    """
    cm = oof_confusion(source)
    n = len(cm)
    counts = cm.to_numpy().astype(float)
    rows = counts.sum(axis=1, keepdims=True)
    values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    if ax is None:
        side = min(max(5.0, 0.2 * n + 3), 16)
        fig = Figure(figsize=(side + 1, side), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true artist's works" if normalize else "works")
    if n <= _MAX_TICK_LABELS:
        fs = _tick_fontsize(n)
        ax.set_xticks(range(n), cm.columns, rotation=90, fontsize=fs)
        ax.set_yticks(range(n), cm.index, fontsize=fs)
    if n <= _MAX_CELL_TEXT:
        for i, j in zip(*np.nonzero(counts)):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] > 0.6 * (values.max() or 1) else "black")
    ax.set_xlabel("predicted artist")
    ax.set_ylabel("true artist (most works first)")
    accuracy = np.trace(counts) / counts.sum()
    ax.set_title(f"out-of-fold confusion{' (rows normalised)' if normalize else ''}: "
                 f"{int(counts.sum())} works, accuracy {accuracy:.1%}")
    return fig


def plot_artist_recall(source, ax=None) -> Figure:
    """Per-artist out-of-fold recall bars, most frequent artist on top, each annotated with its number of works."""
    table = artist_recall(source)
    n = len(table)
    if ax is None:
        fig = Figure(figsize=(7, min(max(3.0, 0.22 * n + 1.2), 20)), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    y = np.arange(n)
    ax.barh(y, table["recall"].to_numpy(), color="C0", height=0.75)
    for yi, (works, recall) in enumerate(zip(table["works"], table["recall"])):
        ax.text(recall + 0.01, yi, f"n={works}", va="center", fontsize=_tick_fontsize(n), zorder=3,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5})
    accuracy = table["correct"].sum() / table["works"].sum()
    ax.axvline(accuracy, color="C3", ls="--", lw=1, label=f"accuracy {accuracy:.1%}")
    ax.axvline(table["recall"].mean(), color="C2", ls=":", lw=1.5,
               label=f"mean recall {table['recall'].mean():.1%}")
    if n <= _MAX_TICK_LABELS:
        ax.set_yticks(y, table.index, fontsize=_tick_fontsize(n))
    ax.set_ylim(n - 0.5, -0.5)  # most frequent artist on top
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("out-of-fold recall")
    ax.set_ylabel("artist (most works first)")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("recall per artist (n = works in training)")
    return fig


# ---------------------------------------------------------------- files


def save_figure(fig: Figure, path, dpi: int = 110) -> Path:
    """Write fig as PNG atomically (rendered in memory, then files.atomic_write_bytes); returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def save_run_figures(run_dir) -> list:
    """Write history.png, and confusion.png + recall.png when OOF predictions exist, into a run dir; returns paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a run directory")
    run = load_run(run_dir)
    written = [save_figure(plot_history(run), run_dir / "history.png")]
    if run.oof is not None and len(run.oof):
        written.append(save_figure(plot_confusion(run), run_dir / "confusion.png"))
        written.append(save_figure(plot_artist_recall(run), run_dir / "recall.png"))
    return written
