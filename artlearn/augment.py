"""Crops and augmentation: torchvision's RandomResizedCrop box on stored pixels, colour jitter, a recipe's training
views (`recipe_views`), the centre evaluation view."""
import math
import random

import torch
import torch.nn.functional as F
from fastai.vision.augment import RandTransform
from fastai.vision.core import PILImage
from PIL import Image

from .checks import check_side


def random_crop_box(width: int, height: int, min_scale: float, ratio, rng=random) -> tuple:
    """torchvision's RandomResizedCrop box (area in [min_scale, 1], log-uniform aspect), as (l, t, r, b)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return center_box(width, height)


def center_box(width: int, height: int) -> tuple:
    """The central square, as (l, t, r, b)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def valid_crop(img: Image.Image, size: int) -> Image.Image:
    """Deterministic evaluation view: the central square resized to size x size."""
    return img.resize((size, size), Image.Resampling.BILINEAR, box=center_box(*img.size))



class ArtistCrop(RandTransform):
    """RandomResizedCrop to `size` for training; the centre square resized to `size` for validation."""
    split_idx, order = None, 1

    def __init__(self, size: int, min_scale: float = 0.08, ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self.size, self.min_scale, self.ratio = size, min_scale, ratio

    def before_call(self, b, split_idx):
        """Note whether this call builds a validation item."""
        self.validating = split_idx == 1

    def encodes(self, x: PILImage):
        """The crop of one image."""
        if self.validating:
            return valid_crop(x, self.size)
        box = random_crop_box(*x.size, self.min_scale, self.ratio)
        return x.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)


# ---------------------------------------------------------------------------------------------------------------------
# Batch pipeline on the device (issue 13). Above: the per-item PIL crops of fastai's pipeline. Below: whole batches.
# A batch is either `images` uint8 (N, 3, Hc, Wc), each image at the top-left of a padded canvas, plus `sizes` int
# (N, 2) holding each image's real (height, width); or a list of N uint8 (3, h, w) tensors (a ragged batch, e.g. the
# store's own zero-copy views: nothing is copied into a canvas; `sizes` then optional). Any device; channels-last
# pixels (channel stride 1, as the store's HWC arrays) make the CPU's antialiased resize 2-3x faster. Views are
# float (N, 3, size, size) in 0..255 (divide by 255 for fastai's 0..1). Every view is ONE
# resampling of the stored pixels: crop box, rotation about the box centre and flip compose into one affine map per
# image (a "map": (N, 2, 3) float, output pixel (u, v, 1) -> source pixel (x, y), pixel centres at integers).
#
# Antialias rule (measured in examples/benchmarks/bench_augment.py, tested in tests/test_augment.py):
# - unturned whole-pixel boxes (every centre view; the unrotated quarter of training views) are torchvision's
#   resized_crop itself: torch's antialiased bilinear resize of the box (bit-identical to torchvision on uint8 CPU),
#   mirrored if flipped;
# - turned views: each image's window (the footprint of its view, its mirror image at the edges and the filter's
#   margin) is first reduced by that same resize by max(1, shrink / OVERSAMPLE) per axis, then ONE bilinear tap per
#   output pixel (one grid_sample for the batch) samples it, so that tap never shrinks more than 1.3x. Coordinates
#   leaving an image are mirrored about its own outer pixel edges (numpy 'symmetric', grid_sample 'reflection' with
#   align_corners=False), never about the canvas's.
# Random draws all come from a torch.Generator the caller passes (device of the generator; moved afterwards).
# ---------------------------------------------------------------------------------------------------------------------
CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
OVERSAMPLE = 1.3  # source pixels per output pixel kept in each image's prefiltered level (see resample)


