"""Reading artwork tables, checking images, stratified folds, the presize cache and fastai DataLoaders."""

import contextlib
import hashlib
import math
import os
import random
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from .rng import fork_global_rng

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ON_BAD_CHOICES = ("raise", "drop")
PRESIZE_FACTOR = 1.15
_SHOW = 5  # how many offending names an error message lists


# ---------------------------------------------------------------- reading tables


def _listing(values, total=None) -> str:
    """'a, b, c (and 7 more)' for error messages."""
    values = [str(v) for v in values]
    total = len(values) if total is None else total
    head = ", ".join(values[:_SHOW])
    return head + (f" (and {total - _SHOW} more)" if total > _SHOW else "")


def _csv_rows(index) -> str:
    """Data rows as the user sees them in a spreadsheet: row i is line i+2 of the CSV."""
    return _listing([f"row {i} (line {i + 2})" for i in index])


def _read_csv(path: Path) -> pd.DataFrame:
    """pandas.read_csv with errors that name the file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such CSV file; pass a train.csv/test.csv or a folder of artist sub-folders")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the CSV is empty (no header, no rows); it needs an 'img_path' column") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    return df


def _from_folders(folder: Path) -> pd.DataFrame:
    """One row per image file in folder/<artist>/; sub-folders without images are ignored."""
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(sub.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append((str(f.resolve()), sub.name))
    if not rows:
        hint = " (it holds a train.csv: pass that file instead)" if (folder / "train.csv").exists() else ""
        raise ValueError(f"{folder}: no images found in artist sub-folders (<folder>/<Artist_Name>/*.jpg){hint}")
    return pd.DataFrame(rows, columns=["img_path", "artist"])


def _resolve_paths(df: pd.DataFrame, root: Path, source: Path) -> pd.Series:
    """Absolute image paths; relative ones must stay inside root."""
    root = root.resolve()
    resolved, escaping = [], []
    for i, p in zip(df.index, df["img_path"]):
        path = Path(p)
        if not path.is_absolute():
            path = (root / path).resolve()
            if root not in path.parents:
                escaping.append(f"row {i} ({p})")
        resolved.append(str(path))
    if escaping:
        raise ValueError(f"{source}: column 'img_path' has {len(escaping)} path(s) that escape the data folder {root}: "
                         f"{_listing(escaping)}; keep images inside the folder or use absolute paths")
    return pd.Series(resolved, index=df.index)


def _check_labels(df: pd.DataFrame, source) -> None:
    """Refuse missing or empty artist labels, naming the rows."""
    labels = df["artist"].astype("string").str.strip()
    bad = df.index[labels.isna() | (labels == "")]
    if len(bad):
        raise ValueError(f"{source}: column 'artist' is empty or NaN in {len(bad)} row(s): {_csv_rows(bad)}; "
                         "fill in the artist or remove those rows")


def _check_ids(df: pd.DataFrame, source) -> None:
    """Refuse duplicate or empty ids, naming them."""
    ids = df["id"].astype("string").str.strip()
    empty = df.index[ids.isna() | (ids == "")]
    if len(empty):
        raise ValueError(f"{source}: column 'id' is empty in {len(empty)} row(s): {_csv_rows(empty)}")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        first = dup.groupby(dup).apply(lambda s: f"{s.iloc[0]!r} in rows {list(s.index)}")
        raise ValueError(f"{source}: column 'id' has {dup.nunique()} duplicated id(s): {_listing(first, len(first))}; "
                         "every id must appear once")


def _check_files_exist(df: pd.DataFrame, source) -> None:
    """Refuse rows whose image file does not exist, counting all of them."""
    missing = [p for p in df["img_path"] if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{source}: {len(missing)} of {len(df)} image file(s) in 'img_path' do not exist: "
                         f"{_listing(missing, len(missing))}; fix the paths (relative paths are read from the CSV's "
                         "folder or `root=`)")


def read_artworks(source, root=None, kind: str | None = None, on_bad: str | None = None) -> pd.DataFrame:
    """DataFrame(img_path, artist[, id, ...]) from a CSV or a folder of artist sub-folders, validated."""
    if kind not in (None, "train", "test"):
        raise ValueError(f"kind={kind!r}: use 'train' (artist required), 'test' (artist ignored) or None")
    if on_bad not in (None, *ON_BAD_CHOICES):
        raise ValueError(f"on_bad={on_bad!r}: use None (no decode check), 'raise' or 'drop'")
    source = Path(source)
    if source.is_dir():
        df = _from_folders(source)
    else:
        df = _read_csv(source)
        if "img_path" not in df.columns:
            raise ValueError(f"{source}: missing column 'img_path' (columns are {list(df.columns)}); "
                             "expected id,img_path[,artist]")
        if df.empty:
            raise ValueError(f"{source}: the table has a header but no rows")
        df["img_path"] = _resolve_paths(df, Path(root) if root is not None else source.parent, source)
    if kind == "train" and "artist" not in df.columns:
        raise ValueError(f"{source}: missing column 'artist' (columns are {list(df.columns)}); a training table "
                         "needs id,img_path,artist")
    if kind == "test" and "artist" in df.columns:
        warnings.warn(f"{source}: a test table with an 'artist' column; the column is ignored", stacklevel=2)
        df = df.drop(columns="artist")
    if "artist" in df.columns:
        _check_labels(df, source)
        df["artist"] = df["artist"].str.strip()
    if "id" in df.columns:
        _check_ids(df, source)
    _check_files_exist(df, source)
    if on_bad is not None:
        df = _apply_image_check(df, on_bad, source)
    return df.reset_index(drop=True)


# ---------------------------------------------------------------- images


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale 16/32-bit or float pixels to 0-255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        top = 1.0 if arr.max() <= 1.0 else 255.0
    elif arr.dtype.itemsize == 2:  # I;16: the full 16-bit range, however dark the image
        top = 65535.0
    else:
        top = 255.0 if arr.max() <= 255 else 65535.0
    arr = arr.astype(np.float64)
    return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, LA, CMYK, I;16, I, F, 1) as 8-bit RGB; transparency composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _refuse_bomb(img: Image.Image) -> None:
    """Raise above Pillow's pixel limit (warning zone included) without the thread-unsafe warning filters."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"{img.width * img.height} pixels exceed the limit of {limit}")


