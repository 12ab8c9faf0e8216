"""Fold checkpoints on disk: atomic writes, safetensors weights, and loading a fold from its folder alone.

A fold folder holds `best.safetensors` (the weights), `meta.json` (a `FoldMeta`: how to rebuild the model,
`meta.model` being the model's `config`, plus vocab, image size and normalisation stats) and `history.csv`. Weights are
only ever read with safetensors, which parses tensors and runs no code: pickled formats are refused.
"""
import hashlib
import json
import logging
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from .files import atomic_write_bytes, atomic_write_csv  # noqa: F401 (atomic_write_csv: old import path)
from .checks import MAX_SIDE, MIN_SIDE
from .recipe import DEFAULT  # the recipe's sentinel: 'absence means the default'
from .rng import fork_global_rng
from .runconfig import CONFIG_NAME as RUN_CONFIG_NAME, FOLDS_NAME as RUN_FOLDS_NAME, read_config, run_identity

__all__ = ["WEIGHTS_NAME", "META_NAME", "HISTORY_NAME", "DataMeta", "FoldMeta", "save_weights", "load_weights",
           "weight_shapes", "read_meta", "check_meta", "load_fold", "fold_identity", "identity_problem", "file_sha256"]

WEIGHTS_NAME, META_NAME, HISTORY_NAME = "best.safetensors", "meta.json", "history.csv"
META_FORMAT, META_FORMAT_VERSION = "artlearn-fold", 3  # version 3 adds run_id and weights_sha256
logger = logging.getLogger("artlearn")
_PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")
MAX_CLASSES = 100_000  # the bound of a meta.json's class count (checked before building); sides: checks.MAX_SIDE


FROM_MODEL = "the model config's"  # what an absent arch, depth, pool or n_classes means: the value in 'model'


def _absent(default, absent=DEFAULT):
    """A field whose absence from an older meta.json means `absent` (its default when not given)."""
    return field(default=default, metadata={"absent": default if absent is DEFAULT else absent})


class _JsonMapping(Mapping):
    """Read-only Mapping protocol over `to_json()` (so `meta["size"]`, `meta.get(...)`, `dict(meta)` keep working);
    equal to another mapping with the same JSON form."""

    def __getitem__(self, key):
        """The JSON form's value of `key`."""
        return self.to_json()[key]

    def __iter__(self):
        """The JSON form's keys."""
        return iter(self.to_json())

    def __len__(self) -> int:
        """The number of JSON entries."""
        return len(self.to_json())

    def __eq__(self, other) -> bool:
        """Same JSON form (a DataMeta never equals a FoldMeta)."""
        if isinstance(other, _JsonMapping) and type(other) is not type(self):
            return False
        return isinstance(other, Mapping) and self.to_json() == dict(other)

    __hash__ = None  # like a dict: the model config and extras are mutable


def _tuple(values) -> tuple | None:
    """A list (of a JSON file or of a caller) as a tuple; None stays None."""
    return None if values is None else tuple(values)


