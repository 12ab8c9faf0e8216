"""The run-directory format: file names, `KFoldRun`/`load_run`, fold status, the data fingerprint, config checks,
ownership (what artlearn may write into or delete) and the run lock.

A run directory is artlearn's when its `config.json` says so (`format: "artlearn-run"` with a `format_version`;
runs written before the version existed carry `library_version` and read as version 1). Version 3 adds the image
content to the data fingerprint. artlearn writes only into a new or empty folder or one of its own runs, deletes
only the files it writes there, and never touches a folder that holds the data.
"""
import hashlib
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .checkpoint import HISTORY_NAME, META_NAME, WEIGHTS_NAME, FoldMeta, identity_problem
from .checks import ArtlearnError, listing
from .files import atomic_write_csv, atomic_write_json, read_json
from .runconfig import (  # noqa: F401  (the config's terms, re-exported: run.py is where users look for them)
    ABSENT_MEANS, CONFIG_NAME, FOLDS_NAME, OLD_SPELLINGS, RUN_FORMAT, RUN_FORMAT_VERSION, RUNTIME_KEYS, config_as_now,
    read_config, run_format_version, run_identity)
from .tables import digest_changes

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

logger = logging.getLogger("artlearn")

SUMMARY_NAME, OOF_NAME = "summary.json", "oof.csv"
SUBMISSION_NAME, LOCK_NAME = "submission.csv", ".lock"
RUN_FIGURES = ("history.png", "confusion.png", "recall.png")  # plots.save_run_figures writes these into a run
RUN_FILES = (CONFIG_NAME, FOLDS_NAME, SUMMARY_NAME, OOF_NAME, SUBMISSION_NAME, *RUN_FIGURES)
FOLD_FILES = (WEIGHTS_NAME, META_NAME, HISTORY_NAME, OOF_NAME)
CONTENT_VERSION = 3  # the first format version whose 'data' fingerprint covers the image content
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "train_acc", "valid_acc", "f1_macro", "lr", "seconds")
TEXT_COLUMNS = ("id", "img_path", "artist", "pred")  # read back as text, never as numbers or NaN


def fold_dir(run_dir, fold: int) -> Path:
    """The folder of one fold."""
    return Path(run_dir) / f"fold{int(fold)}"


def fold_index(name: str) -> int | None:
    """k for a folder named exactly 'fold<k>' ('fold0', 'fold12'; not 'fold01' or 'fold-1'), else None."""
    digits = name[4:]
    if not name.startswith("fold") or not digits.isdigit() or not digits.isascii() or str(int(digits)) != digits:
        return None
    return int(digits)


@dataclass
class KFoldRun:
    """A run directory read back: config, per-fold histories and metadata, out-of-fold predictions, summary."""
    path: Path
    config: dict
    histories: dict = field(default_factory=dict)
    metas: dict = field(default_factory=dict)  # fold -> its FoldMeta
    oof: pd.DataFrame | None = None
    summary: dict = field(default_factory=dict)
    ignored: dict = field(default_factory=dict)  # folder name -> why load_run left it out
    history_problems: dict = field(default_factory=dict)  # fold -> why its history.csv could not be used

    def fold_dir(self, fold: int) -> Path:
        """The folder of one fold."""
        return fold_dir(self.path, fold)

    @property
    def folds(self) -> list:
        """Folds whose checkpoint is complete."""
        return sorted(k for k, m in self.metas.items() if m.complete)

    @property
    def vocab(self) -> list:
        """The artist vocabulary shared by the folds."""
        return list(next(iter(self.metas.values())).vocab or []) if self.metas else []

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


def best_row(fold: int, history: pd.DataFrame | None, meta: FoldMeta) -> dict:
    """Scores of a fold's best (checkpointed) epoch."""
    row = dict(fold=fold, epoch=meta.epoch, monitor=meta.monitor, score=meta.score, status=fold_status(meta))
    if history is not None and len(history) and meta.epoch is not None and "epoch" in history.columns:
        at = history[history["epoch"] == meta.epoch]
        if len(at):
            row.update({c: float(at.iloc[0][c]) for c in ("valid_loss", "valid_acc", "f1_macro") if c in at.columns})
    return row


