"""The run-directory format: file names, `KFoldRun`/`load_run`, fold status, the data fingerprint, config checks.

A run directory is artlearn's when its `config.json` says so (`format: "artlearn-run"` with a `format_version`;
runs written before the version existed carry `library_version` and read as version 1).
"""
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .checkpoint import HISTORY_NAME, META_NAME, WEIGHTS_NAME
from .files import atomic_write_csv, atomic_write_json, read_json

CONFIG_NAME, FOLDS_NAME, SUMMARY_NAME, OOF_NAME = "config.json", "folds.csv", "summary.json", "oof.csv"
SUBMISSION_NAME = "submission.csv"
RUN_FORMAT, RUN_FORMAT_VERSION = "artlearn-run", 2
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "train_acc", "valid_acc", "f1_macro", "lr", "seconds")
# settings of a run that may differ between a run and its resume
RUNTIME_KEYS = ("folds", "library_version", "format", "format_version")


def fold_dir(run_dir, fold: int) -> Path:
    """The folder of one fold."""
    return Path(run_dir) / f"fold{int(fold)}"


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
        return fold_dir(self.path, fold)

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
        rows = [best_row(k, self.histories.get(k), m) for k, m in sorted(self.metas.items())]
        return pd.DataFrame(rows).set_index("fold") if rows else pd.DataFrame()

    @property
    def oof_scores(self) -> dict:
        """Out-of-fold accuracy and macro-F1 over every trained fold."""
        return oof_scores(self.oof) if self.oof is not None and len(self.oof) else {}

    def __repr__(self) -> str:
        return f"KFoldRun({str(self.path)!r}, folds={self.folds}, oof={self.oof_scores})"


def best_row(fold: int, history: pd.DataFrame | None, meta: dict) -> dict:
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


def run_format_version(config: dict) -> int | None:
    """The format version of a config.json (1 for runs written before versions), None when not artlearn's."""
    if config.get("format") == RUN_FORMAT:
        return int(config.get("format_version", 0))
    return 1 if "library_version" in config and "format" not in config else None


def read_config(path) -> dict:
    """config.json of a run directory, refused when it is not artlearn's or of a newer format."""
    path = Path(path)
    config = read_json(path / CONFIG_NAME)
    version = run_format_version(config) if isinstance(config, dict) else None
    if version is None:
        raise ValueError(f"{path / CONFIG_NAME} is not an artlearn run config (no 'format': '{RUN_FORMAT}'); "
                         "use another --out folder")
    if version > RUN_FORMAT_VERSION:
        raise ValueError(f"{path} has run format version {version}, newer than this artlearn reads "
                         f"({RUN_FORMAT_VERSION}); upgrade artlearn")
    return config


def read_history(path) -> pd.DataFrame:
    """A fold's history.csv (numeric columns), with errors that name the file."""
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable history CSV ({e})") from None


def load_run(path) -> KFoldRun:
    """Read a run directory written by train_kfold."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{path}: not an artlearn run directory (no config.json); train one with train_kfold")
    run = KFoldRun(path=path, config=read_config(path))
    for folder in sorted(path.glob("fold*"), key=lambda p: (len(p.name), p.name)):
        if not folder.name[4:].isdigit():
            continue
        k = int(folder.name[4:])
        if (folder / META_NAME).is_file():
            run.metas[k] = read_json(folder / META_NAME)
        if (folder / HISTORY_NAME).is_file():
            run.histories[k] = read_history(folder / HISTORY_NAME)
    oofs = [pd.read_csv(run.fold_dir(k) / OOF_NAME) for k in run.folds if (run.fold_dir(k) / OOF_NAME).is_file()]
    run.oof = pd.concat(oofs, ignore_index=True) if oofs else None
    if (path / SUMMARY_NAME).is_file():
        run.summary = read_json(path / SUMMARY_NAME)
    return run


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


def data_fingerprint(df: pd.DataFrame) -> str:
    """Hash of the (img_path, artist, fold) assignment, to refuse mixing runs over different data."""
    cols = [c for c in ("img_path", "artist", "fold") if c in df.columns]
    text = df[cols].astype(str).sort_values(cols).to_csv(index=False)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_config(settings: dict, df: pd.DataFrame, **run_args) -> dict:
    """The content of config.json: format, the run's arguments, every recipe setting and the data's fingerprint."""
    from . import __version__
    return dict(format=RUN_FORMAT, format_version=RUN_FORMAT_VERSION, **run_args, **settings, n_images=len(df),
                n_artists=int(df["artist"].nunique()), data=data_fingerprint(df), library_version=__version__)


def check_config(out: Path, config: dict) -> None:
    """Refuse a run directory made with different settings or data."""
    old = read_config(out)
    diffs = [f"{k}: {old.get(k)!r} in the run dir, {config.get(k)!r} now" for k in sorted(set(old) | set(config))
             if k not in RUNTIME_KEYS and old.get(k) != config.get(k)]
    if diffs:
        raise ValueError(f"{out} was made with a different configuration ({'; '.join(diffs)}); use another --out "
                         "folder, or delete this one to start over")


def fold_is_complete(folder: Path) -> bool:
    """A fold is done when meta.json says complete (or stopped) and its weights file exists."""
    meta_path = folder / META_NAME
    if not meta_path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        return False
    meta = read_json(meta_path)
    return bool(meta.get("complete") or meta.get("stopped"))


def clear_fold(folder: Path) -> None:
    """Remove the files of an interrupted fold so it restarts cleanly."""
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file():
                f.unlink()


def write_run_dir(out: Path, config: dict, df: pd.DataFrame) -> None:
    """Create the run directory: config.json (unless there) and folds.csv (a config.json there is checked first)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / CONFIG_NAME).is_file():
        atomic_write_json(out / CONFIG_NAME, config)
    fold_cols = [c for c in ("id", "img_path", "artist", "fold") if c in df.columns]
    atomic_write_csv(out / FOLDS_NAME, df[fold_cols])
