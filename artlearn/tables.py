"""Reading and validating artwork tables (CSV or artist folders) and checking/decoding their images."""
import hashlib
import logging
import math
import os
import re
import threading
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from .checks import csv_rows, listing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ON_BAD_CHOICES = ("raise", "drop")
COMPETITION_PARTS = ("train", "test")  # sub-folders of a competition root (train.csv + train/ + test/)
logger = logging.getLogger("artlearn")


# ---------------------------------------------------------------- reading tables


def _read_csv(path: Path) -> pd.DataFrame:
    """pandas.read_csv with errors that name the file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such CSV file; pass a train.csv/test.csv or a folder of artist sub-folders")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        _refuse_repeated_columns(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the CSV is empty (no header, no rows); it needs an 'img_path' column") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); save the CSV as UTF-8") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [c.strip() for c in df.columns]
    return df


def _refuse_repeated_columns(path: Path) -> None:
    """Refuse a header naming a column twice (pandas would rename the second 'artist' to 'artist.1' silently)."""
    header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].str.strip()
    repeated = sorted(set(header[header.duplicated()]))
    if repeated:
        raise ValueError(f"{path}: the header names column(s) {repeated} more than once; keep one of each (which one "
                         "is meant cannot be guessed)")


def _refuse_competition_root(folder: Path) -> None:
    """A competition folder (train.csv/test.csv next to train/ and test/) is not a folder of artists."""
    csvs = [n for n in ("train.csv", "test.csv") if (folder / n).is_file()]
    parts = [n for n in COMPETITION_PARTS if (folder / n).is_dir()]
    if csvs and parts:
        raise ValueError(f"{folder} is a competition folder ({', '.join(csvs)} with {'/, '.join(parts)}/ image "
                         "folders), not a folder of artist sub-folders: read its tables instead, "
                         f"read_artworks('{folder / 'train.csv'}', kind='train') (examples/run_kfold.py --data "
                         "does this for such a folder)")


def _scan_artist(sub: Path, skipped: dict) -> list:
    """(path, artist) of every image file in one artist folder; everything else is noted in `skipped`."""
    rows = []
    try:
        entries = sorted(sub.iterdir())
    except OSError as e:
        skipped.setdefault("unreadable folder", []).append(f"{sub} ({e.strerror})")
        return rows
    for f in entries:
        if f.name.startswith("."):
            continue  # hidden files (.DS_Store, ._*): never images
        if f.is_symlink() and not f.exists():
            skipped.setdefault("broken symlink", []).append(str(f))
        elif f.is_dir():
            skipped.setdefault("nested folder (not read)", []).append(str(f))
        elif f.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.setdefault("unknown extension", []).append(str(f))
        else:
            rows.append((str(f.resolve()), sub.name))
    if not rows:
        skipped.setdefault("artist folder without images (artist left out)", []).append(str(sub))
    return rows


def _warn_skipped(folder: Path, skipped: dict) -> None:
    """One warning listing the skipped files by reason: counts and examples."""
    if not skipped:
        return
    parts = [f"{len(v)} {why}: {listing(v, len(v))}" for why, v in sorted(skipped.items())]
    warnings.warn(f"{folder}: skipped {sum(map(len, skipped.values()))} entr(ies) that are not images in artist "
                  f"sub-folders: {'; '.join(parts)} (images: {', '.join(IMAGE_EXTENSIONS)})", stacklevel=3)


def _from_folders(folder: Path) -> pd.DataFrame:
    """One row per image file in folder/<artist>/; whatever is skipped is reported in one warning."""
    _refuse_competition_root(folder)
    rows, skipped = [], {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            rows.extend(_scan_artist(entry, skipped))
        elif entry.is_symlink() and not entry.exists():
            skipped.setdefault("broken symlink", []).append(str(entry))
        else:
            skipped.setdefault("file outside the artist folders", []).append(str(entry))
    if not rows:
        hint = " (it holds a train.csv: pass that file instead)" if (folder / "train.csv").exists() else ""
        raise ValueError(f"{folder}: no images found in artist sub-folders (<folder>/<Artist_Name>/*.jpg){hint}")
    _warn_skipped(folder, skipped)
    return pd.DataFrame(rows, columns=["img_path", "artist"])


def _escapes(root: Path, path: str) -> bool:
    """True when a relative path, as written (symlinks not followed), leads outside root."""
    joined = os.path.normpath(os.path.join(root, path))
    return os.path.commonpath([root, joined]) != str(root)


def _resolve_paths(df: pd.DataFrame, root: Path, source: Path) -> pd.Series:
    """Absolute image paths; relative ones must stay inside root (judged as written: a symlinked folder is fine)."""
    root = Path(os.path.abspath(root))
    resolved, escaping = [], []
    for i, p in zip(df.index, df["img_path"]):
        path = Path(p)
        if not path.is_absolute():
            if _escapes(root, p):
                escaping.append(f"row {i} ({p})")
            path = (root / path).resolve()
        resolved.append(str(path))
    if escaping:
        raise ValueError(f"{source}: column 'img_path' has {len(escaping)} path(s) that escape the data folder {root}: "
                         f"{listing(escaping)}; keep images inside the folder or use absolute paths")
    return pd.Series(resolved, index=df.index)


def check_img_paths(df: pd.DataFrame, source) -> pd.DataFrame:
    """Refuse empty or non-path cells in 'img_path' (naming the rows); returns df with the paths as text."""
    values = list(df["img_path"])
    empty = [i for i, v in zip(df.index, values) if _is_blank(v)]
    if empty:
        raise ValueError(f"{source}: column 'img_path' is empty in {len(empty)} row(s): {csv_rows(empty)}; fill in "
                         "the image path or remove those rows")
    odd = [f"row {i} ({v!r})" for i, v in zip(df.index, values) if not isinstance(v, (str, os.PathLike))]
    if odd:
        raise ValueError(f"{source}: column 'img_path' holds {len(odd)} value(s) that are not paths: {listing(odd)}; "
                         "use file paths (text)")
    out = df.copy()
    out["img_path"] = [os.fspath(v) for v in values]
    return out


def _is_blank(value) -> bool:
    """None, NaN, NA or text made of whitespace only."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (not isinstance(value, os.PathLike) and bool(pd.isna(value)))