@dataclass(frozen=True, eq=False, kw_only=True)
class DataMeta(_JsonMapping):
    """What a fold's checkpoint records about its data (made by `artist_dls`/`eval_dls`, carried by their
    `ArtistDataLoaders.data_meta`): vocab, image size, mean/std (0-1 scale), fold, training class counts, n_folds,
    split_seed, pipeline and store_side (the image store's shorter side, which evaluation reuses). Read-only
    Mapping protocol over `to_json()` (meta.json's names), for code that reads it as a dict."""
    vocab: tuple[str, ...] | None = _absent(None)
    size: int | None = _absent(None)
    mean: tuple[float, ...] | None = _absent(None)
    std: tuple[float, ...] | None = _absent(None)
    fold: int | None = _absent(None)
    class_counts: tuple[int, ...] | None = _absent(None)
    n_folds: int | None = _absent(None)
    split_seed: int | None = _absent(None)
    pipeline: str = _absent("items")  # folds trained before the device pipeline existed
    store_side: int | None = _absent(None)  # folds written before `store` existed: 1.15 x size (fold_store_side)

    def __post_init__(self):
        """vocab, mean, std and class_counts (lists in JSON or from a caller) kept as tuples."""
        for name in ("vocab", "mean", "std", "class_counts"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))

    def data_json(self) -> dict:
        """The data entries of meta.json (lists for tuples)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(DataMeta)}

    def to_json(self) -> dict:
        """The JSON form (meta.json's names and values)."""
        return self.data_json()

    def data(self) -> "DataMeta":
        """The data part alone."""
        return DataMeta(**{f.name: getattr(self, f.name) for f in fields(DataMeta)})


# meta.json's keys in the order the file has them (after the extra entries and epochs_run); the last three only
# when set
_WRITTEN = ("format", "format_version", "model", "arch", "depth", "pool", "n_classes", "vocab", "size", "mean", "std",
            "fold", "epoch", "monitor", "score", "complete", "artlearn_version", "n_folds", "split_seed",
            "class_counts", "ema", "pipeline", "store_side")
_WRITTEN_WHEN_SET = ("stopped", "weights_sha256", "run_id")


@dataclass(frozen=True, eq=False, kw_only=True)
class FoldMeta(DataMeta):
    """A fold's meta.json, typed: how to rebuild the model (`model`, the config for `build_model(**meta.model)`;
    arch, depth, pool, n_classes), the data it expects (`DataMeta`), where training stands (fold, epoch, monitor,
    score, complete, epochs_run, stopped, ema), its identity (run_id, weights_sha256), the format and the entries
    of `extra`. `from_json` validates, `to_json` is the file's content; what a key absent from an older file means
    is each field's metadata `absent`. Read-only Mapping protocol over `to_json()`, so `load_fold(...)[1]["size"]`
    keeps working."""
    model: dict
    format: str = _absent(META_FORMAT)
    format_version: int = _absent(META_FORMAT_VERSION, absent=1)
    arch: str | None = _absent(None, absent=FROM_MODEL)
    depth: int | None = _absent(None, absent=FROM_MODEL)
    pool: str | None = _absent(None, absent=FROM_MODEL)
    n_classes: int | None = _absent(None, absent=FROM_MODEL)
    epoch: int | None = _absent(None)
    monitor: str | None = _absent(None)
    score: float | None = _absent(None)
    complete: bool = _absent(False)
    artlearn_version: str | None = _absent(None)
    ema: float | None = _absent(None)
    epochs_run: int | None = _absent(None)  # written when a fit ends
    stopped: str | None = _absent(None)
    run_id: str | None = _absent(None)  # not recorded (folds written before format 3): not checked
    weights_sha256: str | None = _absent(None)
    extra: dict = field(default_factory=dict, metadata={"absent": {}})  # meta.json's other entries

    def __post_init__(self):
        """Own copies of the model config and the extra entries (those named like a field are dropped)."""
        super().__post_init__()
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "extra", {k: v for k, v in self.extra.items() if k not in FoldMeta.names()})

    @staticmethod
    def names() -> tuple:
        """meta.json's keys that are fields (every other entry is kept in `extra`)."""
        return tuple(f.name for f in fields(FoldMeta) if f.name != "extra")

    @staticmethod
    def absent_means() -> dict:
        """Every key -> what its absence from an older meta.json means (field metadata `absent`)."""
        return {f.name: f.metadata["absent"] for f in fields(FoldMeta) if "absent" in f.metadata}

    @classmethod
    def build(cls, model_config: dict, data: DataMeta, fold: int, epoch, monitor: str, score, complete: bool,
              ema=None, stopped=None, epochs_run=None, identity: dict | None = None, extra: dict | None = None):
        """A checkpoint's meta: the model's config, `data` (its fold replaced by `fold`), where training stands,
        `identity` (`fold_identity`: run_id, weights_sha256) and `extra` (which cannot override these)."""
        from . import __version__
        identity = {k: v for k, v in (identity or {}).items() if k in ("run_id", "weights_sha256")}
        return cls(**{**data.data_json(), "fold": int(fold)}, model=model_config, arch=model_config["arch"],
                   depth=model_config.get("depth"), pool=model_config.get("pool"),
                   n_classes=model_config["n_classes"], epoch=epoch, monitor=monitor, score=score,
                   complete=bool(complete), artlearn_version=__version__, ema=ema, epochs_run=epochs_run,
                   stopped=stopped or None, **identity, extra=dict(extra or {}))

    @classmethod
    def from_json(cls, meta, meta_path) -> "FoldMeta":
        """The FoldMeta of a parsed meta.json; ValueError naming `meta_path` when it is not a fold's (no model
        entry), inconsistent or out of bounds. Keys it lacks get what their absence means (`absent_means`)."""
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
            raise ValueError(f"{meta_path} has no 'model' entry (the model config for build_model)")
        problem = _meta_problem(meta)
        if problem:
            raise ValueError(f"{meta_path}: {problem}; the file was edited or damaged: retrain this fold or delete "
                             "its folder")
        names, absent = cls.names(), cls.absent_means()
        absent.update({k: meta["model"].get(k) for k, v in absent.items() if v == FROM_MODEL})
        return cls(**{k: meta[k] if k in meta else absent[k] for k in names},
                   extra={k: v for k, v in meta.items() if k not in names})

    def to_json(self) -> dict:
        """meta.json's content: the extra entries, epochs_run (once a fit ended), the fields, then stopped, the
        weights' sha256 and the run_id when set."""
        data = self.data_json()
        own = {k: data[k] if k in data else getattr(self, k) for k in _WRITTEN}
        own["model"] = dict(self.model)
        set_ = {k: v for k in _WRITTEN_WHEN_SET if (v := getattr(self, k)) is not None and (v or k != "stopped")}
        runs = {} if self.epochs_run is None else {"epochs_run": self.epochs_run}
        return {**self.extra, **runs, **own, **set_}