def load_rgb(path, max_side: int | None = None) -> Image.Image:
    """Decode an image file to RGB (EXIF orientation applied); JPEGs shrink while decoding when max_side allows."""
    with Image.open(path) as img:
        _refuse_bomb(img)
        if max_side and img.format == "JPEG":
            img.draft(img.mode, (max_side, max_side))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def _describe_error(e: Exception, path=None) -> str:
    """A short reason for an unreadable image."""
    if path is not None and os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"larger than Pillow's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS} pixels); "
                "downscale it or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it")
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image (cannot identify the file format)"
    if isinstance(e, OSError) and "truncated" in str(e).lower():
        return "truncated image file"
    return f"{type(e).__name__}: {e}"


def _inspect(path: str) -> dict:
    """Open and fully decode one image; return its mode, size and any problem."""
    row = dict(img_path=path, ok=False, mode="", width=0, height=0, problem="")
    try:
        if os.path.getsize(path) == 0:
            row["problem"] = "empty file (0 bytes)"
            return row
        with Image.open(path) as img:
            row.update(mode=img.mode, width=img.width, height=img.height)
            _refuse_bomb(img)
            img.load()
            to_rgb(img)
        row["ok"] = True
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported, none is raised here
        row["problem"] = _describe_error(e)
    return row


def check_images(df: pd.DataFrame, workers: int | None = None) -> pd.DataFrame:
    """Decode every image once; one row per image: img_path, ok, mode, width, height, odd, problem."""
    paths = list(df["img_path"])
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(_inspect, paths))
    report = pd.DataFrame(rows, columns=["img_path", "ok", "mode", "width", "height", "problem"])
    odd_mode = ~report["mode"].isin(["RGB", ""])
    small = report["ok"] & (report[["width", "height"]].min(axis=1) < 32)
    report["odd"] = np.where(odd_mode, "mode " + report["mode"] + " (converted to RGB)", "")
    report.loc[small, "odd"] = (report.loc[small, "odd"] + " small (<32 px)").str.strip()
    return report[["img_path", "ok", "mode", "width", "height", "odd", "problem"]]