def check_labels(df: pd.DataFrame, source) -> None:
    """Refuse missing or empty artist labels, naming the rows."""
    labels = df["artist"].astype("string").str.strip()
    bad = df.index[labels.isna() | (labels == "")]
    if len(bad):
        raise ValueError(f"{source}: column 'artist' is empty or NaN in {len(bad)} row(s): {csv_rows(bad)}; "
                         "fill in the artist or remove those rows")


def normalise_label(label) -> str:
    """A label as text: Unicode NFC, surrounding whitespace removed, inner runs of whitespace as one space."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", str(label))).strip()


def normalise_labels(df: pd.DataFrame, source) -> pd.DataFrame:
    """Copy of df whose 'artist' labels are normalised text (`normalise_label`: the rule of every entry)."""
    check_labels(df, source)
    out = df.copy()
    out["artist"] = pd.Series([normalise_label(a) for a in df["artist"]], index=df.index).astype(str)
    _warn_case_variants(out["artist"], source)
    return out


def _warn_case_variants(labels: pd.Series, source) -> None:
    """Warn about artists whose names differ only in upper/lower case (kept apart: they may be typos)."""
    names = pd.Series(labels.unique())
    folded = names.str.casefold()
    clash = names[folded.duplicated(keep=False)]
    if len(clash):
        groups = clash.groupby(folded[clash.index]).apply(lambda g: " / ".join(map(repr, sorted(g))))
        warnings.warn(f"{source}: {len(groups)} artist name(s) differ only in upper/lower case: {listing(groups)}; "
                      "they are kept as different artists (fix the labels if they are the same)", stacklevel=3)


def validate_table(df: pd.DataFrame, source, kind: str = "train") -> pd.DataFrame:
    """The one table check of every entry point: columns, labels (normalised), ids, image files; returns the table."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{source}: need a pandas DataFrame (got {type(df).__name__}); use read_artworks(csv)")
    needed = ("img_path", "artist") if kind == "train" else ("img_path",)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing} (columns are {list(df.columns)}); "
                         "use read_artworks(train.csv)")
    if df.empty:
        raise ValueError(f"{source}: the table has no rows")
    df = check_img_paths(df, source)
    if "artist" in df.columns and kind == "train":
        df = normalise_labels(df, source)
    if "id" in df.columns:
        check_ids(df, source)
    check_files_exist(df, source)
    return df


