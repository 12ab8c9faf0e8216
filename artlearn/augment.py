"""Crops and augmentation: torchvision's RandomResizedCrop box on stored pixels, the centre evaluation view."""
import math
import random

from fastai.vision.augment import RandTransform
from fastai.vision.core import PILImage
from PIL import Image


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
# Batch pipeline on the device (issue 13): a batch is `images` uint8 (N, 3, Hc, Wc), each image at the top-left of a
# padded canvas, plus `sizes` int (N, 2) holding each image's real (height, width). Every view is ONE resampling of the
# stored pixels: crop box, rotation about the box centre and flip compose into one affine map per image ("map": a
# (N, 2, 3) float tensor taking output pixel (u, v, 1) to source pixel (x, y), pixel centres at integers).
# ---------------------------------------------------------------------------------------------------------------------
import logging  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger("artlearn")

MIN_SIZE = 8
CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
MAX_SUBSAMPLES = 4  # per axis; with the pyramid the residual shrink per axis stays below ~2-3


def _check_size(out_size) -> int:
    """An output side of at least MIN_SIZE pixels, as an int."""
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < MIN_SIZE:
        raise ValueError(f"out_size={out_size!r}: need an integer of at least {MIN_SIZE} pixels")
    return out_size


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


def _check_batch(images, sizes):
    """uint8 (N, 3, Hc, Wc) images with int (N, 2) sizes inside the canvas."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: need uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if sizes.shape != (images.shape[0], 2) or sizes.is_floating_point():
        raise ValueError(f"sizes: need int (N, 2) (height, width), got {sizes.dtype} {tuple(sizes.shape)}")
    if len(sizes) and (sizes.min() < 1 or (sizes.max(0).values > torch.tensor(images.shape[2:], device=sizes.device)).any()):
        raise ValueError(f"sizes: every (height, width) must lie in 1..{tuple(images.shape[2:])}")


def _uniform(n, shape, low, high, generator, device) -> torch.Tensor:
    """Uniform draws in [low, high) from the local generator, float64, moved to `device`."""
    u = torch.rand((n, *shape), generator=generator, dtype=torch.float64, device=generator.device)
    return (low + (high - low) * u).to(device)


def store_side(size: int, min_scale: float, image_short_side: int, cap: int | None = None) -> int:
    """Shorter side to store so a `min_scale` crop is not upsampled: ceil(size / sqrt(min_scale)), capped by the image and `cap`."""
    _check_size(size)
    _check_min_scale(min_scale)
    need = math.ceil(size / math.sqrt(min_scale) - 1e-9)  # a crop of area fraction s of a side-L square has side sqrt(s)L
    side = min(need, int(image_short_side))
    return side if cap is None else min(side, int(cap))


def sample_crop_boxes(sizes: torch.Tensor, min_scale: float, ratio, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop boxes for a batch, as float (N, 4) (top, left, height, width) in pixels."""
    lo, hi = _check_ratio(ratio)
    min_scale = _check_min_scale(min_scale)
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
    side = sizes.min(1).values
    top = torch.div(sizes[:, 0] - side, 2, rounding_mode="floor")
    left = torch.div(sizes[:, 1] - side, 2, rounding_mode="floor")
    return torch.stack([top, left, side, side], 1).float()


def crop_affine(boxes: torch.Tensor, sizes: torch.Tensor, angles_deg=None, flips=None, out_size: int = 224):
    """Per-image map (N, 2, 3) from output pixel (u, v, 1) to source pixel (x, y): box, rotation about its centre, flip.

    Output pixel u has its centre at box-left + (u + 0.5) * width / out_size - 0.5 (torchvision's resize convention).
    A positive angle turns the content counter-clockwise (torchvision's `rotate`); rotation acts in output space (the
    crop is resized, then rotated, as fastai's crop-then-affine), the flip mirrors the finished view left-right.
    `sizes` is accepted for symmetry with the other calls; edges are handled by `resample`.
    """
    S = _check_size(out_size)
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
    q = torch.full((n, 2, 1), 0.5 / S - 0.5, device=device)
    return torch.cat([T / S, centre[:, :, None] + T @ q], 2)


SPACING = 1.0  # largest gap between sub-samples, in pixels of the pyramid level sampled
TENT = True


def _axis_scales(maps: torch.Tensor) -> torch.Tensor:
    """Source pixels per output pixel along the output's u and v axes, (N, 2)."""
    return maps[:, :, :2].norm(dim=1)


def _level_blur(level: torch.Tensor) -> torch.Tensor:
    """Variance (source px^2) of pyramid level l's 2^l box plus its bilinear taps: (4^l - 1) / 12 + 4^l / 6."""
    return (1.5 * 4.0 ** level - 0.5) / 6


def _unit_taps(k: int, device) -> tuple:
    """Offsets in (-1, 1) and weights of k taps of a tent (or a box), and their variance."""
    offsets = (torch.arange(k, device=device, dtype=torch.float32) + 0.5) / k * 2 - 1
    weights = 1 - offsets.abs() if TENT else torch.ones(k, device=device)
    weights = weights / weights.sum()
    return offsets, weights, float((weights * offsets**2).sum())