def fold_status(meta: FoldMeta) -> str:
    """'complete', 'stopped: ...' or 'incomplete'."""
    if meta.stopped:
        return f"stopped: {meta.stopped}"
    return "complete" if meta.complete else "incomplete"


# ---------------------------------------------------------------- config.json


def data_fingerprint(df: pd.DataFrame, digests=None) -> str:
    """Hash of the (img_path, artist, fold[, content digest]) assignment, to refuse mixing runs over other data."""
    cols = [c for c in ("img_path", "artist", "fold") if c in df.columns]
    table = df[cols].astype(str)
    if digests is not None:
        table = table.assign(digest=list(digests))
        cols = [*cols, "digest"]
    text = table.sort_values(cols).to_csv(index=False)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def check_data_unchanged(df: pd.DataFrame, config: dict, when: str) -> None:
    """ValueError naming the training images that changed (content, deleted, unreadable) since the run computed its
    data fingerprint (config['data']): a run never mixes two versions of its data. Cheap: only files whose size,
    mtime, inode or ctime changed are read again."""
    digests, changes = digest_changes(df["img_path"])
    if not changes and data_fingerprint(df, digests) == config.get("data"):
        return
    what = (f"{len(changes)} training image(s) changed since this run started: {listing(changes, len(changes))}"
            if changes else "the training images' content no longer matches this run's data fingerprint")
    raise ValueError(f"{when}: {what}; the run stops here so that its folds do not mix two versions of the data "
                     "(the folds finished so far are kept). Restore the images and rerun to resume, or train the "
                     "changed data as a new run (another --out folder)")


def run_config(settings: dict, df: pd.DataFrame, digests=None, **run_args) -> dict:
    """The content of config.json: format, the run's arguments, every recipe setting and the data's fingerprint."""
    from . import __version__
    return dict(format=RUN_FORMAT, format_version=RUN_FORMAT_VERSION, **run_args, **settings, n_images=len(df),
                n_artists=int(df["artist"].nunique()), data=data_fingerprint(df, digests), library_version=__version__)


def check_config(out: Path, config: dict, legacy: dict | None = None) -> None:
    """Refuse a run directory made with different settings or data.

    `legacy`: values to compare instead for runs of an older format (their 'data' fingerprint without content).
    """
    old = read_config(out)
    if run_format_version(old) < CONTENT_VERSION and legacy:
        config = {**config, **legacy}
        logger.warning(f"{out}: a run of format version {run_format_version(old)}; its fingerprint does not cover "
                       "the image content, so changed pixels cannot be detected when resuming it")
    old = config_as_now(old)
    diffs = [f"{k}: {old.get(k)!r} in the run dir, {config.get(k)!r} now" for k in sorted(set(old) | set(config))
             if k not in RUNTIME_KEYS and old.get(k) != config.get(k)]
    if diffs:
        raise ValueError(f"{out} was made with a different configuration ({'; '.join(diffs)}); use another --out "
                         "folder, or delete this one to start over (--overwrite)")


# ---------------------------------------------------------------- reading a run back


def read_history(path) -> pd.DataFrame:
    """A fold's history.csv (numeric columns), with errors that name the file."""
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable history CSV ({str(e).strip()})") from None


