"""Deprecated location: the data stage now lives in tables, folds, store, augment and dls (kept for old imports)."""
from .augment import center_box, random_crop_box, valid_crop
from .dls import artist_dls
from .folds import StratifiedFoldSplitter, assign_folds, stratified_subset
from .store import PresizeCache, presize_for
from .tables import check_images, load_rgb, read_artworks, to_rgb

__all__ = ["artist_dls", "StratifiedFoldSplitter", "assign_folds", "stratified_subset", "PresizeCache",
           "presize_for", "check_images", "load_rgb", "read_artworks", "to_rgb", "center_box", "random_crop_box",
           "valid_crop"]