def _plan(maps: torch.Tensor, antialias: bool) -> tuple:
    """Per image: pyramid level, sub-samples per axis (int (N, 3)) and the spread of the sub-samples (N, 2)."""
    n, device = len(maps), maps.device
    scales = _axis_scales(maps)
    if not antialias:
        return torch.tensor([[0, 1, 1]], device=device).expand(n, 3), torch.zeros(n, 2, device=device)
    finer = scales.min(1).values
    # torchvision's antialiased bilinear = a tent of half-width s (variance s^2 / 6): take the coarsest level whose
    # own blur stays below it, and spread sub-samples to supply the rest of the variance
    level = torch.floor(torch.log2(((6 * finer**2 / 6 + 0.5) / 1.5).clamp(min=1)) / 2)
    extra = (scales**2 / 6 - _level_blur(level)[:, None]).clamp(min=0)  # source px^2
    spread_px = 2 * torch.sqrt(6 * extra) / 2 ** level[:, None]  # tent support 2c*s in level px
    subs = torch.ceil(spread_px / SPACING - 1e-3).clamp(1, MAX_SUBSAMPLES)
    subs = torch.where(scales > 1, subs, torch.ones_like(subs))
    var = torch.tensor([_unit_taps(k, device)[2] if k > 1 else 1.0 for k in range(MAX_SUBSAMPLES + 1)], device=device)
    spread = torch.sqrt(extra / var[subs.long()]) / scales  # output px: var(offset * spread * s) = extra
    spread = torch.where(subs > 1, spread, torch.zeros_like(spread))
    return torch.cat([level[:, None], subs], 1).long(), spread


def _reflect(x: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Mirror pixel coordinates about the image's outer pixel edges (-0.5 and extent - 0.5), numpy's 'symmetric'."""
    period = 2 * extent
    t = torch.remainder(x + 0.5, period)
    return torch.minimum(t, period - t) - 0.5


def _pyramid(images: torch.Tensor, sizes: torch.Tensor, level: int) -> torch.Tensor:
    """The images as float, cut to their largest real size and 2x2-box averaged `level` times (avg_pool2d)."""
    h, w = sizes.max(0).values.tolist()
    x = images[:, :, :h, :w].float()
    for _ in range(level):
        x = F.avg_pool2d(x, 2)
    return x


def _level_coords(x, extent, level: int, canvas: int, skip_reflect: bool) -> torch.Tensor:
    """Source pixel coordinates (N, ...) -> grid_sample coordinates on a pyramid level (align_corners=False)."""
    extent = extent.view(-1, *([1] * (x.ndim - 1))).float()
    if not skip_reflect:
        x = _reflect(x, extent)
    step = 2.0 ** level
    whole = torch.clamp(torch.floor(extent / step), min=1)  # level pixels that average real pixels only
    x = torch.clamp(x, min=step / 2 - 0.5)
    x = torch.minimum(x, step * (whole - 0.5) - 0.5)
    return (x + 0.5) * (2.0 / (step * canvas)) - 1


def _sample_group(images, sizes, maps, spread, out_size: int, level: int, ku: int, kv: int) -> torch.Tensor:
    """One grid_sample for images sharing a plan: ku x kv tent sub-samples per output pixel on pyramid `level`."""
    S, n, device = out_size, len(images), maps.device
    src = _pyramid(images, sizes, level)
    pixels = torch.arange(S, device=device, dtype=torch.float32)
    taps_u, weights_u, _ = _unit_taps(ku, device)
    taps_v, weights_v, _ = _unit_taps(kv, device)
    uu = (pixels[None, :, None] + taps_u * spread[:, 0, None, None]).reshape(n, -1)  # (n, S * ku)
    vv = (pixels[None, :, None] + taps_v * spread[:, 1, None, None]).reshape(n, -1)
    coords = []
    for axis in (0, 1):  # x from row 0 of the map, y from row 1; an affine map splits into a u part and a v part
        along_u = maps[:, axis, 0:1] * uu
        along_v = maps[:, axis, 1:2] * vv + maps[:, axis, 2:3]
        extent = sizes[:, 1 - axis].to(maps.dtype)
        low = along_u.min(1).values + along_v.min(1).values
        high = along_u.max(1).values + along_v.max(1).values
        inside = bool(((low >= -0.5) & (high <= extent - 0.5)).all())
        coord = along_v[:, :, None] + along_u[:, None, :]
        coords.append(_level_coords(coord, extent, level, src.shape[3 - axis], inside))
    grid = torch.stack(coords, -1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if ku * kv == 1:
        return out
    out = out.view(n, 3, S, kv, S, ku) * weights_v[:, None, None] * weights_u
    return out.sum((3, 5))


def resample(images: torch.Tensor, sizes: torch.Tensor, maps: torch.Tensor, out_size: int,
             antialias: bool = True) -> torch.Tensor:
    """Bilinear views float (N, 3, S, S) in 0..255 through per-image maps, reflecting at each image's own edges."""
    S = _check_size(out_size)
    _check_batch(images, sizes)
    maps = maps.to(images.device).float()
    sizes = sizes.to(images.device)
    out = torch.empty((len(images), 3, S, S), device=images.device)
    plan, spread = _plan(maps, antialias)
    for key in torch.unique(plan, dim=0).tolist():
        idx = (plan == torch.tensor(key, device=plan.device)).all(1).nonzero()[:, 0]
        out[idx] = _sample_group(images[idx], sizes[idx], maps[idx], spread[idx], S, *key)
    return out