def _bad_images_message(bad: pd.DataFrame, source) -> str:
    """List unreadable images with their reasons."""
    named = [f"{p} ({why})" for p, why in zip(bad["img_path"], bad["problem"])]
    return f"{source}: {len(bad)} unreadable image(s): {_listing(named, len(named))}"


def _apply_image_check(df: pd.DataFrame, on_bad: str, source) -> pd.DataFrame:
    """Raise on, or drop with a warning, rows whose image cannot be decoded."""
    report = check_images(df)
    bad = report[~report["ok"].to_numpy()]
    if bad.empty:
        return df
    message = _bad_images_message(bad, source)
    if on_bad == "raise":
        raise ValueError(message + "; remove or replace them, or pass on_bad='drop' to skip them")
    warnings.warn(message + f"; dropped {len(bad)} row(s)", stacklevel=3)
    return df[report["ok"].to_numpy()]


# ---------------------------------------------------------------- folds


def _check_n_folds(n_folds, n_rows: int) -> None:
    """n_folds must be an int in [2, n_rows]."""
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds={n_folds!r}: need an integer of at least 2")
    if n_folds > n_rows:
        raise ValueError(f"n_folds={n_folds} is larger than the table ({n_rows} rows); use at most {n_rows} folds")


def stratified_fold_ids(labels, n_folds: int = 4, seed: int = 42, keys=None) -> np.ndarray:
    """Fold number per row: each label's rows dealt evenly over folds (counts within 1), fold sizes balanced.

    Rows are ordered by `keys` (default: position) before a seeded shuffle, so the assignment does not depend on
    the table's row order when keys are given. A label with fewer rows than folds lands in as many folds as it has
    rows (the least filled ones); it is absent from the validation split of the other folds.
    """
    labels = pd.Series(list(labels))
    _check_n_folds(n_folds, len(labels))
    keys = pd.Series(range(len(labels)) if keys is None else list(keys))
    rng = np.random.default_rng(seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    fold_sizes = np.zeros(n_folds, dtype=np.int64)
    counts = labels.value_counts()
    order = sorted(counts.index, key=lambda a: (-counts[a], str(a)))
    for artist in order:
        idx = np.flatnonzero((labels == artist).to_numpy())
        idx = idx[np.argsort(keys.iloc[idx].astype(str).to_numpy(), kind="stable")]
        idx = idx[rng.permutation(len(idx))]
        base, extra = divmod(len(idx), n_folds)
        tie_break = rng.permutation(n_folds)
        least_filled = sorted(range(n_folds), key=lambda f: (fold_sizes[f], tie_break[f]))
        per_fold = np.full(n_folds, base)
        per_fold[least_filled[:extra]] += 1
        slots = np.repeat(np.arange(n_folds), per_fold)
        folds[idx] = slots[rng.permutation(len(slots))]
        fold_sizes += per_fold
    return folds


def rare_artists(df: pd.DataFrame, n_folds: int) -> list:
    """Artists with fewer works than folds."""
    counts = df["artist"].value_counts()
    return sorted(counts[counts < n_folds].index)


def assign_folds(df: pd.DataFrame, n_folds: int = 4, seed: int = 42) -> pd.DataFrame:
    """Copy of df with an integer 'fold' column: stratified by artist, balanced, deterministic for a seed.

    Rule for rare artists (fewer works than folds): each of their works goes to a different fold (the least filled
    ones), so such an artist is validated in only some folds, and an artist with a single work is absent from the
    training split of the fold that validates it. A warning names these artists; nothing is dropped.
    """
    if "artist" not in df.columns:
        raise ValueError(f"assign_folds needs an 'artist' column (columns are {list(df.columns)})")
    _check_n_folds(n_folds, len(df))
    rare = rare_artists(df, n_folds)
    if rare:
        warnings.warn(f"{len(rare)} artist(s) have fewer works than n_folds={n_folds}: {_listing(rare, len(rare))}; "
                      "each of their works goes to a different fold, so they are missing from some validation "
                      "splits (and single-work artists from one training split)", stacklevel=2)
    out = df.copy()
    out["fold"] = stratified_fold_ids(df["artist"], n_folds, seed, keys=df["img_path"])
    return out


def _fold_column(df: pd.DataFrame, fold: int, n_folds: int | None) -> tuple[np.ndarray, int]:
    """The validated fold column and the number of folds it defines."""
    try:
        folds = pd.to_numeric(df["fold"], errors="raise").to_numpy()
    except (ValueError, TypeError):
        raise ValueError("column 'fold' must hold integers 0..n_folds-1") from None
    if np.isnan(folds.astype(float)).any() or (folds != np.round(folds)).any() or folds.min() < 0:
        raise ValueError("column 'fold' must hold integers 0..n_folds-1 (found NaN, negative or fractional values)")
    folds = folds.astype(np.int64)
    n = int(folds.max()) + 1 if n_folds is None else n_folds
    if folds.max() >= n:
        raise ValueError(f"column 'fold' has fold {folds.max()} but n_folds={n}")
    return folds, n


def _check_fold(fold, n_folds: int) -> None:
    """fold must be in range."""
    if not isinstance(fold, (int, np.integer)) or not 0 <= fold < n_folds:
        raise ValueError(f"fold={fold!r} is out of range: with n_folds={n_folds} use 0..{n_folds - 1}")


def StratifiedFoldSplitter(fold: int = 0, n_folds: int = 4, seed: int = 42, label_col: str = "artist",
                           fold_col: str = "fold"):
    """fastai splitter: `_inner(items) -> (train_idx, valid_idx)` for one fold of a stratified K-fold split."""
    _check_fold(fold, n_folds)

    def _inner(items):
        if isinstance(items, pd.DataFrame) and fold_col in items.columns:
            folds, _ = _fold_column(items.rename(columns={fold_col: "fold"}), fold, n_folds)
        else:
            labels = items[label_col] if isinstance(items, pd.DataFrame) else items
            keys = items["img_path"] if isinstance(items, pd.DataFrame) and "img_path" in items else None
            folds = stratified_fold_ids(labels, n_folds, seed, keys=keys)
        valid = np.flatnonzero(folds == fold)
        train = np.flatnonzero(folds != fold)
        return train.tolist(), valid.tolist()

    return _inner


# ---------------------------------------------------------------- presize cache


def presize_for(size: int) -> int:
    """Shorter side kept in the cache: a bit above the training size."""
    return int(math.ceil(size * PRESIZE_FACTOR))


def _file_key(path: str, presize: int) -> str:
    """Cache key: path, mtime, byte size and presize (a changed file is decoded again)."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{presize}"


def _shrink(img: Image.Image, presize: int) -> Image.Image:
    """Downscale so the shorter side is presize (never upscale), keeping aspect."""
    short = min(img.size)
    if short <= presize:
        return img
    scale = presize / short
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _default_memory_budget() -> int:
    """A quarter of physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class PresizeCache:
    """Decode-once store of images resized to a shorter side of `presize`, as uint8 RGB arrays.

    mode='memory' keeps arrays in RAM, 'disk' keeps .npy files under `cache_dir` (keyed by path, mtime, file size and
    presize), 'auto' picks memory when the estimate fits `max_memory` bytes (default: a quarter of RAM).
    `n_decodes` counts image decodes, so callers can prove nothing is decoded twice.
    """

    def __init__(self, presize: int, mode: str = "auto", cache_dir=None, max_memory: int | None = None,
                 workers: int | None = None):
        if mode not in ("auto", "memory", "disk"):
            raise ValueError(f"mode={mode!r}: use 'auto', 'memory' or 'disk'")
        if not isinstance(presize, (int, np.integer)) or presize < 8:
            raise ValueError(f"presize={presize!r}: need an integer of at least 8 pixels")
        self.presize, self.mode, self.workers = int(presize), mode, workers or min(8, os.cpu_count() or 1)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_memory = max_memory if max_memory is not None else _default_memory_budget()
        self.n_decodes = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._keys: dict[str, str] = {}
        self._stats: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held in memory."""
        return sum(a.nbytes for a in self._arrays.values())

    def _resolve_mode(self, n_new: int) -> str:
        """Memory when the estimated new pixels fit the budget, else disk."""
        if self.mode != "auto":
            return self.mode
        estimate = self.nbytes + n_new * self.presize * self.presize * 3 * 1.4
        return "memory" if estimate <= self.max_memory else "disk"

    def _disk_path(self, key: str) -> Path:
        """Where a key's array lives on disk."""
        if self.cache_dir is None:
            self.cache_dir = Path(tempfile.gettempdir()) / "artlearn-presize"
        return self.cache_dir / (hashlib.sha1(key.encode()).hexdigest() + ".npy")

    def _decode(self, path: str) -> np.ndarray:
        """Decode and shrink one image."""
        img = _shrink(load_rgb(path, max_side=self.presize), self.presize)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))

    def _store(self, path: str, key: str, arr: np.ndarray, mode: str) -> None:
        """Keep the array in memory or write it to disk atomically."""
        flat = arr.reshape(-1, 3).astype(np.float64)
        self._stats[path] = np.concatenate([flat.sum(0), (flat ** 2).sum(0), [len(flat)]])
        self._keys[path] = key
        if mode == "memory":
            self._arrays[path] = arr
            return
        target = self._disk_path(key)
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
            if mode == "disk" and self._disk_path(key).is_file():
                try:
                    return key, np.load(self._disk_path(key), allow_pickle=False), False
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
                bad.append(f"{path} ({_describe_error(arr, path)})")
                continue
            self.n_decodes += int(decoded)
            self._store(path, key, arr, mode)
        if bad:
            raise ValueError(f"{source}: {len(bad)} unreadable image(s): {_listing(bad, len(bad))}; remove them, or "
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
        return np.load(self._disk_path(self._keys[path]), allow_pickle=False)

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


# ---------------------------------------------------------------- crops and DataLoaders


def random_crop_box(width: int, height: int, min_scale: float, ratio, rng=random) -> tuple:
    """torchvision's RandomResizedCrop box (area in [min_scale, 1], log-uniform aspect), as (l, t, r, b)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return center_box(width, height)


def center_box(width: int, height: int) -> tuple:
    """The central square, as (l, t, r, b)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def valid_crop(img: Image.Image, size: int) -> Image.Image:
    """Deterministic evaluation view: the central square resized to size x size."""
    return img.resize((size, size), Image.Resampling.BILINEAR, box=center_box(*img.size))


def _artist_crop_class():
    """Build the fastai transform lazily so importing artlearn.data stays light."""
    from fastai.vision.augment import RandTransform
    from fastai.vision.core import PILImage

    class ArtistCrop(RandTransform):
        """RandomResizedCrop to `size` for training; the centre square resized to `size` for validation."""
        split_idx, order = None, 1

        def __init__(self, size: int, min_scale: float = 0.08, ratio=(3 / 4, 4 / 3)):
            super().__init__()
            self.size, self.min_scale, self.ratio = size, min_scale, ratio

        def before_call(self, b, split_idx):
            self.validating = split_idx == 1

        def encodes(self, x: PILImage):
            if self.validating:
                return valid_crop(x, self.size)
            box = random_crop_box(*x.size, self.min_scale, self.ratio)
            return x.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)

    return ArtistCrop