def _read_text_csv(path, what: str) -> pd.DataFrame:
    """A CSV read as text (no type or NA inference), with errors that name the file."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable {what} CSV ({e}); the file is damaged") from None


def _as_numbers(df: pd.DataFrame, path, columns, kind) -> pd.DataFrame:
    """Convert the named columns to int or float, naming the file and column when a value is not such a number."""
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() if kind is int else values.isna() & (df[c].str.strip().str.lower() != "nan")
        if kind is int:
            bad |= values.notna() & (values != values.round())
        if bad.any():
            raise ValueError(f"{path}: column {c!r} holds {int(bad.sum())} value(s) that are not "
                             f"{'integers' if kind is int else 'numbers'} ({listing(map(repr, df[c][bad]))}); "
                             "the file is damaged")
        df[c] = values.astype(kind)
    return df


def read_folds(path) -> pd.DataFrame:
    """A run's folds.csv: ids, paths and artists as text, 'fold' as integers."""
    df = _read_text_csv(path, "folds")
    missing = [c for c in ("img_path", "artist", "fold") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file is damaged (delete the run to start over)")
    return _as_numbers(df, path, ["fold"], int)


def read_oof(path) -> pd.DataFrame:
    """An oof.csv: id, img_path, artist, pred as text ('07' is not '7', 'NA' is an artist), fold int, p_* floats."""
    df = _read_text_csv(path, "out-of-fold")
    missing = [c for c in ("artist", "pred", "fold") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file is damaged (delete it to have it rewritten)")
    _as_numbers(df, path, ["fold"], int)
    return _as_numbers(df, path, [c for c in df.columns if c.startswith("p_")], float)


def _fold_folders(run: KFoldRun) -> dict:
    """k -> folder of every fold folder of the run (fold<k> with 0 <= k < n_folds); the others noted in ignored."""
    n_folds = run.config.get("n_folds")
    found = {}
    for folder in sorted(p for p in run.path.iterdir() if p.name.startswith("fold") and p.is_dir()):
        k = fold_index(folder.name)
        if k is None:
            run.ignored[folder.name] = "not a fold folder name (fold0, fold1, ...)"
        elif isinstance(n_folds, int) and k >= n_folds:
            run.ignored[folder.name] = f"outside this run's folds 0..{n_folds - 1} (n_folds={n_folds})"
        else:
            found[k] = folder
    return found


def fold_problem(meta: FoldMeta, k: int, config: dict) -> str | None:
    """Why a fold's meta.json does not belong to this run (another fold, fold count or split seed), or None."""
    expected = dict(fold=k, n_folds=config.get("n_folds"), split_seed=config.get("seed"))
    for key, want in expected.items():
        have = getattr(meta, key)
        if want is not None and have is not None and have != want:
            return f"its meta.json says {key}={have!r}, this run has {key}={want!r} (copied from another run?)"
    return None


def _read_fold(run: KFoldRun, k: int, folder: Path) -> None:
    """Fold k's meta.json (checked) and history.csv into run; a fold of another run is noted in ignored."""
    if not (folder / META_NAME).is_file():
        return
    meta = FoldMeta.from_json(read_json(folder / META_NAME), folder / META_NAME)
    problem = fold_problem(meta, k, run.config) or identity_problem(folder, meta, weights=False)
    if problem:
        run.ignored[folder.name] = problem
        return
    run.metas[k] = meta
    history = folder / HISTORY_NAME
    if not history.is_file():
        run.history_problems[k] = f"no {HISTORY_NAME} in {folder}"
        return
    try:
        frame = read_history(history)
    except ValueError as e:
        run.history_problems[k] = str(e)
        return
    run.histories[k] = frame
    lacking = [c for c in ("epoch", "valid_loss", "valid_acc", "f1_macro") if c not in frame.columns]
    if lacking:
        run.history_problems[k] = f"{history}: missing column(s) {lacking}"
    elif frame.empty:
        run.history_problems[k] = f"{history}: no epochs recorded"


def load_run(path) -> KFoldRun:
    """Read a run directory written by train_kfold (stray or foreign fold folders are left out, with a warning)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{path}: not an artlearn run directory (no config.json); train one with train_kfold")
    run = KFoldRun(path=path, config=read_config(path))
    for k, folder in sorted(_fold_folders(run).items()):
        _read_fold(run, k, folder)
    if run.ignored:
        logger.warning(f"{path}: left out {len(run.ignored)} folder(s) that are not folds of this run: "
                       + "; ".join(f"{name} ({why})" for name, why in sorted(run.ignored.items())))
    oofs = [read_oof(run.fold_dir(k) / OOF_NAME) for k in run.folds if (run.fold_dir(k) / OOF_NAME).is_file()]
    run.oof = pd.concat(oofs, ignore_index=True) if oofs else None
    if (path / SUMMARY_NAME).is_file():
        summary = read_json(path / SUMMARY_NAME, fix="delete it: train_kfold or finish_run rewrites it")
        run.summary = summary if isinstance(summary, dict) else {}
    return run


def oof_scores(oof: pd.DataFrame) -> dict:
    """Accuracy and macro-F1 of out-of-fold predictions (labels compared as text)."""
    from sklearn.metrics import accuracy_score, f1_score
    truth, pred = oof["artist"].astype(str), oof["pred"].astype(str)
    return dict(accuracy=float(accuracy_score(truth, pred)),
                f1_macro=float(f1_score(truth, pred, average="macro", zero_division=0)),
                n=int(len(oof)), folds=sorted(int(f) for f in oof["fold"].unique()))


def majority_baseline(df: pd.DataFrame) -> dict:
    """Scores of always predicting the most frequent artist."""
    from sklearn.metrics import f1_score
    labels = df["artist"].astype(str)
    top = labels.value_counts().index[0]
    return dict(artist=str(top), accuracy=float((labels == top).mean()),
                f1_macro=float(f1_score(labels, [top] * len(labels), average="macro", zero_division=0)))


# ---------------------------------------------------------------- folds on disk


def fold_is_complete(folder: Path, config: dict | None = None) -> bool:
    """True when meta.json says complete (or stopped), the weights exist and (config given) the fold is this run's:
    its meta.json valid, its weights the ones it recorded, its run_id this run's (a fold failing these is retrained,
    with a warning naming why)."""
    folder = Path(folder)
    meta_path = folder / META_NAME
    if not meta_path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        return False
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        return False
    k = fold_index(folder.name)
    if not (meta.get("complete") or meta.get("stopped")):
        return False
    problem = None
    if config is not None:
        problem = _verify_problem(folder, meta, k, config)
    if problem:
        logger.warning(f"fold {k}: its checkpoint is not this run's, so it is trained again: {problem}")
    return problem is None


def _verify_problem(folder: Path, meta: dict, k: int | None, config: dict) -> str | None:
    """Why a fold's meta.json is invalid (`FoldMeta.from_json`), not this run's fold (`fold_problem`) or its files
    not its run's (`identity_problem`), or None."""
    try:
        meta = FoldMeta.from_json(meta, folder / META_NAME)
    except ValueError as e:
        return str(e)
    return (fold_problem(meta, k, config) if k is not None else None) or identity_problem(folder, meta)


def _is_temp(name: str) -> bool:
    """A temp file of an atomic write ('.<name>.<random>.tmp')."""
    return name.startswith(".") and name.endswith(".tmp")


def _unlink(path: Path) -> None:
    """Delete a file artlearn wrote; a folder this user cannot write is an ArtlearnError naming it and the fix."""
    try:
        path.unlink()
    except PermissionError as e:
        raise ArtlearnError(f"{path}: cannot be deleted to retrain its fold ({e.strerror}); make {path.parent} "
                            "writable by this user (or train into another --out folder) and rerun") from None


def clear_fold(folder: Path, remove_empty: bool = False) -> list:
    """Remove the files artlearn writes in a fold folder (and temp files of killed writes); returns the others."""
    folder = Path(folder)
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link (to {folder.resolve()}); artlearn deletes and trains only in "
                         "fold folders inside the run: remove the link (its target is left alone) and rerun")
    if not folder.is_dir():
        return []
    kept = []
    for f in folder.iterdir():
        if (f.name in FOLD_FILES or _is_temp(f.name)) and (f.is_file() or f.is_symlink()):
            _unlink(f)
        else:
            kept.append(f)
    if kept:
        logger.warning(f"{folder}: kept {len(kept)} file(s) artlearn did not write: {listing(p.name for p in kept)}")
    elif remove_empty:
        folder.rmdir()
    return kept


