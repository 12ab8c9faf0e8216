"""Fold ensembles with horizontal-flip test-time augmentation, top-k predictions, and the submission file."""
import contextlib
import logging
import numbers
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .checkpoint import META_NAME, atomic_write_csv, load_fold
from .checks import ArtlearnError, check_number
from .augment import center_views, valid_crop
from .device import autocast, resolve_device, to_memory_format
from .store import PresizeCache, fold_store_side, pad_batch
from .tables import read_artworks
from .tta import tta_spec
# and, inside _fold_dirs: from .run import KFoldRun, load_run

AVERAGE_CHOICES = ("prob", "logit")
PREDICT_COLUMNS = ["image", "rank", "artist", "probability"]
logger = logging.getLogger("artlearn")


def _is_fold_dir(path) -> bool:
    """A folder holding a fold checkpoint's meta.json (and no run config.json)."""
    path = Path(path)
    return (path / META_NAME).is_file() and not (path / "config.json").is_file()


def _fold_dirs(source, folds) -> list:
    """Fold folders from a run (object or directory), one fold folder, or an explicit list of fold folders."""
    from .run import KFoldRun, load_run
    if isinstance(source, (str, Path)) and _is_fold_dir(source):
        source = [source]
    if isinstance(source, (list, tuple)):
        if folds is not None:
            raise ValueError(f"folds={folds!r}: pass `folds` only with a run; with fold folders, list the ones "
                             "you want")
        return [Path(p) for p in source]
    if isinstance(source, (str, Path)) and Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise ValueError(f"{source}: neither a run directory (no config.json) nor a fold folder (no {META_NAME}); "
                         "pass the folder train_kfold wrote, or one of its fold<k> folders")
    run = source if isinstance(source, KFoldRun) else load_run(source)
    if folds is None:
        selected = (run.summary.get("selection") or {}).get("folds")
        folds = selected if selected else run.folds
    folds = list(folds)
    missing = [f for f in folds if f not in run.folds]
    if missing:
        raise ValueError(f"{run.path}: folds {missing} have no complete checkpoint (complete: {run.folds})")
    if not folds:
        raise ValueError(f"{run.path}: no fold to ensemble; train the run first")
    return [run.fold_dir(f) for f in folds]


def _check_compatible(metas: list, dirs: list) -> None:
    """Folds must share vocabulary, input size and evaluation pipeline."""
    for key in ("vocab", "size", "pipeline", "store_side"):  # an absent pipeline is 'items' (FoldMeta's metadata)
        values = {str(getattr(m, key)) for m in metas}
        if len(values) > 1:
            detail = "; ".join(f"{d}: {len(m.vocab or []) if key == 'vocab' else getattr(m, key)}"
                               for d, m in zip(dirs, metas))
            if key == "vocab":
                sets = [set(m.vocab or []) for m in metas]
                detail += f"; artists not in every fold: {sorted(set.union(*sets) - set.intersection(*sets))}"
            raise ValueError(f"the folds were trained with different {key}s ({detail}); ensemble only folds of one "
                             "run")


def _items_table(items) -> pd.DataFrame:
    """Items as a DataFrame with img_path: a DataFrame, a CSV path or a list of image paths."""
    if isinstance(items, pd.DataFrame):
        if "img_path" not in items.columns:
            raise ValueError(f"items DataFrame needs an 'img_path' column (columns are {list(items.columns)})")
        return items.reset_index(drop=True)
    if isinstance(items, (str, Path)) and str(items).lower().endswith(".csv"):
        return read_artworks(items, kind="test")
    if isinstance(items, (str, Path)) and Path(items).is_dir():
        raise ValueError(f"items={str(items)!r} is a folder: pass a test CSV, a DataFrame with img_path, or image "
                         "paths (e.g. sorted(Path(folder).glob('*.jpg')))")
    if isinstance(items, (str, Path)):
        return pd.DataFrame({"img_path": [str(items)]})
    return pd.DataFrame({"img_path": [str(p) for p in items]})


def _image_list(images) -> list | None:
    """The images as a list when they are paths and/or PIL images; None for a table (DataFrame or CSV)."""
    if isinstance(images, pd.DataFrame) or (isinstance(images, (str, Path))
                                            and str(images).lower().endswith(".csv")):
        return None
    items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
    bad = [type(x).__name__ for x in items if not isinstance(x, (str, Path, Image.Image))]
    if bad:
        raise ValueError(f"images holds {bad[0]} values: pass image paths, PIL images, a test CSV or a DataFrame "
                         "with img_path")
    return items


