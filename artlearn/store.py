"""The decode-once image store: every image decoded and resized once per run, shared by epochs, folds and ensembles."""
import hashlib
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .checkpoint import MAX_SIZE  # the largest side anything here handles: 'full' stores up to it
from .checks import listing
from .tables import content_digest, describe_error, load_rgb

PRESIZE_FACTOR = 1.15
ASPECT_SLACK = 1.4  # bytes estimated per stored pixel beyond the square: non-square images keep their long side


def presize_for(size: int) -> int:
    """Shorter side kept in the cache: a bit above the training size."""
    return int(math.ceil(size * PRESIZE_FACTOR))


def store_presize(store: str, size: int, min_scale: float, n_images: int, budget: int | None = None) -> int:
    """The store's shorter side for a recipe's `store` rule, capped so n_images fit `budget` bytes (never below
    presize_for(size): past that the store spills to disk instead)."""
    from .augment import store_side
    from .recipe import STORES
    if store not in STORES:
        raise ValueError(f"store={store!r}: use one of {list(STORES)}")
    if not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images={n_images!r}: need the number of images the store will hold (at least 1)")
    floor = presize_for(size)
    budget = default_memory_budget() if budget is None else budget
    cap = max(floor, int(math.sqrt(budget / (n_images * 3 * ASPECT_SLACK))))
    if store == "presize":
        return floor
    if store == "full":
        return min(cap, MAX_SIZE)
    return max(floor, store_side(size, min_scale, MAX_SIZE, cap))


def fold_store_side(meta: dict) -> int:
    """The store's shorter side a fold was trained from (folds written before `store` existed: 1.15 x size)."""
    return int(meta.get("store_side") or presize_for(int(meta["size"])))


def _file_key(path: str, presize: int) -> str:
    """Cache key: path, mtime, byte size and presize (a changed file is decoded again)."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{presize}"


def shrink(img: Image.Image, presize: int) -> Image.Image:
    """Downscale so the shorter side is presize (never upscale), keeping aspect."""
    short = min(img.size)
    if short <= presize:
        return img
    scale = presize / short
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)


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
        if not isinstance(presize, (int, np.integer)) or presize < 8:
            raise ValueError(f"presize={presize!r}: need an integer of at least 8 pixels")
        self.presize, self.mode, self.workers = int(presize), mode, workers or min(8, os.cpu_count() or 1)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_memory = max_memory if max_memory is not None else default_memory_budget()
        self.n_decodes = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._keys: dict[str, str] = {}
        self._stats: dict[str, np.ndarray] = {}
        self._device_tensors: dict = {}
        self._disk_keys: dict[str, str] = {}
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
                     _disk_keys={})
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
        """Where a key's array lives on disk."""
        if self.cache_dir is None:
            self.cache_dir = Path(tempfile.gettempdir()) / "artlearn-presize"
        return self.cache_dir / (hashlib.sha1(key.encode()).hexdigest() + ".npy")

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
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
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
            key = _file_key(path, self.presize)
            if mode == "disk":  # files on disk outlive the process: keyed by the image's content, not its mtime
                self._disk_keys[path] = f"{content_digest(path)}|{self.presize}"
                disk = self._disk_path(self._disk_keys[path])
                if disk.is_file():
                    try:
                        return key, np.load(disk, allow_pickle=False), False
                    except (ValueError, OSError, EOFError):
                        pass
            return key, self._decode(path), True
        except Exception as e:  # noqa: BLE001 - collected and reported together by fill()
            return None, e, False

    def fill(self, paths, source="images") -> None:
        """Decode every path not cached yet (threads); unreadable files raise one ValueError listing all of them."""
        missing = self._missing(paths)
        if not missing:
            return
        mode = self._resolve_mode(len(missing))
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
        return np.load(self._disk_path(self._disk_keys[path]), allow_pickle=False)

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