def _check_min_scale(min_scale) -> float:
    """A crop area fraction in (0, 1]."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale={min_scale!r}: need a fraction of the image area in (0, 1]")
    return float(min_scale)


def _check_ratio(ratio) -> tuple:
    """An aspect range (low, high) with 0 < low <= high."""
    lo, hi = ratio
    if not 0 < lo <= hi:
        raise ValueError(f"ratio={ratio!r}: need 0 < low <= high")
    return float(lo), float(hi)


def _check_batch(images, sizes) -> tuple:
    """(list of uint8 (3, h, w) tensors, int sizes (N, 2), device) of a canvas with its sizes, or of a ragged list."""
    if isinstance(images, (list, tuple)):
        return _check_ragged(list(images), sizes)
    sizes = _check_sizes(sizes)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: need uint8 (N, 3, H, W) or a list of uint8 (3, h, w) tensors, got {got}")
    if sizes.shape != (images.shape[0], 2) or sizes.is_floating_point():
        raise ValueError(f"sizes: need int (N, 2) (height, width), got {sizes.dtype} {tuple(sizes.shape)}")
    pairs = sizes.tolist()
    if pairs and (min(min(p) for p in pairs) < 1 or max(h for h, _ in pairs) > images.shape[2]
                  or max(w for _, w in pairs) > images.shape[3]):
        raise ValueError(f"sizes={pairs}: every (height, width) must fit the canvas {tuple(images.shape[2:])}")
    return [images[k, :, :h, :w] for k, (h, w) in enumerate(pairs)], sizes.to(images.device), images.device


def _check_ragged(images: list, sizes) -> tuple:
    """(the list, int sizes (N, 2), device) of uint8 (3, h, w) tensors on one device; `sizes` must be theirs."""
    if not images:
        raise ValueError("images: an empty list; need at least one uint8 (3, h, w) tensor")
    for k, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            got = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"images[{k}]: need a uint8 (3, h, w) tensor, got {got}")
        if img.device != images[0].device:
            raise ValueError(f"images[{k}] is on {img.device}, images[0] on {images[0].device}: need one device")
    shapes = torch.tensor([tuple(img.shape[1:]) for img in images], dtype=torch.long)
    if sizes is not None and not torch.equal(_check_sizes(sizes).cpu().long(), shapes):
        raise ValueError(f"sizes={torch.as_tensor(sizes).tolist()}: a ragged batch's sizes must be its images' own "
                         f"(height, width) {shapes.tolist()} (or None)")
    if shapes.min() < 1:
        raise ValueError(f"images: sizes {shapes.tolist()} include an empty image")
    return images, shapes.to(images[0].device), images[0].device


def _check_sizes(sizes) -> torch.Tensor:
    """Image (height, width) pairs as an int tensor (N, 2), each at least 1."""
    sizes = torch.as_tensor(sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or sizes.is_floating_point() or (len(sizes) and sizes.min() < 1):
        raise ValueError(f"sizes={sizes.tolist()}: need int (N, 2) (height, width) pairs, each at least 1")
    return sizes


def _uniform(n, shape, low, high, generator, device) -> torch.Tensor:
    """Uniform draws in [low, high) from the local generator, float64, moved to `device`."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r}: need a torch.Generator (local RNG; the global one is never used)")
    u = torch.rand((n, *shape), generator=generator, dtype=torch.float64, device=generator.device)
    return (low + (high - low) * u).to(device)


def store_side(size: int, min_scale: float, image_short_side: int, cap: int | None = None) -> int:
    """Shorter side to store: ceil(size / sqrt(min_scale)), capped by the image's own shorter side and by `cap`."""
    # A crop of area fraction s of a square image of side L has side sqrt(s) * L: at this side even a min_scale crop
    # (aspect 1) covers `size` pixels, so it is not upsampled (a 3:4 crop's narrow side is up to 1.15x short). Images
    # already smaller stay as they are (the store never upsamples); `cap` comes from the store's memory budget.
    check_side("size", size)
    _check_min_scale(min_scale)
    if cap is not None and cap < 1:
        raise ValueError(f"cap={cap!r}: need a side of at least 1 pixel, or None")
    need = math.ceil(size / math.sqrt(min_scale) - 1e-9)  # -1e-9: 64 / sqrt(0.25) is 128, not 129
    side = min(need, int(image_short_side))
    return side if cap is None else min(side, int(cap))