def check_ids(df: pd.DataFrame, source) -> None:
    """Refuse duplicate or empty ids, naming them."""
    ids = df["id"].astype("string").str.strip()
    empty = df.index[ids.isna() | (ids == "")]
    if len(empty):
        raise ValueError(f"{source}: column 'id' is empty in {len(empty)} row(s): {csv_rows(empty)}")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        first = dup.groupby(dup).apply(lambda s: f"{s.iloc[0]!r} in rows {list(s.index)}")
        raise ValueError(f"{source}: column 'id' has {dup.nunique()} duplicated id(s): {listing(first, len(first))}; "
                         "every id must appear once")


def content_digest(path) -> str:
    """A hash of an image file's bytes (blake2b, 32 hex digits): identical files, identical digests."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_DIGESTS: dict = {}  # path -> (stat key, digest): a file is hashed again only when its stat key changes
_DIGESTS_GUARD = threading.Lock()


def _stat_key(path) -> tuple:
    """(size, mtime_ns, inode, ctime_ns) of a file: any write, replacement or touch changes it."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def cached_digest(path) -> str:
    """`content_digest`, kept per path and recomputed only when the file's size, mtime, inode or ctime changed."""
    path = str(path)
    key = _stat_key(path)
    with _DIGESTS_GUARD:
        held = _DIGESTS.get(path)
    if held is not None and held[0] == key:
        return held[1]
    digest = content_digest(path)
    if _stat_key(path) == key:  # not rewritten while it was read
        with _DIGESTS_GUARD:
            _DIGESTS[path] = (key, digest)
    return digest


def _digest_or_error(path):
    """cached_digest(path), or the OSError reading it raised."""
    try:
        return cached_digest(path)
    except OSError as e:
        return e


def _unchanged_digest(path: str) -> str | None:
    """The kept digest of a file whose stat key did not change, else None (also when it cannot be stat'ed)."""
    held = _DIGESTS.get(path)
    try:
        return held[1] if held is not None and held[0] == _stat_key(path) else None
    except OSError:
        return None


def digest_changes(paths, workers: int | None = None) -> tuple[list, list]:
    """(digests, changes): every path's `cached_digest` (None when unreadable) and a description of each file that
    is gone, unreadable, or whose content differs from the digest this process recorded for it before."""
    paths = [str(p) for p in paths]
    with _DIGESTS_GUARD:
        before = {p: _DIGESTS[p][1] for p in paths if p in _DIGESTS}
    digests = [_unchanged_digest(p) for p in paths]  # a stat per file: no thread for a file that did not change
    todo = [i for i, d in enumerate(digests) if d is None]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for i, d in zip(todo, pool.map(_digest_or_error, [paths[i] for i in todo])):
            digests[i] = d
    changes = []
    for p, d in zip(paths, digests):
        if isinstance(d, FileNotFoundError):
            changes.append(f"{p} (deleted or moved)")
        elif isinstance(d, OSError):
            changes.append(f"{p} (cannot be read: {d.strerror or d})")
        elif p in before and before[p] != d:
            changes.append(f"{p} (content changed)")
    return [None if isinstance(d, OSError) else d for d in digests], changes