def file_sha256(path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_id_of(run_dir) -> str | None:
    """A run's identity (`artlearn.run.run_identity` of its config.json); None for a folder that is not a run."""
    if not (Path(run_dir) / RUN_CONFIG_NAME).is_file():
        return None
    return run_identity(read_config(run_dir))


def fold_identity(fold_dir, digest: str | None = None) -> dict:
    """What meta.json records to prove a fold is its run's: weights_sha256 (`digest`, else that of the weights file)
    and run_id (`run_id_of` the folder's parent; left out when the fold is not inside a run)."""
    fold_dir = Path(fold_dir)
    digest = digest or file_sha256(fold_dir / WEIGHTS_NAME)
    run_id = run_id_of(fold_dir.parent)
    return dict(weights_sha256=digest, **({"run_id": run_id} if run_id else {}))


def _folder_fold(name: str) -> int | None:
    """k for a folder named exactly fold<k>, else None."""
    match = re.fullmatch(r"fold(0|[1-9][0-9]*)", name)
    return int(match.group(1)) if match else None


def _run_vocab(run_dir: Path) -> list | None:
    """The artists of a run's folds.csv, sorted as artist_dls orders its vocabulary (None without folds.csv)."""
    import pandas as pd
    path = run_dir / RUN_FOLDS_NAME
    if not path.is_file():
        return None
    try:
        artists = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=["artist"])["artist"]
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return None  # a damaged folds.csv is reported by the run's own readers
    return sorted(set(artists))


def _as_meta(meta, meta_path) -> FoldMeta:
    """`meta` itself, or the FoldMeta of a parsed meta.json (validated)."""
    return meta if isinstance(meta, FoldMeta) else FoldMeta.from_json(meta, meta_path)


def weights_problem(folder, meta: FoldMeta) -> str | None:
    """Why a fold's weights file is not the one its meta.json recorded (sha256), or None (also when not recorded)."""
    weights = Path(folder) / WEIGHTS_NAME
    want = _as_meta(meta, Path(folder) / META_NAME).weights_sha256
    if want is not None and weights.is_file():
        have = file_sha256(weights)
        if have != want:
            return (f"{weights}: its sha256 is {have[:16]}..., not the {want[:16]}... its meta.json recorded (the "
                    "weights were replaced, e.g. copied from another fold)")
    return None