# ---------------------------------------------------------------- ownership: where artlearn may write and delete


def _contents(out: Path) -> list:
    """Names in a folder, leaving out the lock file and temp files of atomic writes."""
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not _is_temp(p.name))


def _both(path) -> set:
    """The path as written (absolute) and with symlinks resolved."""
    return {os.path.abspath(path), os.path.realpath(path)}


def check_not_data(out: Path, protect=()) -> None:
    """Refuse an --out that is, or contains, one of the `protect` paths (the data folder, its images)."""
    outs = _both(out)
    for p in protect:
        for q in _both(p):
            hit = next((o for o in outs if q == o or q.startswith(o.rstrip(os.sep) + os.sep)), None)
            if hit is not None:
                raise ValueError(f"{out} holds the data ({p}); artlearn never writes into or deletes the data folder "
                                 "or a folder that contains it: use another --out folder")


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be created or written (checked on its nearest existing folder)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{out}: {probe} is a file, so the run directory cannot be created there; use another "
                         "--out folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: {probe} is not writable by this user; use another --out folder")


def _check_fold_links(out: Path) -> None:
    """Refuse a run whose fold<k> entry is a symbolic link (to another run's fold): artlearn would train into it."""
    links = [p for p in sorted(out.iterdir()) if fold_index(p.name) is not None and p.is_symlink()]
    if links:
        raise ValueError(f"{out}: {listing(f'{p.name} -> {os.readlink(p)}' for p in links)} "
                         f"{'is a symbolic link' if len(links) == 1 else 'are symbolic links'}; a run's folds are "
                         "folders inside it, never links (to another run's fold): remove the link(s), whose target "
                         "artlearn leaves alone, and rerun")