def sample_crop_boxes(sizes: torch.Tensor, min_scale: float, ratio, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop boxes for a batch, as float (N, 4) (top, left, height, width) in pixels."""
    lo, hi = _check_ratio(ratio)
    min_scale = _check_min_scale(min_scale)
    sizes = _check_sizes(sizes)
    n, device = len(sizes), sizes.device
    H, W = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = (H * W).expand(n, CROP_TRIES)
    target = area * _uniform(n, (CROP_TRIES,), min_scale, 1.0, generator, device)
    aspect = torch.exp(_uniform(n, (CROP_TRIES,), math.log(lo), math.log(hi), generator, device))
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))  # round half to even
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.double().argmax(1, keepdim=True)  # the first try that fits, as in the loop
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    offsets = _uniform(n, (2,), 0.0, 1.0, generator, device)
    H, W = H[:, 0], W[:, 0]
    top = torch.floor(offsets[:, 0] * (H - h + 1)).clamp(max=H - h)  # randint(0, H - h + 1)
    left = torch.floor(offsets[:, 1] * (W - w + 1)).clamp(max=W - w)
    fb_top, fb_left, fb_h, fb_w = _fallback_boxes(H, W, lo, hi)
    boxes = torch.stack([torch.where(found, top, fb_top), torch.where(found, left, fb_left),
                         torch.where(found, h, fb_h), torch.where(found, w, fb_w)], 1)
    return boxes.float()


def _fallback_boxes(H, W, lo, hi) -> tuple:
    """torchvision's fallback after 10 misses: the whole image clamped to the aspect range, centred."""
    in_ratio = W / H
    w = torch.where(in_ratio < lo, W, torch.where(in_ratio > hi, torch.round(H * hi), W))
    h = torch.where(in_ratio < lo, torch.round(W / lo), H)
    return torch.div(H - h, 2, rounding_mode="floor"), torch.div(W - w, 2, rounding_mode="floor"), h, w


def center_boxes(sizes: torch.Tensor) -> torch.Tensor:
    """The central square of each image (as `center_box`), float (N, 4) (top, left, height, width)."""
    sizes = _check_sizes(sizes)
    side = sizes.min(1).values
    top = torch.div(sizes[:, 0] - side, 2, rounding_mode="floor")
    left = torch.div(sizes[:, 1] - side, 2, rounding_mode="floor")
    return torch.stack([top, left, side, side], 1).float()


def crop_affine(boxes: torch.Tensor, sizes: torch.Tensor, angles_deg=None, flips=None, size: int = 224):
    """Per-image maps (N, 2, 3), output pixel (u, v, 1) -> source pixel (x, y): box, rotation about its centre, flip."""
    # Output pixel u's centre is at left + (u + 0.5) * width / size - 0.5 (torchvision's resize convention). A positive
    # angle turns the content counter-clockwise (torchvision's rotate); rotation acts in output space (resize, then
    # rotate, as fastai's crop-then-affine); the flip mirrors the finished view. `sizes` is unused: resample handles
    # the edges.
    size = check_side("size", size)
    boxes = boxes.float()
    n, device = len(boxes), boxes.device
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(n, device=device) if angles_deg is None else torch.as_tensor(angles_deg, device=device).float()
    theta = torch.deg2rad(theta.expand(n))
    sign = torch.ones(n, device=device)
    if flips is not None:
        sign = 1 - 2 * torch.as_tensor(flips, device=device).float().expand(n)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # T = diag(w, h) @ R(theta) @ diag(sign, 1): normalised output offset (a, b) in (-1/2, 1/2)^2 -> source offset
    T = torch.stack([torch.stack([w * cos * sign, -w * sin], 1), torch.stack([h * sin * sign, h * cos], 1)], 1)
    centre = torch.stack([left + w / 2 - 0.5, top + h / 2 - 0.5], 1)
    q = torch.full((n, 2, 1), 0.5 / size - 0.5, device=device)
    return torch.cat([T / size, centre[:, :, None] + T @ q], 2)


def _source_steps(maps: torch.Tensor) -> torch.Tensor:
    """Source pixels spanned per output pixel along the source's x and y axes (the map's row norms), (N, 2)."""
    return maps[:, :, :2].norm(dim=2)


def _footprints(maps: torch.Tensor, size: int) -> tuple:
    """Lowest and highest source (x, y) that the output pixel centres map to, each (N, 2)."""
    last = size - 1.0
    corners = torch.tensor([[0, 0, 1], [last, 0, 1], [0, last, 1], [last, last, 1]], device=maps.device)
    points = maps @ corners.T  # (N, 2, 4)
    return points.min(2).values, points.max(2).values


def _regions(maps, sizes, size: int, factors) -> torch.Tensor:
    """Integer source windows (x0, y0, x1, y1) with every pixel a view reads: footprint, its mirror, filter margin."""
    low, high = _footprints(maps, size)
    extent = sizes.flip(1).to(low.dtype)  # (w, h)
    margin = torch.ceil(2 * factors) + 1  # the antialias tent reaches `factor` source px, bilinear one more
    low, high = low - margin, high + margin
    high = torch.maximum(high, -low)  # mirrored about the left/top edge
    low = torch.minimum(low, 2 * extent - 1 - high)  # mirrored about the right/bottom edge
    low = torch.floor(low).clamp(min=0)
    high = torch.minimum(torch.ceil(high) + 1, extent)
    return torch.cat([low, torch.maximum(high, low + 1)], 1).long()


EDGE = 1e-4  # level px kept inside the last pixel centre, so bilinear never reads the (uninitialised) pixel past it


def _memory_format(images: list):
    """channels_last when the images' channels are interleaved (the CPU's uint8 antialias resize is 2-3x faster)."""
    return torch.channels_last if images[0].stride(0) == 1 else torch.contiguous_format


def _fast_uint8(device: torch.device) -> bool:
    """Whether torch resizes uint8 directly there: on CPU (AVX2 code, unlike CUDA's float-only antialias kernel)."""
    return device.type == "cpu"


def _resize(pixels: torch.Tensor, shape: tuple, antialias: bool, memory_format) -> torch.Tensor:
    """torch's (antialiased) bilinear resize of (n, 3, h, w) uint8 pixels: in uint8 where fast, else in float."""
    if _fast_uint8(pixels.device):
        pixels = pixels.contiguous(memory_format=memory_format)
    else:
        pixels = pixels.float()
    return F.interpolate(pixels, size=shape, mode="bilinear", antialias=antialias)


def _levels(images, index: list, maps, sizes, size: int, antialias: bool) -> tuple:
    """Windows of images[index] resized to OVERSAMPLE px per output px, in one float canvas; origins, steps, sizes."""
    # origins (x0, y0) in source px, steps in source px per level px, sizes (w, h) in level px
    n, device, fmt = len(index), images[0].device, _memory_format(images)
    factors = (_source_steps(maps) / OVERSAMPLE).clamp(min=1) if antialias else torch.ones(n, 2, device=device)
    windows = _regions(maps, sizes, size, factors)
    spans = (windows[:, 2:] - windows[:, :2]).to(factors.dtype)
    level_sizes = torch.round(spans / factors).clamp(min=1).long()
    steps = spans / level_sizes
    width, height = level_sizes.max(0).values.tolist()
    tiny = bool((level_sizes < 2).any())  # a 1-px level is read at offset 1 with weight 0: keep that memory finite
    canvas = torch.empty((n, 3, height, width), device=device, memory_format=fmt)
    if tiny:  # torch.zeros takes no memory_format: zero the channels-last canvas in place
        canvas.zero_()
    for i, (k, (x0, y0, x1, y1), (w, h)) in enumerate(zip(index, windows.tolist(), level_sizes.tolist())):
        window = images[k][None, :, y0:y1, x0:x1]  # a view: nothing but the window is ever copied
        if (w, h) != (x1 - x0, y1 - y0):
            window = _resize(window, (h, w), True, fmt)
        canvas[i, :, :h, :w] = window[0]
    return canvas, windows[:, :2].to(steps.dtype), steps, level_sizes.to(steps.dtype)


def _source_planes(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Source coordinates + 0.5 (pixel edges at 0 and w), planes (N, 2, size, size) (x, y) of each output pixel
    centre."""
    n = len(maps)
    pixels = torch.arange(size, device=maps.device, dtype=maps.dtype)
    planes = torch.empty((n, 2, size, size), device=maps.device, dtype=maps.dtype)
    for axis in (0, 1):  # affine: a v-part plus a u-part, one broadcast add
        along_v = maps[:, axis, 1, None, None] * pixels[None, :, None] + (maps[:, axis, 2, None, None] + 0.5)
        torch.add(along_v, maps[:, axis, 0, None, None] * pixels[None, None, :], out=planes[:, axis])
    return planes


def _mirror_(planes: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """In place: mirror edge-shifted coordinates once about 0 and each image's extent (w, h) (numpy 'symmetric')."""
    planes.abs_().sub_(extent).abs_()
    return torch.sub(extent, planes, out=planes)


def _integer_boxes(maps: torch.Tensor, sizes: torch.Tensor, size: int) -> tuple:
    """Boxes (N, 4) (top, left, height, width) of axis-aligned maps, and whether each is a whole-pixel box inside."""
    half = (size - 1) / 2
    centre = maps[:, :, 0] * half + maps[:, :, 1] * half + maps[:, :, 2]  # (x, y) of the view's centre
    span = torch.stack([maps[:, 0, 0], maps[:, 1, 1]], 1).abs() * size  # (w, h)
    start = centre - span / 2 + 0.5
    boxes = torch.cat([start.flip(1), span.flip(1)], 1)
    whole = (boxes - boxes.round()).abs().amax(1) < 1e-3
    axis_aligned = (maps[:, 0, 1] == 0) & (maps[:, 1, 0] == 0)
    boxes = boxes.round()
    inside = (boxes[:, :2] >= 0).all(1) & (boxes[:, 2:] >= 1).all(1) & (boxes[:, :2] + boxes[:, 2:] <= sizes).all(1)
    return boxes.long(), axis_aligned & whole & inside


def _resized_boxes(images, index: list, boxes, flips, size: int, antialias: bool) -> torch.Tensor:
    """torchvision's resized_crop of whole-pixel boxes of images[index], then the mirrors; one call per shared box."""
    fmt = _memory_format(images)
    groups = {}
    for row, box in enumerate(boxes.tolist()):
        groups.setdefault(tuple(box), []).append(row)
    out = torch.empty((len(index), 3, size, size), device=images[0].device)
    for (top, left, h, w), rows in groups.items():
        crops = _stacked([images[index[r]][:, top : top + h, left : left + w] for r in rows], fmt)
        crops = crops.float() if (h, w) == (size, size) else _resize(crops, (size, size), antialias, fmt).float()
        if len(rows) == 1:
            out[rows[0]] = crops[0]
        else:
            out[torch.tensor(rows, device=out.device)] = crops
    for axis, dim in ((0, 3), (1, 2)):
        if bool(flips[:, axis].any()):
            out = torch.where(flips[:, axis, None, None, None], out.flip(dim), out)
    return out


def _stacked(crops: list, memory_format) -> torch.Tensor:
    """Same-shape (3, h, w) crops as one (n, 3, h, w) batch in `memory_format` (a view when there is one crop)."""
    if len(crops) == 1:
        return crops[0][None]
    out = torch.empty((len(crops), *crops[0].shape), dtype=crops[0].dtype, device=crops[0].device,
                      memory_format=memory_format)
    for row, crop in zip(out, crops):
        row.copy_(crop)
    return out


def _turned_views(images, index: list, sizes, maps, size: int, antialias: bool) -> torch.Tensor:
    """One bilinear tap per output pixel from the prefiltered levels of images[index], mirrored at their own edges."""
    canvas, origins, steps, extents = _levels(images, index, maps, sizes, size, antialias)
    planes = _source_planes(maps, size)
    image_extent = sizes.flip(1).to(planes.dtype)
    low, high = _footprints(maps, size)
    if bool(((low < 0) | (high > image_extent - 1)).any()):
        _mirror_(planes, image_extent[:, :, None, None])
    shape = torch.tensor([canvas.shape[3], canvas.shape[2]], device=maps.device, dtype=maps.dtype)
    scale = 2 / (steps * shape)  # source px -> grid_sample's [-1, 1] over the level canvas (align_corners=False)
    planes.mul_(scale[:, :, None, None]).sub_((origins * scale + 1)[:, :, None, None])
    first, last = 1 / shape - 1, (2 * (extents - EDGE) - 1) / shape - 1  # level pixel centres 0 and extent - 1
    torch.maximum(planes, first.expand_as(last)[:, :, None, None], out=planes)
    torch.minimum(planes, last[:, :, None, None], out=planes)
    grid = planes.permute(0, 2, 3, 1)
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resample(images, sizes, maps: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Views float (N, 3, size, size) in 0..255 through per-image maps (antialias rule above; False: plain bilinear)."""
    size = check_side("size", size)
    images, sizes, device = _check_batch(images, sizes)
    return _resample(images, sizes, maps.to(device).float(), size, antialias, device)


def _resample(images: list, sizes, maps, size: int, antialias: bool, device) -> torch.Tensor:
    """`resample` of checked images: whole-pixel boxes resized as torchvision does, the rest turned."""
    if not images:
        return torch.empty((0, 3, size, size), device=device)
    boxes, boxed = _integer_boxes(maps, sizes, size)
    flips = torch.stack([maps[:, 0, 0] < 0, maps[:, 1, 1] < 0], 1)
    parts = []
    rows = boxed.nonzero()[:, 0]
    if len(rows):
        parts.append((rows, _resized_boxes(images, rows.tolist(), boxes[rows], flips[rows], size, antialias)))
    rows = (~boxed).nonzero()[:, 0]
    if len(rows):
        parts.append((rows, _turned_views(images, rows.tolist(), sizes[rows], maps[rows], size, antialias)))
    if len(parts) == 1:
        return parts[0][1]
    out = torch.empty((len(images), 3, size, size), device=device)
    for rows, views in parts:
        out.index_copy_(0, rows, views)
    return out


def _check_rotation(max_rotate, p_rotate):
    """Rotation range in degrees >= 0 and a probability in [0, 1]."""
    if not max_rotate >= 0:
        raise ValueError(f"max_rotate={max_rotate!r}: need degrees >= 0")
    if not 0 <= p_rotate <= 1:
        raise ValueError(f"p_rotate={p_rotate!r}: need a probability in [0, 1]")


def train_views(images, sizes, size: int, generator: torch.Generator, min_scale: float = 0.08,
                ratio=(3 / 4, 4 / 3), max_rotate: float = 15.0, p_rotate: float = 0.75,
                flip: bool = True) -> torch.Tensor:
    """Training views float (N, 3, size, size) in 0..255: RandomResizedCrop, rotation, flip in one resampling per
    image."""
    # Draws, in this order, from `generator` only: the boxes (sample_crop_boxes), one angle uniform in
    # [-max_rotate, max_rotate] per image, whether to rotate (p_rotate), whether to flip (0.5; drawn even if not flip).
    size = check_side("size", size)
    _check_rotation(max_rotate, p_rotate)
    images, sizes, device = _check_batch(images, sizes)
    boxes = sample_crop_boxes(sizes, min_scale, ratio, generator)
    n = len(sizes)
    angles = _uniform(n, (), -float(max_rotate), float(max_rotate), generator, device)
    angles = angles * (_uniform(n, (), 0.0, 1.0, generator, device) < p_rotate)
    flips = _uniform(n, (), 0.0, 1.0, generator, device) < 0.5
    maps = crop_affine(boxes.to(device), sizes, angles, flips if flip else None, size)
    return _resample(images, sizes, maps, size, True, device)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of RGB views (N, 3, H, W), torchvision's rgb_to_grayscale weights."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def colour_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Views float (N, 3, H, W) in 0..255 with brightness, contrast and saturation changed, in this order, by factors
    drawn uniformly in [1 - strength, 1 + strength] per image: torchvision's adjust_brightness / adjust_contrast /
    adjust_saturation (each clamped to 0..255) batched, with a fixed order instead of ColorJitter's random one.
    strength 0 draws nothing and returns `x`."""
    if not strength:
        return x
    n, device = len(x), x.device
    brightness, contrast, saturation = (_uniform(n, (), 1 - strength, 1 + strength, generator, device)
                                        .to(x.dtype).view(n, 1, 1, 1) for _ in range(3))
    x = (x * brightness).clamp_(0, 255)
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean).clamp_(0, 255)
    return (saturation * x + (1 - saturation) * _grayscale(x)).clamp_(0, 255)


def recipe_views(images, sizes, recipe, generator: torch.Generator, ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """A `Recipe`'s training views of a batch, float (N, 3, size, size) in 0..255: every data augmentation it sets
    (`train_views`' crop, rotation and flip, then `colour_jitter`). A new augmentation setting is applied here."""
    x = train_views(images, sizes, recipe.size, generator, min_scale=recipe.min_scale, ratio=ratio,
                    max_rotate=recipe.max_rotate, flip=recipe.flip)
    return colour_jitter(x, recipe.colour_jitter, generator)


def center_views(images, sizes, size: int) -> torch.Tensor:
    """Evaluation views float (N, 3, size, size) in 0..255: each image's central square resized (antialiased)."""
    size = check_side("size", size)
    images, sizes, device = _check_batch(images, sizes)
    maps = crop_affine(center_boxes(sizes).to(device), sizes, None, None, size)
    return _resample(images, sizes, maps, size, True, device)


def flip_views(x: torch.Tensor) -> torch.Tensor:
    """Left-right mirror of a batch of views (N, C, H, W), e.g. for flip test-time augmentation."""
    return x.flip(3)


def tent_reference(img: torch.Tensor, maps: torch.Tensor, size: int, taps: int = 8) -> torch.Tensor:
    """Slow oracle of `resample` for tests and benchmarks: views (N, 3, size, size) of one uint8 (3, h, w) image by
    brute force, taps^2 bilinear samples per output pixel tent-weighted over +-1 output pixel, reflected at its
    edges."""
    h, w = img.shape[1:]
    src = img.float()[None].expand(len(maps), -1, -1, -1)
    offsets = (torch.arange(taps) + 0.5) / taps * 2 - 1
    weights = (1 - offsets.abs()) / (1 - offsets.abs()).sum()
    pixels = torch.arange(size, dtype=torch.float32)
    out = 0
    for dv, wv in zip(offsets, weights):
        for du, wu in zip(offsets, weights):
            u, v = (pixels + du)[None, None, :], (pixels + dv)[None, :, None]
            x = maps[:, 0, 0, None, None] * u + maps[:, 0, 1, None, None] * v + maps[:, 0, 2, None, None]
            y = maps[:, 1, 0, None, None] * u + maps[:, 1, 1, None, None] * v + maps[:, 1, 2, None, None]
            grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], -1)
            out = out + wu * wv * F.grid_sample(src, grid, padding_mode="reflection", align_corners=False)
    return out