def identity_problem(folder, meta: FoldMeta, weights: bool = True) -> str | None:
    """Why a fold folder is not its run's (a link to another folder, another fold's or run's files, another
    vocabulary, with `weights` replaced weights), or None. Keys a meta.json written before they existed lacks are
    not checked."""
    folder = Path(folder)
    meta = _as_meta(meta, folder / META_NAME)
    run_dir = folder.parent
    in_run = (run_dir / RUN_CONFIG_NAME).is_file()
    if in_run and folder.is_symlink():
        return (f"{folder} is a symbolic link (to {folder.resolve()}); a run's folds are folders inside it, never "
                "links to another run's")
    k = _folder_fold(folder.name)
    if in_run and k is not None and meta.fold is not None and meta.fold != k:
        return f"{folder / META_NAME} says fold={meta.fold!r} but its folder is fold{k} (copied from another fold?)"
    if in_run and meta.run_id is not None and meta.run_id != run_id_of(run_dir):
        return (f"{folder / META_NAME}: run_id {meta.run_id} is not this run's ({run_id_of(run_dir)}, the fingerprint "
                f"of {run_dir / RUN_CONFIG_NAME}): the fold was copied from another run, or config.json was edited")
    vocab = _run_vocab(run_dir) if in_run and meta.vocab is not None else None
    if vocab is not None and list(meta.vocab) != vocab:
        other = sorted(set(meta.vocab) ^ set(vocab))
        how = f"artists not in both: {other[:5]}" if other else "the same artists in another order"
        return f"{folder / META_NAME}: 'vocab' is not the run's artists from {run_dir / RUN_FOLDS_NAME} ({how})"
    return weights_problem(folder, meta) if weights else None


def _state_dict(model_or_state) -> dict:
    """A module's state dict, or the dict itself."""
    return model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()


def save_weights(path, model_or_state) -> Path:
    """Atomically save a model's (or a state dict's) tensors as safetensors: contiguous CPU copies."""
    save_weights_digest(path, model_or_state)
    return Path(path)


def save_weights_digest(path, model_or_state) -> str:
    """`save_weights`, returning the sha256 of the bytes written (no second read of the file)."""
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _state_dict(model_or_state).items()}
    blob = save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


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
    if size is not None and not _is_int(size, MIN_SIDE, MAX_SIDE):
        return f"'size' is {size!r}; need an integer image size in {MIN_SIDE}..{MAX_SIDE}"
    side = meta.get("store_side")
    if side is not None and not _is_int(side, MIN_SIDE, MAX_SIDE):
        return f"'store_side' is {side!r}; need an integer shorter side in {MIN_SIDE}..{MAX_SIDE}"
    for key in ("mean", "std"):
        if meta.get(key) is not None and not _stats_ok(meta[key]):
            return f"{key!r} must be 3 finite numbers (one per RGB channel), not {meta[key]!r}"
    if meta.get("std") is not None and min(meta["std"]) <= 0:
        return f"'std' must be positive, not {meta['std']!r}"
    return _field_problem(meta, n)


def _is_hex(value, length: int) -> bool:
    """Text of exactly `length` lower-case hex digits."""
    return isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{length}}}", value) is not None


def _counts_ok(values, n: int) -> bool:
    """n non-negative integers (a fold's training class counts)."""
    return isinstance(values, list) and len(values) == n and all(_is_int(v, 0, 2 ** 62) for v in values)


def _field_rules(n: int) -> dict:
    """key -> (test of a present value, what is allowed) for meta.json's fields (None allowed where FoldMeta.build
    writes None for something unknown)."""
    from .recipe import MONITORS, PIPELINES
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    return {
        "format": (lambda v: v == META_FORMAT, f"{META_FORMAT!r}"),
        "format_version": (lambda v: _is_int(v, 1, META_FORMAT_VERSION), f"an integer in 1..{META_FORMAT_VERSION} "
                           "(a newer version needs a newer artlearn)"),
        "pipeline": (lambda v: v in PIPELINES, f"one of {list(PIPELINES)}"),
        "fold": (lambda v: _is_int(v, 0, 10 ** 6), "a fold number >= 0"),
        "n_folds": (lambda v: v is None or _is_int(v, 2, 10 ** 6), "None or an integer >= 2"),
        "split_seed": (lambda v: v is None or _is_int(v, 0, 2 ** 32 - 1), "None or an integer in 0..2**32-1"),
        "epoch": (lambda v: v is None or _is_int(v, 0, 10 ** 9), "None or an epoch number >= 0"),
        "epochs_run": (lambda v: _is_int(v, 0, 10 ** 9), "a number of epochs >= 0"),
        "monitor": (lambda v: v is None or v in MONITORS, f"None or one of {list(MONITORS)}"),
        "score": (lambda v: v is None or real(v), "None or a finite number"),
        "complete": (lambda v: isinstance(v, bool), "true or false"),
        "stopped": (lambda v: v is None or isinstance(v, str), "None or the reason (text)"),
        "ema": (lambda v: v is None or (real(v) and 0 < v < 1), "None or a decay in (0, 1)"),
        "class_counts": (lambda v: v is None or _counts_ok(v, n), f"None or {n} counts >= 0 (one per class)"),
        "artlearn_version": (lambda v: isinstance(v, str), "the version (text)"),
        "run_id": (lambda v: v is None or _is_hex(v, 32), "32 hex digits (the run's config fingerprint)"),
        "weights_sha256": (lambda v: v is None or _is_hex(v, 64), "64 hex digits (the weights' sha256)"),
    }


