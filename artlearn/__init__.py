"""artlearn: artist classifiers trained from scratch, with stratified K-fold and fold ensembles."""
import sys
import types
import warnings
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "read_artworks": "tables", "check_images": "tables", "load_rgb": "tables", "validate_table": "tables",
    "assign_folds": "folds", "StratifiedFoldSplitter": "folds", "stratified_subset": "folds",
    "PresizeCache": "store", "artist_dls": "dls",
    "Recipe": "recipe",
    "make_synthetic_artworks": "synthetic",
    "ArtistResNet": "models", "GeM": "models", "build_model": "models", "ARCHITECTURES": "models",
    "LabelSmoothing": "callbacks", "CosineAnnealing": "callbacks", "FoldCheckpoint": "callbacks",
    "Reproducible": "callbacks", "EMA": "callbacks", "History": "callbacks", "NonFiniteLossError": "callbacks",
    "LogitAdjustment": "callbacks", "ProgressiveResize": "callbacks",
    "load_fold": "checkpoint", "save_weights": "checkpoint", "read_meta": "checkpoint", "FoldMeta": "checkpoint",
    "ArtistLearner": "learner", "artist_learner": "learner", "fold_learner": "learner",
    "load_run": "run", "KFoldRun": "run",
    "train_kfold": "kfold", "select_folds": "kfold", "FoldSelection": "kfold",
    "ensemble": "ensemble", "write_submission": "ensemble", "predict": "ensemble",
    "explain": "explain",
    "plot_history": "plots", "compare_runs": "plots", "plot_artist_counts": "plots",
    "describe_artworks": "plots", "plot_confusion": "plots", "plot_artist_recall": "plots",
    "save_run_figures": "plots", "save_figure": "plots",
}

_SUBMODULES = ("checks", "files", "rng", "device", "tables", "folds", "store", "augment", "dls", "tta", "recipe",
               "synthetic", "models", "runconfig", "checkpoint", "callbacks", "learner", "run", "distributed",
               "kfold", "ensemble", "explain", "plots", "budget", "cli")

__all__ = ["__version__", *_EXPORTS]


def _load(module: str):
    """Import one of artlearn's modules. fastai 2.8 scripts its Swish/Mish functions with `torch.jit.script` when
    imported (artlearn uses neither), which torch >= 2.10 reports with a FutureWarning no user can act on: that
    one warning is ignored while artlearn's first import loads fastai."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        return import_module(f".{module}", __name__)


def __getattr__(name):
    """Import public names lazily so that `import artlearn` stays fast (fastai loads on first use)."""
    if name in _EXPORTS:
        value = getattr(_load(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _load(name)
    raise AttributeError(f"module 'artlearn' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


class _Package(types.ModuleType):
    """The package module: a submodule import never hides a public function of the same name (`ensemble`)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
