"""The decode-once image store: every image decoded and resized once per run, shared by epochs, folds and ensembles."""
import hashlib
import logging
import math
import os
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .checks import MAX_SIDE, check_choice, check_side, listing
from .tables import (  # noqa: F401  (presize_for, shrink, PRESIZE_FACTOR: the store's, re-exported)
    PRESIZE_FACTOR, cached_digest, describe_error, load_rgb, presize_for, shrink)

logger = logging.getLogger("artlearn")
CLAIM_BYTES = 256  # a disk store file: this many bytes of claim (text), then the pixels, in one flat uint8 .npy
CLAIM_TAG = "artlearn-store 1"
ASPECT_SLACK = 1.4  # bytes estimated per stored pixel beyond the square: non-square images keep their long side


def store_presize(store: str, size: int, min_scale: float, n_images: int, budget: int | None = None) -> int:
    """The store's shorter side for a recipe's `store` rule, capped so n_images fit `budget` bytes (never below
    presize_for(size): past that the store spills to disk instead)."""
    from .augment import store_side
    from .recipe import STORES
    check_choice("store", store, STORES)
    if not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images={n_images!r}: need the number of images the store will hold (at least 1)")
    floor = presize_for(size)
    budget = default_memory_budget() if budget is None else budget
    cap = max(floor, int(math.sqrt(budget / (n_images * 3 * ASPECT_SLACK))))
    if store == "presize":
        return floor
    if store == "full":
        return min(cap, MAX_SIDE)
    return max(floor, store_side(size, min_scale, MAX_SIDE, cap))


def fold_store_side(meta) -> int:
    """The store's shorter side a fold was trained from (its FoldMeta/DataMeta, or a parsed meta.json; folds written
    before `store` existed: 1.15 x size)."""
    return int(meta.get("store_side") or presize_for(int(meta["size"])))


def _file_key(path: str, presize: int, strict: bool = False) -> str | None:
    """Cache key: path, mtime, byte size and presize (a changed file is decoded again); None for a file that is gone
    or cannot be stat'ed (strict: the OSError)."""
    try:
        st = os.stat(path)
    except OSError:
        if strict:
            raise
        return None
    return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{presize}"


