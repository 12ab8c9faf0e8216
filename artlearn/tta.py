"""Test-time views: one registry, name -> `TTA`, read by the recipe (its `tta` choices), the budget planner (forward
passes per image and fold), `ensemble`/`predict` (the views themselves) and the scripts (their `--tta` choices).

Adding a view is one entry in `TTA_VIEWS` (at import or at run time). Nothing heavy is imported here: the recipe and
the CLI's `--help` read this module without torch.
"""
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class TTA:
    """A test-time augmentation: the centre view plus `n_windows` crop batches made by `windows(cache, paths, size,
    pool, device)` (a list of (n, 3, size, size) tensors, 0..255), each view also seen mirrored when `mirror`."""
    n_windows: int = 0
    mirror: bool = False
    windows: Callable | None = None

    @property
    def views(self) -> int:
        """Forward passes per image and fold (what the budget planner charges)."""
        return (1 + self.n_windows) * (2 if self.mirror else 1)


def native_crops(arr, size: int) -> list:
    """Five size x size windows (centre and four corners) of one stored image (uint8 (h, w, 3)) at the 1.15 x size
    scale multicrop is defined at: a larger stored image is brought down to it first, a smaller one is used as it
    is (upscaled only below `size`), so the windows are the same whatever the store's resolution."""
    import numpy as np
    from PIL import Image
    from .tables import presize_for, shrink
    img = shrink(Image.fromarray(arr), presize_for(size))  # the store's own shrink; never upscales
    if min(img.size) < size:
        img = img.resize((max(size, round(img.width * size / min(img.size))),
                          max(size, round(img.height * size / min(img.size)))), Image.Resampling.BILINEAR)
    w, h = img.size
    boxes = [((w - size) // 2, (h - size) // 2), (0, 0), (w - size, 0), (0, h - size), (w - size, h - size)]
    return [np.asarray(img.crop((x, y, x + size, y + size))) for x, y in boxes]


def native_windows(cache, paths, size: int, pool=None, device=None) -> list:
    """multicrop's windows of stored images: five uint8 tensors (n, 3, size, size), one per window position."""
    import numpy as np
    import torch
    mapper = pool.map if pool is not None else map
    per_item = list(mapper(lambda p: native_crops(cache.get(p), size), paths))
    stacked = torch.from_numpy(np.stack([np.stack(v) for v in zip(*per_item)])).permute(0, 1, 4, 2, 3)
    return list(stacked.contiguous().to(device if device is not None else "cpu"))


# name -> TTA. 'flip': the image and its mirror; 'multicrop': + five native windows at 1.15 x size, each mirrored.
TTA_VIEWS = {"flip": TTA(mirror=True), "multicrop": TTA(n_windows=5, mirror=True, windows=native_windows),
             "none": TTA()}


def tta_spec(name) -> TTA:
    """The registered TTA of `name` (None reads as 'none'); ValueError naming the registered ones otherwise."""
    name = "none" if name is None else name
    if name not in TTA_VIEWS:
        raise ValueError(f"tta={name!r} is not a registered test-time view; choose one of {list(TTA_VIEWS)} "
                         "(or None)")
    return TTA_VIEWS[name]