def _cache_reader_class():
    """A fastai Transform turning an image path into the cached PILImage."""
    from fastai.data.transforms import Transform

    class CachedImage(Transform):
        """Path -> PILImage from a PresizeCache (decoded once)."""

        def __init__(self, cache: PresizeCache):
            super().__init__()
            self.cache = cache

        def encodes(self, path):
            return self.cache.pil(path)

    return CachedImage


def _seeded_weighted_dl_class():
    """fastai's WeightedDL drawing from the loader's own seeded RNG instead of numpy's global one."""
    from fastai.callback.data import WeightedDL

    class SeededWeightedDL(WeightedDL):
        """Samples training rows with replacement in proportion to `wgts`."""

        def get_idxs(self):
            if self.n == 0 or not self.shuffle:
                return super().get_idxs()
            rng = np.random.default_rng(self.rng.getrandbits(64))
            return list(rng.choice(self.n, self.n, p=self.wgts))

    return SeededWeightedDL


@contextlib.contextmanager
def _keep_global_rng():
    """Restore Python's, numpy's and torch's global RNG states on exit (fastai draws from them building loaders)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with fork_global_rng():
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def default_workers() -> int:
    """Loader workers: none on CPU (the model needs both cores), up to 8 with a GPU."""
    import torch
    return min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0


def _sample_weights(labels: pd.Series, sampler: str) -> np.ndarray:
    """Per-row sampling weights for class-balanced ('balanced') or square-root ('sqrt') sampling."""
    counts = labels.map(labels.value_counts()).to_numpy(dtype=np.float64)
    return 1.0 / counts if sampler == "balanced" else 1.0 / np.sqrt(counts)


def _prepare_table(df: pd.DataFrame, fold: int, n_folds: int | None, seed: int) -> tuple[pd.DataFrame, int]:
    """Validated training table with a fold column, and n_folds."""
    if not isinstance(df, pd.DataFrame) or "img_path" not in df.columns or "artist" not in df.columns:
        cols = list(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ValueError(f"artist_dls needs a DataFrame with 'img_path' and 'artist' columns (got {cols}); "
                         "use read_artworks(train.csv)")
    if df.empty:
        raise ValueError("artist_dls: the table has no rows")
    _check_labels(df, "table")
    if "fold" in df.columns:
        _, n = _fold_column(df, fold, n_folds)
    else:
        n = 4 if n_folds is None else n_folds
        df = assign_folds(df, n, seed)
    _check_fold(fold, n)
    return df.reset_index(drop=True), n


def artist_dls(df: pd.DataFrame, fold: int = 0, size: int = 288, bs: int = 32, n_folds: int | None = None,
               seed: int = 42, cache: PresizeCache | None = None, workers: int | None = None,
               min_scale: float = 0.08, ratio=(3 / 4, 4 / 3), max_rotate: float = 15.0, flip: bool = True,
               sampler: str | None = None, device=None, on_bad: str = "raise"):
    """fastai DataLoaders for one fold: DataBlock(ImageBlock, CategoryBlock) + StratifiedFoldSplitter.

    Training: RandomResizedCrop at `size` (item), then flip and rotation as batch transforms (on the GPU when there
    is one). Validation: the centre square resized to `size`. Both normalised with the training split's own
    per-channel mean/std (nothing is pretrained, so no ImageNet statistics). Images come from a PresizeCache,
    decoded once and shared by every epoch and fold that passes the same cache.
    """
    from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
    from fastai.data.transforms import ColReader, IntToFloatTensor, Normalize
    from fastai.vision.augment import aug_transforms

    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size={size!r}: need an integer image size of at least 8 pixels")
    if not isinstance(bs, (int, np.integer)) or bs < 1:
        raise ValueError(f"bs={bs!r}: need a positive batch size")
    if sampler not in (None, "balanced", "sqrt"):
        raise ValueError(f"sampler={sampler!r}: use None, 'balanced' or 'sqrt'")
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad={on_bad!r}: use 'raise' or 'drop'")
    df, n_folds = _prepare_table(df, fold, n_folds, seed)
    cache = cache if cache is not None else PresizeCache(presize_for(size))
    df = _fill_cache(df, cache, on_bad)
    train_idx, valid_idx = StratifiedFoldSplitter(fold, n_folds, seed)(df)
    if not train_idx or not valid_idx:
        raise ValueError(f"fold {fold} leaves an empty training or validation split ({len(train_idx)} / "
                         f"{len(valid_idx)} rows); use fewer folds")
    mean, std = cache.channel_stats(df["img_path"].iloc[train_idx])
    vocab = sorted(df["artist"].unique())
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    augment = aug_transforms(do_flip=flip, max_rotate=max_rotate, min_zoom=1.0, max_zoom=1.0, max_lighting=0.0,
                             max_warp=0.0, p_affine=0.75)
    block = DataBlock(
        blocks=(TransformBlock(type_tfms=_cache_reader_class()(cache), batch_tfms=IntToFloatTensor),
                CategoryBlock(vocab=vocab)),
        get_x=ColReader("img_path"), get_y=ColReader("artist"),
        splitter=StratifiedFoldSplitter(fold, n_folds, seed),
        item_tfms=[_artist_crop_class()(size, min_scale, ratio)],
        batch_tfms=[*augment, Normalize.from_stats(mean, std, cuda=device.type == "cuda")])
    workers = default_workers() if workers is None else workers
    kwargs = dict(bs=bs, num_workers=workers, device=device, pin_memory=device.type == "cuda")
    train_kw = {}
    if len(train_idx) < bs:  # fastai drops the incomplete last training batch: nothing would be trained
        warnings.warn(f"fold {fold}: the training split has {len(train_idx)} rows, fewer than bs={bs}; each epoch "
                      "trains on one partial batch (lower bs, or use fewer folds)", stacklevel=2)
        train_kw["drop_last"] = False
    with _keep_global_rng():  # building loaders runs transforms and seeds fastai's RNGs from the global ones
        if sampler is not None:
            weights = _sample_weights(df["artist"], sampler)
            dls = block.dataloaders(df, dl_type=_seeded_weighted_dl_class(),
                                    dl_kwargs=[{"wgts": weights[train_idx], **train_kw}, {}], **kwargs)
        else:
            dls = block.dataloaders(df, dl_kwargs=[train_kw, {}], **kwargs)
    dls.train.rng = random.Random(seed)
    counts = df["artist"].iloc[train_idx].value_counts().reindex(vocab, fill_value=0)
    dls.artlearn_meta = dict(size=int(size), mean=mean, std=std, vocab=list(vocab), fold=int(fold),
                             class_counts=[int(c) for c in counts],
                             n_folds=int(n_folds), seed=int(seed), min_scale=min_scale, max_rotate=max_rotate)
    dls.cache = cache
    return dls


def _fill_cache(df: pd.DataFrame, cache: PresizeCache, on_bad: str) -> pd.DataFrame:
    """Decode every image into the cache up front; unreadable ones raise (listed) or are dropped."""
    try:
        cache.fill(df["img_path"], source="training table")
        return df
    except ValueError:
        if on_bad == "raise":
            raise
    report = check_images(df[[p not in cache._keys for p in df["img_path"]]])
    bad = report[~report["ok"]]
    warnings.warn(_bad_images_message(bad, "training table") + f"; dropped {len(bad)} row(s)", stacklevel=3)
    keep = ~df["img_path"].isin(set(bad["img_path"]))
    df = df[keep].reset_index(drop=True)
    cache.fill(df["img_path"], source="training table")
    return df


def stratified_subset(df: pd.DataFrame, n: int, seed: int = 42, min_per_artist: int = 1) -> pd.DataFrame:
    """About n rows keeping each artist's share (at least `min_per_artist` each, when it has them), seeded."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}: need a positive number of rows")
    if n >= len(df):
        return df.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    counts = df["artist"].value_counts()
    quota = np.maximum(np.round(counts * n / len(df)).astype(int), np.minimum(counts, min_per_artist))
    keep = []
    for artist, k in quota.items():
        idx = np.flatnonzero((df["artist"] == artist).to_numpy())
        keep.extend(np.sort(rng.choice(idx, size=min(k, len(idx)), replace=False)))
    return df.iloc[np.sort(keep)].reset_index(drop=True)
