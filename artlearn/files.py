"""Files written safely: every write goes to a temporary name and is renamed (readers see old or new, never half)."""
import json
import os
import tempfile
from pathlib import Path

import numpy as np


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


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to a temp file next to `path` (mode 0o666 less the umask, as `open` would), fsync, `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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
