"""Fold checkpoints on disk: atomic writes, safetensors weights, and loading a fold from its folder alone.

A fold folder holds `best.safetensors` (the weights), `meta.json` (how to rebuild the model: `meta['model']`
is the model's `config`, plus vocab, image size and normalisation stats) and `history.csv`. Weights are
only ever read with safetensors, which parses tensors and runs no code: pickled formats are refused.
"""
import json
import math
import numbers
from pathlib import Path

from .files import atomic_write_bytes, atomic_write_csv  # noqa: F401 (atomic_write_csv: old import path)
from .rng import fork_global_rng

__all__ = ["WEIGHTS_NAME", "META_NAME", "HISTORY_NAME", "save_weights", "load_weights", "weight_shapes", "read_meta",
           "check_meta", "load_fold"]

WEIGHTS_NAME, META_NAME, HISTORY_NAME = "best.safetensors", "meta.json", "history.csv"
META_FORMAT, META_FORMAT_VERSION = "artlearn-fold", 2
_PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")
MAX_SIZE, MAX_CLASSES = 4096, 100_000  # bounds of a meta.json's image size and class count (checked before building)


def fold_meta(model_config: dict, data: dict, fold: int, epoch, monitor: str, score, complete: bool, ema=None,
              stopped=None, extra: dict | None = None) -> dict:
    """The content of a fold's meta.json: how to rebuild the model, the data it expects, where training stands.

    `model` (the config for `build_model(**meta['model'])`), arch, depth, pool, n_classes, vocab, size, mean, std
    (0-1 scale), fold, epoch, monitor, score, complete, the data's n_folds, split_seed and class_counts, ema,
    pipeline and store_side (the image store's shorter side, which evaluation reuses), the format version;
    `stopped` when a fit was stopped; then the entries of `extra` (which cannot override these).
    """
    from . import __version__
    meta = dict(extra or {})
    meta.update(format=META_FORMAT, format_version=META_FORMAT_VERSION, model=model_config,
                arch=model_config["arch"], depth=model_config.get("depth"), pool=model_config.get("pool"),
                n_classes=model_config["n_classes"], vocab=data["vocab"], size=data.get("size"),
                mean=data.get("mean"), std=data.get("std"), fold=int(fold), epoch=epoch, monitor=monitor, score=score,
                complete=bool(complete), artlearn_version=__version__, n_folds=data.get("n_folds"),
                split_seed=data.get("seed"), class_counts=data.get("class_counts"), ema=ema,
                pipeline=data.get("pipeline", "items"), store_side=data.get("store_side"))
    if stopped:
        meta["stopped"] = stopped
    return meta


def _state_dict(model_or_state) -> dict:
    """A module's state dict, or the dict itself."""
    return model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()


def save_weights(path, model_or_state) -> Path:
    """Atomically save a model's (or a state dict's) tensors as safetensors: contiguous CPU copies."""
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _state_dict(model_or_state).items()}
    return atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def _refuse_pickle(path: Path) -> None:
    """ValueError for weights in a pickle-based format (loading those can run arbitrary code)."""
    raise ValueError(f"{path}: refusing to load {path.suffix!r} weights; artlearn reads only safetensors "
                     "('best.safetensors'), because torch.load/pickle files can execute arbitrary code when "
                     "loaded. Convert trusted weights with safetensors.torch.save_file, or retrain the fold")


def _unreadable_weights(path: Path, e: Exception) -> ValueError:
    """The error for a weights file that safetensors cannot parse."""
    return ValueError(f"{path} is truncated or not a safetensors file: retrain this fold or delete its folder "
                      f"({type(e).__name__}: {e})")


def _check_weights_path(path: Path) -> None:
    """Refuse pickle formats and missing files."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")


def load_weights(path) -> dict:
    """Tensors of a safetensors file; ValueError if it is truncated, corrupt or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    _check_weights_path(path)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable_weights(path, e) from None


def weight_shapes(path) -> dict:
    """name -> shape of every tensor of a safetensors file, from its header alone (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    _check_weights_path(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable_weights(path, e) from None


def _is_int(value, low: int, high: int) -> bool:
    """An integer (not a bool) in [low, high]."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high


def _stats_ok(values) -> bool:
    """Three finite numbers (a per-channel mean or std)."""
    return (isinstance(values, list) and len(values) == 3
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values))