def content_digests(paths, workers: int | None = None, source="images") -> list:
    """`content_digest` of every path, read on threads (file reads release the GIL); unreadable files listed."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_digest_or_error, paths))
    bad = [f"{p} ({d.strerror or d})" for p, d in zip(paths, digests) if isinstance(d, OSError)]
    if bad:
        raise ValueError(f"{source}: {len(bad)} image file(s) cannot be read: {listing(bad, len(bad))}; fix their "
                         "permissions or remove those rows")
    return digests


def check_files_exist(df: pd.DataFrame, source) -> None:
    """Refuse rows whose image file does not exist, counting all of them."""
    missing = [p for p in df["img_path"] if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{source}: {len(missing)} of {len(df)} image file(s) in 'img_path' do not exist: "
                         f"{listing(missing, len(missing))}; fix the paths (relative paths are read from the CSV's "
                         "folder or `root=`)")


def _header_hint(columns) -> str:
    """Why the expected columns may be missing: another separator, or other capitalisation."""
    columns = [str(c) for c in columns]
    if len(columns) == 1 and any(sep in columns[0] for sep in (";", "\t", "|")):
        return " (is the file separated by ';', tabs or '|'? artlearn reads comma-separated CSV)"
    near = [c for c in columns if c.strip().lower() in ("id", "img_path", "artist") and c not in ("id", "img_path",
                                                                                                  "artist")]
    return f" (column names are lower case: found {near})" if near else ""


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
                             f"expected id,img_path[,artist]{_header_hint(df.columns)}")
        if df.empty:
            raise ValueError(f"{source}: the table has a header but no rows")
        df = check_img_paths(df, source)
        df["img_path"] = _resolve_paths(df, Path(root) if root is not None else source.parent, source)
    if kind == "train" and "artist" not in df.columns:
        raise ValueError(f"{source}: missing column 'artist' (columns are {list(df.columns)}); a training table "
                         f"needs id,img_path,artist{_header_hint(df.columns)}")
    if kind == "test" and "artist" in df.columns:
        warnings.warn(f"{source}: a test table with an 'artist' column; the column is ignored", stacklevel=2)
        df = df.drop(columns="artist")
    if "artist" in df.columns:
        df = normalise_labels(df, source)
    if "id" in df.columns:
        check_ids(df, source)
    check_files_exist(df, source)
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


def describe_error(e: Exception, path=None) -> str:
    """A short reason for an unreadable image."""
    if path is not None and os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"larger than Pillow's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS} pixels); "
                "downscale it or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it")
    if isinstance(e, FileNotFoundError):
        return "no such file: missing, or deleted or moved since it was listed"
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
        row["problem"] = describe_error(e)
    return row


def check_images(df: pd.DataFrame, workers: int | None = None) -> pd.DataFrame:
    """Decode every image once; one row per image: img_path, ok, mode, width, height, odd, problem."""
    if not isinstance(df, pd.DataFrame) or "img_path" not in df.columns:
        columns = list(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ValueError(f"check_images: need a table with an 'img_path' column (got {columns}); use "
                         "read_artworks(csv)")
    paths = list(df["img_path"])
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(_inspect, paths))
    report = pd.DataFrame(rows, columns=["img_path", "ok", "mode", "width", "height", "problem"])
    odd_mode = ~report["mode"].isin(["RGB", ""])
    small = report["ok"] & (report[["width", "height"]].min(axis=1) < 32)
    report["odd"] = np.where(odd_mode, "mode " + report["mode"] + " (converted to RGB)", "")
    report.loc[small, "odd"] = (report.loc[small, "odd"] + " small (<32 px)").str.strip()
    return report[["img_path", "ok", "mode", "width", "height", "odd", "problem"]]


def bad_images_message(bad: pd.DataFrame, source) -> str:
    """List unreadable images with their reasons."""
    named = [f"{p} ({why})" for p, why in zip(bad["img_path"], bad["problem"])]
    return f"{source}: {len(bad)} unreadable image(s): {listing(named, len(named))}"


def _apply_image_check(df: pd.DataFrame, on_bad: str, source) -> pd.DataFrame:
    """Raise on, or drop with a warning, rows whose image cannot be decoded."""
    report = check_images(df)
    bad = report[~report["ok"].to_numpy()]
    if bad.empty:
        return df
    message = bad_images_message(bad, source)
    if on_bad == "raise":
        raise ValueError(message + "; remove or replace them, or pass on_bad='drop' to skip them")
    warnings.warn(message + f"; dropped {len(bad)} row(s)", stacklevel=3)
    return df[report["ok"].to_numpy()]


PRESIZE_FACTOR = 1.15  # the image store's shorter side per pixel of training size (multicrop's scale too)


def presize_for(size: int) -> int:
    """Shorter side kept in the cache: a bit above the training size."""
    return int(math.ceil(size * PRESIZE_FACTOR))


def shrink(img: Image.Image, presize: int) -> Image.Image:
    """Downscale so the shorter side is presize (never upscale), keeping aspect."""
    short = min(img.size)
    if short <= presize:
        return img
    scale = presize / short
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)

