"""artlearn: artist classifiers trained from scratch, with stratified K-fold and fold ensembles."""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "read_artworks": "data", "check_images": "data", "assign_folds": "data",
    "StratifiedFoldSplitter": "data", "artist_dls": "data", "PresizeCache": "data",
    "load_rgb": "data",
    "make_synthetic_artworks": "synthetic",
    "ArtistResNet": "models", "GeM": "models", "build_model": "models",
    "LabelSmoothing": "callbacks", "CosineAnnealing": "callbacks", "FoldCheckpoint": "callbacks",
    "load_fold": "callbacks",
    "artist_learner": "learner",
    "train_kfold": "kfold", "select_folds": "kfold", "load_run": "kfold", "KFoldRun": "kfold",
    "ensemble": "ensemble", "write_submission": "ensemble",
    "plot_history": "plots", "compare_runs": "plots", "plot_artist_counts": "plots",
    "describe_artworks": "plots", "plot_confusion": "plots", "plot_artist_recall": "plots",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    """Import public names lazily so that `import artlearn` stays fast (fastai loads on first use)."""
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'artlearn' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