def _meta_problem(meta: dict) -> str | None:
    """What makes a meta.json inconsistent or out of bounds (None when it is fine)."""
    model = meta["model"]
    n = model.get("n_classes")
    if not _is_int(n, 1, MAX_CLASSES):
        return f"'model.n_classes' is {n!r}; need an integer in 1..{MAX_CLASSES}"
    if "n_classes" in meta and meta["n_classes"] != n:
        return f"'n_classes' is {meta['n_classes']!r} but 'model.n_classes' is {n}"
    vocab = meta.get("vocab")
    if vocab is not None:
        if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
            return "'vocab' must be a list of artist names (text)"
        if len(set(vocab)) != len(vocab):
            return f"'vocab' lists {len(vocab) - len(set(vocab))} artist(s) twice"
        if len(vocab) != n:
            return f"'vocab' has {len(vocab)} artist(s) but the model has {n} classes"
    size = meta.get("size")
    if size is not None and not _is_int(size, 8, MAX_SIZE):
        return f"'size' is {size!r}; need an integer image size in 8..{MAX_SIZE}"
    side = meta.get("store_side")
    if side is not None and not _is_int(side, 8, MAX_SIZE):
        return f"'store_side' is {side!r}; need an integer shorter side in 8..{MAX_SIZE}"
    for key in ("mean", "std"):
        if meta.get(key) is not None and not _stats_ok(meta[key]):
            return f"{key!r} must be 3 finite numbers (one per RGB channel), not {meta[key]!r}"
    if meta.get("std") is not None and min(meta["std"]) <= 0:
        return f"'std' must be positive, not {meta['std']!r}"
    return None


def read_meta(path) -> dict:
    """The parsed `meta.json` of a fold folder (or the file itself), checked for consistency and bounds."""
    path = Path(path)
    meta_path = path / META_NAME if path.is_dir() else path
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no meta.json, so this is not a fold checkpoint folder "
                                "(or its training never finished an epoch)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): retrain this fold or delete its folder") from None
    check_meta(meta, meta_path)
    return meta


def check_meta(meta, meta_path) -> None:
    """ValueError naming the file when a meta.json is not a fold's (no model entry), inconsistent or out of bounds."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{meta_path} has no 'model' entry (the model config for build_model)")
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{meta_path}: {problem}; the file was edited or damaged: retrain this fold or delete its "
                         "folder")


def _fold_files(path: Path) -> tuple[Path, Path]:
    """(folder, weights file) for a fold folder, its meta.json or its weights file."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
            if pickles:
                _refuse_pickle(path / pickles[0])
        return path, weights
    if path.name == META_NAME:
        return path.parent, path.parent / WEIGHTS_NAME
    return path.parent, path


def _rebuild(meta: dict, meta_path: Path):
    """The model described by `meta['model']`, or a ValueError naming the meta file."""
    from .models import ARCHITECTURES, build_model
    arch = meta["model"].get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{meta_path}: unknown architecture {arch!r} in 'model'; this artlearn knows "
                         f"{list(ARCHITECTURES)} (was the fold trained with a newer version?)")
    try:
        with fork_global_rng():  # the random init is overwritten anyway
            return build_model(**meta["model"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{meta_path}: cannot rebuild the model from its 'model' entry: {e}") from None


def _expected_shapes(meta: dict, meta_path: Path) -> dict:
    """name -> shape of the model meta.json describes, built on the 'meta' device (no memory allocated)."""
    import torch
    with torch.device("meta"):
        model = _rebuild(meta, meta_path)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(shapes: dict, expected: dict, arch: str, weights_path: Path) -> None:
    """ValueError naming the first missing, unexpected or wrongly shaped tensor."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing:
        raise ValueError(f"{weights_path}: missing tensor {missing[0]!r} ({len(missing)} missing) for "
                         f"{arch}: the weights belong to another architecture")
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected) "
                         f"for {arch}: the weights belong to another architecture")
    for k, shape in expected.items():
        if tuple(shapes[k]) != tuple(shape):
            raise ValueError(f"{weights_path}: tensor {k!r} has shape {tuple(shapes[k])} but the model "
                             f"in meta.json expects {tuple(shape)}")


def _check_state(state: dict, model, weights_path: Path) -> None:
    """ValueError naming the first wrongly shaped or non-finite tensor."""
    _check_shapes({k: tuple(v.shape) for k, v in state.items()},
                  {k: tuple(v.shape) for k, v in model.state_dict().items()}, model.config["arch"], weights_path)
    for k, v in state.items():
        if v.is_floating_point() and not bool(v.isfinite().all()):
            raise ValueError(f"{weights_path}: tensor {k!r} holds NaN/inf values: retrain this fold")


def load_fold(path, device="cpu"):
    """(model in eval mode, meta) of a fold folder: meta.json checked, shapes compared before any allocation."""
    path = Path(path)
    folder, weights_path = _fold_files(path)
    meta = read_meta(folder)
    shapes = weight_shapes(weights_path)
    _check_shapes(shapes, _expected_shapes(meta, folder / META_NAME), meta["model"].get("arch"), weights_path)
    model = _rebuild(meta, folder / META_NAME)
    state = load_weights(weights_path)
    _check_state(state, model, weights_path)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