def _field_problem(meta: dict, n: int) -> str | None:
    """The first meta.json field whose value is not one it may hold ('model' is checked when it is rebuilt)."""
    for key, (ok, allowed) in _field_rules(n).items():
        if key in meta and not ok(meta[key]):
            return f"{key!r} is {meta[key]!r}; need {allowed}"
    return None


def read_meta(path) -> FoldMeta:
    """The `FoldMeta` of a fold folder's `meta.json` (or of the file itself), checked for consistency and bounds."""
    path = Path(path)
    meta_path = path / META_NAME if path.is_dir() else path
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no meta.json, so this is not a fold checkpoint folder "
                                "(or its training never finished an epoch)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}): retrain this fold or delete its folder") from None
    return FoldMeta.from_json(meta, meta_path)


def check_meta(meta, meta_path) -> FoldMeta:
    """ValueError naming the file when a meta.json is not a fold's (no model entry), inconsistent or out of bounds;
    else its FoldMeta (`FoldMeta.from_json`)."""
    return FoldMeta.from_json(meta, meta_path)


def check_identity(folder, meta: FoldMeta, weights: bool = True) -> None:
    """ValueError when a fold folder is not its run's (`identity_problem`), with what to do."""
    _refuse_fold(identity_problem(folder, meta, weights))


def _refuse_fold(problem: str | None) -> None:
    """ValueError for a fold that failed an identity check (nothing when `problem` is None)."""
    if problem:
        raise ValueError(f"{problem}; refusing to use it: rerun train_kfold on the run (it retrains a fold that fails "
                         "this check) or delete the fold folder")


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


def _rebuild(meta: FoldMeta, meta_path: Path):
    """The model described by `meta.model`, or a ValueError naming the meta file."""
    from .models import ARCHITECTURES, build_model
    arch = meta.model.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{meta_path}: unknown architecture {arch!r} in 'model'; this artlearn knows "
                         f"{list(ARCHITECTURES)} (was the fold trained with a newer version?)")
    try:
        with fork_global_rng():  # the random init is overwritten anyway
            return build_model(**meta.model)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{meta_path}: cannot rebuild the model from its 'model' entry: {e}") from None


def _expected_shapes(meta: FoldMeta, meta_path: Path) -> dict:
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
    """ValueError naming the first wrongly shaped, wrongly typed (never cast) or non-finite tensor."""
    expected = model.state_dict()
    _check_shapes({k: tuple(v.shape) for k, v in state.items()},
                  {k: tuple(v.shape) for k, v in expected.items()}, model.config["arch"], weights_path)
    for k, v in state.items():
        if v.dtype != expected[k].dtype:
            raise ValueError(f"{weights_path}: tensor {k!r} is {v.dtype} but the model expects {expected[k].dtype}; "
                             "artlearn never casts a checkpoint: retrain this fold")
    for k, v in state.items():
        if v.is_floating_point() and not bool(v.isfinite().all()):
            raise ValueError(f"{weights_path}: tensor {k!r} holds NaN/inf values: retrain this fold")


def load_fold(path, device="cpu"):
    """(model in eval mode, its `FoldMeta`) of a fold folder: meta.json checked, shapes compared before any
    allocation."""
    path = Path(path)
    folder, weights_path = _fold_files(path)
    meta = read_meta(folder)
    check_identity(folder, meta, weights=False)
    shapes = weight_shapes(weights_path)
    _check_shapes(shapes, _expected_shapes(meta, folder / META_NAME), meta.model.get("arch"), weights_path)
    model = _rebuild(meta, folder / META_NAME)
    state = load_weights(weights_path)
    _check_state(state, model, weights_path)
    if weights_path == folder / WEIGHTS_NAME:
        _refuse_fold(weights_problem(folder, meta))  # the file read is the one meta.json recorded
    model.load_state_dict(state)
    return model.to(device).eval(), meta