def _private_problem(folder: Path) -> str | None:
    """Why a store folder is not private to this user (a link, not a folder, another owner, writable by others)."""
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        return f"is a symbolic link (to {os.readlink(folder)})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"belongs to another user (uid {st.st_uid}, this process runs as uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_folder(folder, chosen: bool) -> Path:
    """`folder` created 0700 (parents as usual) and checked to be this user's alone before any use; a folder that is
    not (another owner, writable by others, a symbolic link) is refused when the user `chosen` it, else replaced by
    a fresh private folder (named in a warning). Arrays another user could have planted are never read."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    problem = _private_problem(folder)
    if problem is None:
        return folder
    if chosen:
        raise ValueError(f"cache_dir={str(folder)!r} {problem}; the image store keeps its arrays only in a folder "
                         "that this user alone can write: pass another cache_dir (or none)")
    fresh = Path(tempfile.mkdtemp(prefix=f"{folder.name}-"))
    logger.warning(f"{folder} {problem}, so the image store does not use it (another user could plant arrays "
                   f"there); it uses the fresh private folder {fresh} instead")
    return fresh


def default_store_dir() -> Path:
    """Where the store spills to disk by default: a per-user folder under the temporary folder."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"artlearn-presize-{user}"


def _claim(key: str, arr: np.ndarray) -> bytes:
    """The claim a disk store file starts with: its image digest|presize key, shape and the pixels' digest."""
    pixels = hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()
    text = f"{CLAIM_TAG} {key} {arr.shape[0]} {arr.shape[1]} {pixels}".encode()
    return text.ljust(CLAIM_BYTES, b" ")


def pack_claimed(key: str, arr: np.ndarray) -> np.ndarray:
    """One flat uint8 array: the claim, then the pixels (what a disk store file holds)."""
    return np.concatenate([np.frombuffer(_claim(key, arr), dtype=np.uint8), arr.ravel()])


def unpack_claimed(flat: np.ndarray, key: str, where, check_pixels: bool = True) -> np.ndarray:
    """The pixels of a disk store file, after checking the claim names `key` (this image's digest and presize) and,
    with check_pixels, that the pixels are the ones claimed; ValueError naming the file otherwise."""
    if flat.dtype != np.uint8 or flat.ndim != 1 or flat.size < CLAIM_BYTES:
        raise ValueError(f"{where}: not an artlearn store file")
    parts = bytes(flat[:CLAIM_BYTES]).decode("ascii", "replace").split()
    if len(parts) != 6 or " ".join(parts[:2]) != CLAIM_TAG or not parts[3].isdigit() or not parts[4].isdigit():
        raise ValueError(f"{where}: not an artlearn store file (no claim)")
    if parts[2] != key:
        raise ValueError(f"{where}: claims to hold image {parts[2]}, not {key} (replaced by another image's array?)")
    h, w = int(parts[3]), int(parts[4])
    if flat.size != CLAIM_BYTES + h * w * 3:
        raise ValueError(f"{where}: holds {flat.size - CLAIM_BYTES} bytes of pixels, its claim says {h}x{w}x3")
    arr = flat[CLAIM_BYTES:].reshape(h, w, 3)
    if check_pixels and _claim(key, arr) != bytes(flat[:CLAIM_BYTES]):
        raise ValueError(f"{where}: its pixels are not the ones its claim records (edited after it was written)")
    return arr


def default_device_budget() -> int:
    """Bytes of pixels the store may keep on the GPU: a third of its memory (0 without CUDA)."""
    import sys
    torch = sys.modules.get("torch")  # never import torch just to learn there is no GPU
    if torch is None or not torch.cuda.is_available():
        return 0
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory // 3


def default_memory_budget() -> int:
    """A quarter of physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _same_device(a, b) -> bool:
    """Whether torch devices a and b are the same (an unindexed 'cuda' is the current CUDA device)."""
    import torch
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def pad_batch(tensors: list, device=None):
    """(uint8 canvas (n, 3, H, W) on `device`, int sizes (n, 2) of (h, w)): each (3, h, w) image at the top left
    of the canvas, ready for `augment.train_views` / `center_views`; host canvases bound for a GPU are pinned and
    copied without blocking."""
    import torch
    sizes = torch.tensor([tuple(t.shape[1:]) for t in tensors], dtype=torch.long)
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    on = tensors[0].device
    to_gpu = device is not None and torch.device(device).type != "cpu"
    canvas = torch.empty((len(tensors), 3, height, width), dtype=torch.uint8, device=on,
                         memory_format=torch.channels_last,  # the resize kernels run 2-3x faster on this layout
                         pin_memory=on.type == "cpu" and to_gpu and torch.cuda.is_available()).zero_()
    for i, t in enumerate(tensors):
        canvas[i, :, :t.shape[1], :t.shape[2]] = t
    if device is not None and canvas.device != torch.device(device):
        canvas = canvas.to(device, non_blocking=True)
    return canvas, sizes.to(canvas.device)


class PresizeCache:
    """Decode-once store of images resized to a shorter side of `presize`, as uint8 RGB arrays.

    mode='memory' keeps arrays in RAM, 'disk' keeps .npy files under `cache_dir` (keyed by the image's content digest
    and presize, so a replaced image is never served stale), 'auto' picks memory when the estimate fits
    `max_memory` bytes (default: a quarter of RAM).
    `n_decodes` counts image decodes, so callers can prove nothing is decoded twice.
    """

    def __init__(self, presize: int, mode: str = "auto", cache_dir=None, max_memory: int | None = None,
                 workers: int | None = None, device_memory: int | None = None):
        if mode not in ("auto", "memory", "disk"):
            raise ValueError(f"mode={mode!r}: use 'auto', 'memory' or 'disk'")
        check_side("presize", presize)
        self.presize, self.mode, self.workers = int(presize), mode, workers or min(8, os.cpu_count() or 1)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_memory = max_memory if max_memory is not None else default_memory_budget()
        self.n_decodes = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._keys: dict[str, str] = {}
        self._stats: dict[str, np.ndarray] = {}
        self._device_tensors: dict = {}
        self._disk_keys: dict[str, str] = {}
        self._dir_checked = False
        self._device_bytes = 0
        self.device_memory = device_memory if device_memory is not None else default_device_budget()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, path) -> bool:
        """True when `path` is stored and its file has not changed since."""
        path = str(path)
        return path in self._keys and self._keys[path] == _file_key(path, self.presize)

    def version(self, path) -> str | None:
        """The key of a stored, unchanged image (path, mtime, bytes, presize): equal keys, equal pixels; None when
        the image is not stored or its file changed since (then the next read decodes it again)."""
        path = str(path)
        key = self._keys.get(path)
        return key if key is not None and key == _file_key(path, self.presize) else None

    def __getstate__(self) -> dict:
        """Pickle the settings only, never the pixels (a learner's export stays small); reloads start empty."""
        state = dict(self.__dict__)
        state.update(_arrays={}, _keys={}, _stats={}, n_decodes=0, _device_tensors={}, _device_bytes=0,
                     _disk_keys={}, _dir_checked=False)
        return state

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held in memory."""
        return sum(a.nbytes for a in self._arrays.values())

    def _resolve_mode(self, n_new: int) -> str:
        """Memory when the estimated new pixels fit the budget, else disk."""
        if self.mode != "auto":
            return self.mode
        estimate = self.nbytes + n_new * self.presize * self.presize * 3 * ASPECT_SLACK
        return "memory" if estimate <= self.max_memory else "disk"

    def _disk_path(self, key: str) -> Path:
        """Where a key's array lives on disk (the folder checked to be private to this user on first use)."""
        if not self._dir_checked:
            chosen = self.cache_dir is not None
            self.cache_dir = private_folder(self.cache_dir if chosen else default_store_dir(), chosen)
            self._dir_checked = True
        return self.cache_dir / (hashlib.sha1(key.encode()).hexdigest() + ".npy")

    def _read_disk(self, path: str) -> np.ndarray:
        """A stored image's pixels from its disk file, after checking the file claims this image; a file that does
        not (replaced, damaged, a link) is decoded again from the image, with a warning."""
        key = self._disk_keys[path]
        disk = self._disk_path(key)
        try:
            if disk.is_symlink():
                raise ValueError(f"{disk}: a symbolic link, not a store file")
            return unpack_claimed(np.load(disk, allow_pickle=False), key, disk, check_pixels=False)
        except (ValueError, OSError, EOFError) as e:
            logger.warning(f"{path}: its store file cannot be used ({e}); the image is decoded again")
        try:
            arr = self._decode(path)
        except Exception as e:  # noqa: BLE001 - one clear error for any decoder failure
            raise ValueError(f"{path}: unreadable image ({describe_error(e, path)})") from None
        self.n_decodes += 1
        self._store(path, self._keys[path], arr, "disk")
        return arr

    def _decode(self, path: str) -> np.ndarray:
        """Decode and shrink one image."""
        img = shrink(load_rgb(path, max_side=self.presize), self.presize)
        return np.array(img, dtype=np.uint8)  # a writable copy (torch views it without a warning)

    def _store(self, path: str, key: str, arr: np.ndarray, mode: str) -> None:
        """Keep the array in memory or write it to disk atomically."""
        flat = arr.reshape(-1, 3).astype(np.float64)
        self._stats[path] = np.concatenate([flat.sum(0), (flat ** 2).sum(0), [len(flat)]])
        self._keys[path] = key
        if mode == "memory":
            self._arrays[path] = arr
            return
        target = self._disk_path(self._disk_keys[path])
        tmp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npy")
        np.save(tmp, pack_claimed(self._disk_keys[path], arr), allow_pickle=False)
        os.replace(tmp, target)

    def _missing(self, paths) -> list[str]:
        """Paths not cached yet, or whose file changed since."""
        out = []
        for p in dict.fromkeys(map(str, paths)):
            if p not in self._keys or self._keys[p] != _file_key(p, self.presize):
                out.append(p)
        return out

    def _load_or_decode(self, path: str, mode: str):
        """(array, decoded?) from the disk cache or by decoding; an exception object on failure."""
        try:
            key = _file_key(path, self.presize, strict=True)
            if mode == "disk":  # files on disk outlive the process: keyed by the image's content, not its mtime
                self._disk_keys[path] = f"{cached_digest(path)}|{self.presize}"
                disk = self._disk_path(self._disk_keys[path])
                if disk.is_file() and not disk.is_symlink():
                    try:
                        flat = np.load(disk, allow_pickle=False)
                        return key, unpack_claimed(flat, self._disk_keys[path], disk), False
                    except (ValueError, OSError, EOFError) as e:
                        logger.warning(f"{path}: its store file is not used ({e}); the image is decoded again")
            return key, self._decode(path), True
        except Exception as e:  # noqa: BLE001 - collected and reported together by fill()
            return None, e, False

    def fill(self, paths, source="images") -> None:
        """Decode every path not cached yet (threads); unreadable files raise one ValueError listing all of them."""
        missing = self._missing(paths)
        if not missing:
            return
        mode = self._resolve_mode(len(missing))
        if mode == "disk":
            self._disk_path("")  # the folder checked (or refused) once, before any image is read
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(lambda p: self._load_or_decode(p, mode), missing))
        bad = []
        for path, (key, arr, decoded) in zip(missing, results):
            if key is None:
                bad.append(f"{path} ({describe_error(arr, path)})")
                continue
            self.n_decodes += int(decoded)
            self._store(path, key, arr, mode)
        if bad:
            raise ValueError(f"{source}: {len(bad)} unreadable image(s): {listing(bad, len(bad))}; remove them, or "
                             "skip them with on_bad='drop' (artist_dls, read_artworks)")

    def get(self, path) -> np.ndarray:
        """The cached uint8 HxWx3 array of an image (decoded now if it is not cached yet)."""
        path = str(path)
        if path in self._arrays and self._keys[path] == _file_key(path, self.presize):
            return self._arrays[path]
        if path not in self._keys or self._keys[path] != _file_key(path, self.presize):
            self.fill([path])
        if path in self._arrays:
            return self._arrays[path]
        return self._read_disk(path)

    def view(self, path) -> np.ndarray:
        """The stored pixels of `path`; an image never stored (a new painting to predict) is decoded, not kept."""
        path = str(path)
        if path in self._keys:  # stored (re-decoded, or a listed error, when the file changed since)
            return self.get(path)
        try:
            return self._decode(path)
        except Exception as e:  # noqa: BLE001 - one clear error for any decoder failure
            raise ValueError(f"{path}: unreadable image ({describe_error(e, path)})") from None

    def tensor(self, path, device=None):
        """uint8 (3, h, w) torch tensor of an image: kept on `device` once (a GPU holds the store when it fits
        `device_memory`), a zero-copy view of the stored array on the CPU, decoded and not kept when never stored."""
        import torch
        path = str(path)
        held = self._device_tensors.get(path)
        if held is not None and held.device == torch.device(device or "cpu") and path in self:
            return held
        arr = self.view(path)
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        if device is not None and torch.device(device).type != "cpu":
            if path in self and self._device_bytes + t.numel() <= self.device_memory:
                t = t.to(device)
                self._device_tensors[path], self._device_bytes = t, self._device_bytes + t.numel()
            else:
                t = t.pin_memory() if torch.cuda.is_available() else t  # copied per batch, without blocking
        return t

    def batch(self, paths, device=None):
        """(uint8 canvas (n, 3, H, W) on `device`, int sizes (n, 2) of (h, w)) of stored images (`pad_batch`)."""
        return pad_batch([self.tensor(p, device) for p in paths], device)

    def gather(self, paths, device=None) -> tuple:
        """(images, sizes) for `augment.train_views` / `center_views`: the stored tensors themselves as a ragged list
        (sizes None) when all of them live on `device` (the CPU's zero-copy views, a GPU-resident store), else the
        padded canvas of `batch` (host images bound for a GPU: one pinned, non-blocking copy)."""
        import torch
        tensors = [self.tensor(p, device) for p in paths]
        where = torch.device(device if device is not None else "cpu")
        if tensors and all(_same_device(t.device, where) for t in tensors):
            return tensors, None
        return pad_batch(tensors, device)

    def pil(self, path) -> "Image.Image":
        """The cached image as a fastai PILImage."""
        from fastai.vision.core import PILImage
        return PILImage.create(self.get(path))

    def channel_stats(self, paths) -> tuple[list, list]:
        """Per-channel mean and std (0-1 scale) over every pixel of the given cached images."""
        self.fill(paths)
        total = np.sum([self._stats[str(p)] for p in paths], axis=0)
        n = total[6]
        mean = total[:3] / n
        var = np.maximum(total[3:6] / n - mean ** 2, 0.0)
        return (mean / 255.0).tolist(), (np.sqrt(var) / 255.0 + 1e-6).tolist()