def _stage(images, folder: Path) -> tuple[list, pd.DataFrame]:
    """(labels, table with img_path): PIL images saved losslessly (TIFF keeps every mode) into `folder`."""
    items = _image_list(images)
    if items is None:
        table = _items_table(images)
        return table["img_path"].astype(str).tolist(), table
    labels, paths = [], []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            path = folder / f"image{i}.tiff"
            item.save(path, format="TIFF")
            labels.append(f"<PIL image {i}>")
            paths.append(str(path))
        else:
            labels.append(str(item))
            paths.append(str(item))
    return labels, _items_table(paths)


class _ReadThrough:
    """Cache for new images: reads what `base` already holds and decodes the rest into a short-lived cache."""

    def __init__(self, base, presize: int, cache_dir: Path, workers: int | None = None):
        self.base = base if base is not None and getattr(base, "presize", None) == presize else None
        self.own = PresizeCache(presize, cache_dir=cache_dir, workers=workers)
        self.workers = self.own.workers

    def _held(self, path) -> bool:
        """Whether `base` holds the current version of the file."""
        return self.base is not None and str(path) in self.base

    def fill(self, paths, source="images") -> None:
        """Decode every path `base` does not hold into the short-lived cache."""
        self.own.fill([p for p in map(str, paths) if not self._held(p)], source=source)

    def get(self, path) -> np.ndarray:
        """The cached array, from `base` when it holds the image."""
        return self.base.get(path) if self._held(str(path)) else self.own.get(path)


@contextlib.contextmanager
def _inputs(images, presize: int, cache=None, workers=None, keep_new: bool = False):
    """(labels, table, cache) for images, stored at shorter side `presize`: PIL images live in a temporary folder
    and a short-lived cache only.

    keep_new=True (ensemble's contract) decodes image files into `cache` (or a new PresizeCache); otherwise the
    passed cache is only read, and images it does not hold go to a short-lived cache in the temporary folder.
    """
    items = _image_list(images)
    has_pil = items is not None and any(isinstance(x, Image.Image) for x in items)
    if keep_new and not has_pil:
        if cache is not None and getattr(cache, "presize", presize) != presize:
            raise ValueError(f"cache stores images at a shorter side of {cache.presize} px, but the folds were trained "
                             f"from a store at {presize} px; pass PresizeCache({presize}) (or the training run's "
                             "cache), or no cache")
        table = _items_table(images)
        yield table["img_path"].astype(str).tolist(), table, cache if cache is not None else PresizeCache(
            presize, workers=workers)
        return
    with tempfile.TemporaryDirectory(prefix="artlearn-predict-") as tmp:
        labels, table = _stage(images, Path(tmp))
        yield labels, table, _ReadThrough(cache, presize, Path(tmp) / "cache", workers)


def crop_batch(cache: PresizeCache, paths, size: int, pool=None):
    """uint8 tensor (1, n, 3, size, size): the items pipeline's centre views (PIL's `valid_crop`) of cached images
    (threads when `pool`)."""
    import torch
    mapper = pool.map if pool is not None else map
    views = np.stack(list(mapper(lambda p: np.asarray(valid_crop(Image.fromarray(cache.get(p)), size)), paths)))
    return torch.from_numpy(views[None]).permute(0, 1, 4, 2, 3).contiguous()


def _crops(cache, paths, size: int, tta, pool, device, pipeline: str) -> list:
    """The evaluation crops of a batch: the centre view as training validated it (the device pipeline's
    `augment.center_views` of the stored pixels, float 0..255, or PIL's), then the registered TTA's windows."""
    import torch
    if pipeline != "device":
        views = list(crop_batch(cache, paths, size, pool).to(device))
    else:
        stored = [torch.from_numpy(np.ascontiguousarray(cache.get(p))).permute(2, 0, 1) for p in paths]
        views = [center_views(*pad_batch(stored, device), size)]
    spec = tta_spec(tta)
    return views + (list(spec.windows(cache, paths, size, pool, device)) if spec.n_windows else [])


def _views(x, tta):
    """The test-time views of one crop batch: the crop, and its horizontal flip when the TTA mirrors."""
    return [x, x.flip(3)] if tta_spec(tta).mirror else [x]


def _log_prior(meta, device):
    """log of the fold's training class frequencies (add-one smoothed), for post-hoc logit adjustment."""
    import torch
    counts = meta.class_counts
    if counts is None:
        raise ValueError("prior_adjust needs the class counts in meta.json (folds trained by artlearn >= 0.1 with "
                         "artist_dls record them); retrain the fold or pass prior_adjust=0")
    counts = torch.tensor(counts, dtype=torch.float32, device=device) + 1.0
    return (counts / counts.sum()).log()


