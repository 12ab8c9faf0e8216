"""Files written safely: every write goes to a temporary name and is renamed (readers see old or new, never half).

A write that cannot happen (disk full, a read-only folder, a path that is a folder) is an `ArtlearnError` naming the
file and what to do; the previous version of the file is kept. Temporary files left by a killed write
('.<name>.<8 random characters>.tmp', artlearn's own pattern) are removed by the next good write to that path.
"""
import errno
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path

import numpy as np

from .checks import ArtlearnError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, stale temp files are judged by age alone
    fcntl = None

STALE_TEMP_S = 5.0  # a temp file younger than this may belong to a write that is starting: never removed
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry (the rename) to disk where the OS allows it."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read from /proc where possible (setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_all(f, data: bytes, path: Path) -> None:
    """Write every byte of `data` (bound for `path`) to the open temp file `f`."""
    f.write(data)


def write_error(path: Path, e: OSError) -> ArtlearnError | None:
    """The clear error for an OSError met while writing `path` (None for one artlearn has no advice about)."""
    if e.errno in _FULL:
        return ArtlearnError(f"{path}: cannot be written, no space left on the device ({e.strerror}); nothing was "
                             "half-written and the previous version of the file (an earlier checkpoint) is kept: free "
                             "some space and rerun (train_kfold resumes where it stopped)")
    if e.errno in _DENIED:
        return ArtlearnError(f"{path}: cannot be written ({e.strerror}); write it to a folder this user can write")
    if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return ArtlearnError(f"{path}: cannot be written ({e.strerror}: a folder is in the way, or a file where a "
                             "folder should be); give the path of a file in an existing folder")
    return None


def _temp_pattern(name: str):
    """artlearn's temp names for a file: '.<name>.' + mkstemp's 8 random characters + '.tmp'."""
    return re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp")


def remove_stale_temps(path) -> list:
    """Remove the temp files killed writes of `path` left in its folder (artlearn's pattern only, regular files of
    this user, older than STALE_TEMP_S and not locked by a live writer); returns their names."""
    path = Path(path)
    pattern, removed = _temp_pattern(path.name), []
    for entry in os.scandir(path.parent):
        if not pattern.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or time.time() - st.st_mtime < STALE_TEMP_S:
            continue
        if _unlink_if_unlocked(entry.path):
            removed.append(entry.name)
    return removed


def _unlink_if_unlocked(path: str) -> bool:
    """Unlink a temp file unless a live writer holds its lock (never following a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        os.unlink(path)
        return True
    except OSError:  # locked by a writer that is alive, or gone already
        return False
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to a temp file next to `path` (mode 0o666 less the umask, as `open` would), fsync, `os.replace`;
    an ArtlearnError (previous file kept) when that cannot be done; then stale temp files of `path` are removed."""
    path = Path(path)
    if path.is_dir():
        raise ArtlearnError(f"{path} is a folder; give the path of a file to write there, not of the folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) or e from None
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when closed: a dead writer's temp is unlocked
            os.chmod(tmp, 0o666 & ~current_umask())
            _write_all(f, data, path)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        clear = write_error(path, e) if isinstance(e, OSError) else None
        if clear is not None:
            raise clear from None
        raise
    _fsync_dir(path.parent)
    remove_stale_temps(path)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Atomically write UTF-8 `text` to `path` (readers see the old file or the new one, never half)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o):
    """JSON for numpy scalars/arrays, tensors and paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray) or hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def atomic_write_json(path, obj) -> Path:
    """Atomically write `obj` as indented JSON (numpy values and paths converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_csv(path, df) -> Path:
    """Atomically write a DataFrame as CSV without its index."""
    return atomic_write_text(path, df.to_csv(index=False))


def read_json(path, fix: str = "delete the fold folder to retrain") -> dict:
    """A JSON file, with an error naming it (and `fix`) when it is unreadable or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged — {fix}") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror}); {fix}") from None
