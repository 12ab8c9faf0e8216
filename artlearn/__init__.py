"""artlearn: artist classifiers trained from scratch, with stratified K-fold and fold ensembles."""
import sys
import types
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "read_artworks": "data", "check_images": "data", "assign_folds": "data",
    "StratifiedFoldSplitter": "data", "artist_dls": "data", "PresizeCache": "data",
    "load_rgb": "data", "stratified_subset": "data", "FoldSelection": "kfold",
    "make_synthetic_artworks": "synthetic",
    "ArtistResNet": "models", "GeM": "models", "build_model": "models",
    "LabelSmoothing": "callbacks", "CosineAnnealing": "callbacks", "FoldCheckpoint": "callbacks",
    "load_fold": "checkpoint", "save_weights": "checkpoint", "read_meta": "checkpoint",
    "Reproducible": "callbacks", "EMA": "callbacks", "History": "callbacks", "NonFiniteLossError": "callbacks",
    "LogitAdjustment": "callbacks", "ProgressiveResize": "callbacks", "ArtistLearner": "learner",
    "ARCHITECTURES": "models",
    "artist_learner": "learner",
    "train_kfold": "kfold", "select_folds": "kfold", "load_run": "kfold", "KFoldRun": "kfold",
    "ensemble": "ensemble", "write_submission": "ensemble",
    "plot_history": "plots", "compare_runs": "plots", "plot_artist_counts": "plots",
    "describe_artworks": "plots", "plot_confusion": "plots", "plot_artist_recall": "plots",
    "save_run_figures": "plots", "save_figure": "plots",
}

_SUBMODULES = ("data", "synthetic", "models", "callbacks", "checkpoint", "learner", "kfold", "ensemble", "plots",
               "distributed",
               "presets")

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    """Import public names lazily so that `import artlearn` stays fast (fastai loads on first use)."""
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
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