def check_out_dir(out: Path, protect=()) -> bool:
    """Refuse an --out that is a file, unwritable, holds the data, or is neither empty nor a run; True for a run."""
    out = Path(out)
    check_not_data(out, protect)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; --out must be a new or empty folder, or an artlearn run")
    _check_writable(out)
    if not out.is_dir():
        return False
    if (out / CONFIG_NAME).is_file():
        read_config(out)
        _check_fold_links(out)
        return True
    entries = _contents(out)
    if entries:
        raise ValueError(f"{out} is not empty and not an artlearn run directory (no config.json; it holds "
                         f"{listing(entries)}); artlearn writes only into a new or empty folder or one of its own "
                         "runs, and deletes only there: use another --out folder")
    return False


def clear_run(out: Path) -> list:
    """Delete what artlearn wrote in a run directory marked by its config.json (--overwrite); returns what was kept.

    Files artlearn did not write are kept (and named in a warning); config.json goes last, so an interrupted clean-up
    still leaves a marked directory.
    """
    out = Path(out)
    read_config(out)
    kept = []
    for entry in sorted(out.iterdir()):
        if entry.name in (LOCK_NAME, CONFIG_NAME):
            continue
        if fold_index(entry.name) is not None and entry.is_dir() and not entry.is_symlink():
            kept += clear_fold(entry, remove_empty=True)
        elif (entry.name in RUN_FILES or _is_temp(entry.name)) and (entry.is_file() or entry.is_symlink()):
            entry.unlink()
        else:
            kept.append(entry)
    (out / CONFIG_NAME).unlink()
    if kept:
        logger.warning(f"{out}: --overwrite kept {len(kept)} entr(ies) artlearn did not write: "
                       f"{listing(p.name for p in kept)}")
    return kept


# ---------------------------------------------------------------- the run lock

_HELD: dict = {}  # resolved run directory -> [file descriptor, depth] of the locks this process holds
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
    """What the lock file says about the process holding it."""
    try:
        text = os.pread(fd, 300, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its pid yet"


def _acquire(out: Path) -> int | None:
    """Take the advisory lock of a run directory (non-blocking); ValueError naming the holder when it is held."""
    if fcntl is None:
        return None
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ValueError(f"{path}: cannot create the run's lock file ({e.strerror}); the run directory must be "
                         "writable (use another --out folder)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ValueError(f"{out} is in use by another artlearn process ({holder}); wait for it to finish, or train "
                         f"into another --out folder (the lock {path} is released when that process ends)") from None
    except OSError as e:  # a filesystem without locks (some network mounts)
        logger.warning(f"{path}: cannot lock the run directory ({e.strerror}); make sure no other process trains here")
        return fd
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    return fd


@contextmanager
def run_lock(out):
    """Hold a run directory's lock (`.lock`, flock; re-entrant within this process) for the block; creates `out`.

    A second process is refused with the holder's pid and host. The kernel releases the lock when its holder dies, so
    a lock file left by a killed run never blocks.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out}: cannot create the run directory ({e.strerror}); use another --out folder") from None
    key = os.path.realpath(out)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        fd = _acquire(out)
        with _HELD_GUARD:
            held = _HELD[key] = [fd, 1]
    try:
        yield out
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            done = held[1] == 0
            if done:
                del _HELD[key]
        if done and held[0] is not None:
            os.close(held[0])


def write_run_dir(out: Path, config: dict, df: pd.DataFrame) -> None:
    """Create the run directory: config.json (unless there) and folds.csv (a config.json there is checked first)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / CONFIG_NAME).is_file():
        atomic_write_json(out / CONFIG_NAME, config)
    fold_cols = [c for c in ("id", "img_path", "artist", "fold") if c in df.columns]
    atomic_write_csv(out / FOLDS_NAME, df[fold_cols])
