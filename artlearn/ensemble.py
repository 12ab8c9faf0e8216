"""Fold ensembles with horizontal-flip test-time augmentation, and the submission file."""
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .checkpoint import atomic_write_csv, load_fold
from .data import PresizeCache, presize_for, read_artworks, valid_crop

TTA_CHOICES = (None, "none", "flip", "multicrop")
AVERAGE_CHOICES = ("prob", "logit")


def _fold_dirs(source, folds) -> list:
    """Fold folders from a run (object or directory) or an explicit list of fold folders."""
    from .kfold import KFoldRun, load_run
    if isinstance(source, (list, tuple)):
        if folds is not None:
            raise ValueError("pass `folds` only with a run; with a list of fold folders, list the ones you want")
        return [Path(p) for p in source]
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
    """Folds must share vocabulary and input size."""
    for key in ("vocab", "size"):
        values = {str(m.get(key)) for m in metas}
        if len(values) > 1:
            detail = "; ".join(f"{d}: {m.get(key) if key == 'size' else len(m.get(key) or [])}"
                               for d, m in zip(dirs, metas))
            if key == "vocab":
                sets = [set(m.get(key) or []) for m in metas]
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
    if isinstance(items, (str, Path)):
        raise ValueError(f"items={str(items)!r}: pass a test CSV, a DataFrame with img_path, or a list of image paths")
    return pd.DataFrame({"img_path": [str(p) for p in items]})


def _resolve_device(device):
    """The requested device, else CUDA when available."""
    import torch
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _native_crops(arr: np.ndarray, size: int) -> list:
    """Five size x size windows (centre and four corners) of a cached image, without resizing."""
    img = Image.fromarray(arr)
    if min(img.size) < size:
        img = img.resize((max(size, round(img.width * size / min(img.size))),
                          max(size, round(img.height * size / min(img.size)))), Image.Resampling.BILINEAR)
    w, h = img.size
    boxes = [((w - size) // 2, (h - size) // 2), (0, 0), (w - size, 0), (0, h - size), (w - size, h - size)]
    return [np.asarray(img.crop((x, y, x + size, y + size))) for x, y in boxes]


def _item_views(arr: np.ndarray, size: int, tta) -> list:
    """One image's evaluation crops: the centre square resized to size, plus five native crops with 'multicrop'."""
    views = [np.asarray(valid_crop(Image.fromarray(arr), size))]
    return views + _native_crops(arr, size) if tta == "multicrop" else views


def crop_batch(cache: PresizeCache, paths, size: int, tta=None, pool=None):
    """uint8 tensor (n_views, n, 3, size, size) of the evaluation crops of cached images (threads when `pool`)."""
    import torch
    mapper = pool.map if pool is not None else map
    per_item = list(mapper(lambda p: _item_views(cache.get(p), size, tta), paths))
    views = np.stack([np.stack(v) for v in zip(*per_item)])
    return torch.from_numpy(views).permute(0, 1, 4, 2, 3).contiguous()


def _views(x, tta):
    """The test-time views of one crop batch: the crop, and its horizontal flip unless TTA is off."""
    return [x, x.flip(3)] if tta in ("flip", "multicrop") else [x]


def _log_prior(meta: dict, device):
    """log of the fold's training class frequencies (add-one smoothed), for post-hoc logit adjustment."""
    import torch
    counts = meta.get("class_counts")
    if counts is None:
        raise ValueError("prior_adjust needs the class counts in meta.json (folds trained by artlearn >= 0.1 with "
                         "artist_dls record them); retrain the fold or pass prior_adjust=0")
    counts = torch.tensor(counts, dtype=torch.float32, device=device) + 1.0
    return (counts / counts.sum()).log()


def ensemble(run_or_fold_dirs, items, folds=None, tta: str | None = "flip", average: str = "prob", bs: int = 64,
             device=None, cache: PresizeCache | None = None, workers: int | None = None,
             precision: str = "auto", prior_adjust: float = 0.0):
    """Average each fold's softmax (or logits) over the image and its flip; returns (probs[n, n_artists], vocab).

    Every image is decoded and cropped once for all folds and views; each fold is loaded from its folder alone and
    normalised with its own training statistics. tta: 'flip' (image + horizontal flip), None, or 'multicrop' (the
    flip views plus five native-resolution crops of the cached image and their flips). `prior_adjust=tau`
    subtracts tau * log(training class frequency) from each fold's logits (post-hoc logit adjustment, which
    trades a little accuracy on frequent artists for recall on rare ones).
    """
    import torch
    from concurrent.futures import ThreadPoolExecutor
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta={tta!r}: use 'flip', 'multicrop' or None")
    if average not in AVERAGE_CHOICES:
        raise ValueError(f"average={average!r}: use 'prob' (mean of softmax) or 'logit' (softmax of mean logits)")
    dirs = _fold_dirs(run_or_fold_dirs, folds)
    device = _resolve_device(device)
    loaded = [load_fold(d, device=device) for d in dirs]
    if device.type == "cuda":
        loaded = [(m.to(memory_format=torch.channels_last), meta) for m, meta in loaded]
    metas = [m for _, m in loaded]
    _check_compatible(metas, dirs)
    size, vocab = int(metas[0]["size"]), list(metas[0]["vocab"])
    table = _items_table(items)
    cache = cache if cache is not None else PresizeCache(presize_for(size), workers=workers)
    cache.fill(table["img_path"], source="items")
    stats = [(torch.tensor(m["mean"], device=device).view(1, 3, 1, 1),
              torch.tensor(m["std"], device=device).view(1, 3, 1, 1)) for m in metas]
    shifts = [prior_adjust * _log_prior(m, device) if prior_adjust else 0.0 for m in metas]
    autocast = _autocast(device, precision)
    out = np.zeros((len(table), len(vocab)), dtype=np.float32)
    pool = ThreadPoolExecutor(max_workers=cache.workers)
    with pool, torch.inference_mode(), autocast:
        for start in range(0, len(table), bs):
            crops = crop_batch(cache, table["img_path"].iloc[start:start + bs], size, tta, pool).to(device)
            acc, n_views = 0, 0
            for (model, _), (mean, std), shift in zip(loaded, stats, shifts):
                for x in crops:
                    for view in _views((x.float().div_(255) - mean) / std, tta):
                        logits = model(_memory_format(view, device)).float() - shift
                        acc, n_views = acc + (logits.softmax(1) if average == "prob" else logits), n_views + 1
            acc = acc / n_views
            out[start:start + crops.shape[1]] = (acc if average == "prob" else acc.softmax(1)).cpu().numpy()
    return out, vocab


def _autocast(device, precision: str):
    """bf16/fp16 autocast on CUDA per `precision`; a no-op context on CPU or with 'fp32'."""
    import contextlib
    import torch
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


def _memory_format(x, device):
    """channels-last on CUDA (faster convolutions), unchanged on CPU."""
    import torch
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def write_submission(ids, probs, vocab, path) -> Path:
    """Write `id,artist` (the most probable artist per row) in the order of ids, every id once, atomically."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(path, sub)
    return path