def _check_args(bs, prior_adjust) -> None:
    """ValueError for a batch size below 1 or a negative (or non-finite) prior adjustment, before any fold loads."""
    check_number("bs", bs, 1, integer=True)
    check_number("prior_adjust", prior_adjust, 0.0)


def _check_choices(tta, average) -> None:
    """ValueError for an unknown TTA or averaging mode."""
    tta_spec(tta)
    if average not in AVERAGE_CHOICES:
        raise ValueError(f"average={average!r}: use 'prob' (mean of softmax) or 'logit' (softmax of mean logits)")


def load_folds(run_or_fold_dirs, folds, device) -> tuple[list, list, object]:
    """(models, metas, device) of the selected folds, checked to share vocabulary and size."""
    import torch
    dirs = _fold_dirs(run_or_fold_dirs, folds)
    device = resolve_device(device)
    loaded = [load_fold(d, device=device) for d in dirs]
    loaded = [(m.to(memory_format=torch.channels_last), meta) for m, meta in loaded]  # as trained, every device
    metas = [m for _, m in loaded]
    _check_compatible(metas, dirs)
    return [m for m, _ in loaded], metas, device


def fold_stats(meta, device="cpu") -> tuple:
    """(mean, std) tensors of shape (1, 3, 1, 1): a fold's normalisation statistics (its FoldMeta or DataMeta)."""
    import torch
    return (torch.tensor(meta.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(meta.std, device=device).view(1, 3, 1, 1))


def normalise(crops, mean, std):
    """Crops (n, 3, s, s) in 0..255 (uint8, or float views) as the float input of a fold: (x / 255 - mean) / std."""
    return (crops.float() / 255 - mean) / std  # never in place: the same crops feed every fold


def _progress(starts, progress: bool):
    """The batch starts, under a fastprogress bar when `progress`."""
    if not progress:
        return starts
    from fastprogress.fastprogress import progress_bar
    return progress_bar(starts, leave=False)


def _probs(models, metas, table, cache, device, tta=None, average="prob", bs=64, precision="auto",
           prior_adjust=0.0, progress=False) -> np.ndarray:
    """Ensembled probabilities (n, n_artists) of the table's images, read through `cache`."""
    import torch
    from concurrent.futures import ThreadPoolExecutor
    size, n_classes = int(metas[0].size), len(metas[0].vocab)
    cache.fill(table["img_path"], source="items")
    stats = [fold_stats(m, device) for m in metas]
    shifts = [prior_adjust * _log_prior(m, device) if prior_adjust else 0.0 for m in metas]
    out = np.zeros((len(table), n_classes), dtype=np.float32)
    pool = ThreadPoolExecutor(max_workers=cache.workers)
    with pool, torch.inference_mode(), autocast(device, precision):
        for start in _progress(range(0, len(table), bs), progress):
            paths = table["img_path"].iloc[start:start + bs]
            crops = _crops(cache, paths, size, tta, pool, device, metas[0].pipeline)
            acc, n_views = 0, 0
            for model, (mean, std), shift in zip(models, stats, shifts):
                for x in crops:
                    for view in _views(normalise(x, mean, std), tta):
                        logits = model(to_memory_format(view, device)).float() - shift
                        acc, n_views = acc + (logits.softmax(1) if average == "prob" else logits), n_views + 1
            acc = acc / n_views
            out[start:start + len(paths)] = (acc if average == "prob" else acc.softmax(1)).cpu().numpy()
    return out


def ensemble(run_or_fold_dirs, items, folds=None, tta: str | None = "flip", average: str = "prob", bs: int = 64,
             device=None, cache: PresizeCache | None = None, workers: int | None = None,
             precision: str = "auto", prior_adjust: float = 0.0, progress: bool = False):
    """Average each fold's softmax (or logits) over the image and its flip; returns (probs[n, n_artists], vocab).

    `run_or_fold_dirs`: a run (KFoldRun or its folder: summary.json's selected folds, else every complete fold),
    one fold folder, or a list of fold folders. `items`: a test CSV, a DataFrame with img_path, image paths (or
    one path), or PIL images (kept in a temporary folder, never in `cache`). Every image is decoded and cropped
    once for all folds and views (into `cache` when given); each fold is loaded from its folder alone and
    normalised with its own training statistics. tta: 'flip' (image + horizontal flip), None, or 'multicrop'
    (the flip views plus five native-resolution crops of the cached image and their flips). `prior_adjust=tau`
    subtracts tau * log(training class frequency) from each fold's logits (post-hoc logit adjustment, which
    trades a little accuracy on frequent artists for recall on rare ones). `progress`: a bar over the batches.
    """
    _check_choices(tta, average)
    _check_args(bs, prior_adjust)
    models, metas, device = load_folds(run_or_fold_dirs, folds, device)
    with _inputs(items, fold_store_side(metas[0]), cache, workers, keep_new=True) as (_, table, source):
        probs = _probs(models, metas, table, source, device, tta, average, bs, precision, prior_adjust, progress)
    return probs, list(metas[0].vocab)


def _check_k(k) -> None:
    """ValueError unless k is a whole number of at least 1."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r}: need a whole number of at least 1 (how many artists to list per image)")


def top_k(labels, probs, vocab, k: int = 5) -> pd.DataFrame:
    """Rows (image, rank, artist, probability) of each image's k most probable artists (rank 1 = argmax)."""
    _check_k(k)
    probs = np.asarray(probs)
    k = min(int(k), len(vocab))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # stable: ties keep argmax's first index
    return pd.DataFrame({"image": np.repeat(np.asarray(labels, dtype=object), k),
                         "rank": np.tile(np.arange(1, k + 1), len(labels)),
                         "artist": np.asarray(vocab, dtype=object)[order].ravel(),
                         "probability": np.take_along_axis(probs, order, 1).ravel().astype(float)},
                        columns=PREDICT_COLUMNS)


def predict(run_or_fold_dirs, images, k: int = 5, tta: str | None = "flip", folds=None, average: str = "prob",
            bs: int = 64, device=None, cache: PresizeCache | None = None, workers: int | None = None,
            precision: str = "auto", prior_adjust: float = 0.0, progress: bool = False) -> pd.DataFrame:
    """The k most probable artists per image from the fold ensemble: columns image, rank, artist, probability.

    Same folds, views and averaging as `ensemble` (rank 1 is its argmax); `images`: one path, a list of paths,
    a PIL image or a list of them, a test CSV or a DataFrame with img_path. k above the number of artists lists
    them all. A `cache` (e.g. the training one) is only read: new images are decoded into a short-lived cache
    in a temporary folder, removed on return, as are the PIL images.
    """
    _check_k(k)
    _check_choices(tta, average)
    _check_args(bs, prior_adjust)
    models, metas, device = load_folds(run_or_fold_dirs, folds, device)
    with _inputs(images, fold_store_side(metas[0]), cache, workers, keep_new=False) as (labels, table, source):
        probs = _probs(models, metas, table, source, device, tta, average, bs, precision, prior_adjust, progress)
    logger.debug("predict: %d image(s), %d fold(s), tta=%s", len(labels), len(models), tta)
    return top_k(labels, probs, list(metas[0].vocab), k)


def eval_crops(images, meta) -> tuple[list, object]:
    """(labels, uint8 tensor (n, 3, s, s)): a fold's plain evaluation view (its store side and pipeline), no cache
    kept."""
    import torch
    size, pipeline = int(meta.size), meta.pipeline
    with _inputs(images, fold_store_side(meta)) as (labels, table, source):
        source.fill(table["img_path"], source="images")
        crops = _crops(source, table["img_path"], size, None, None, torch.device("cpu"), pipeline)[0] \
            if len(table) else None
    return labels, None if crops is None else crops.round().clamp(0, 255).to(torch.uint8)



def write_submission(ids, probs, vocab, path) -> Path:
    """Write `id,artist` (the most probable artist per row) in the order of ids, every id once, atomically (a path
    that is a folder, or a place that cannot be written, is an ArtlearnError naming it; nothing is half-written)."""
    if Path(path).is_dir():
        raise ArtlearnError(f"{path} is a folder; give the submission's file name "
                            f"(e.g. {Path(path) / 'submission.csv'})")
    ids = [str(i) for i in ids]
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] != len(ids):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(ids)}, {len(vocab)}) — one row per id")
    if probs.shape[1] != len(vocab):
        raise ValueError(f"probs has {probs.shape[1]} columns but the vocabulary has {len(vocab)} artists")
    dup = pd.Series(ids)[pd.Series(ids).duplicated()].unique()
    if len(dup):
        raise ValueError(f"{len(dup)} duplicated id(s) in the submission ids: {list(dup[:5])}; "
                         "each id must appear once")
    if not np.isfinite(probs).all():
        raise ValueError("probs has NaN or inf values; refusing to write a submission from them")
    sub = pd.DataFrame({"id": ids, "artist": [vocab[i] for i in probs.argmax(1)]})
    return atomic_write_csv(Path(path), sub)
