"""artlearn.augment's batch pipeline against torchvision (resized_crop, rotate, get_params), grid_sample, a tent."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from artlearn.synthetic import texture_probe
from artlearn.augment import (
    tent_reference,
    ArtistCrop,
    center_box,
    center_boxes,
    center_views,
    colour_jitter,
    crop_affine,
    flip_views,
    random_crop_box,
    recipe_views,
    resample,
    sample_crop_boxes,
    store_side,
    train_views,
    valid_crop,
)

SHAPES = [(40, 60), (97, 53), (256, 256), (300, 180)]  # (height, width)
RATIO = (3 / 4, 4 / 3)


def painting(h, w, seed=0) -> torch.Tensor:
    """`artlearn.synthetic.texture_probe` as a uint8 (3, h, w) tensor."""
    return torch.from_numpy(texture_probe(h, w, seed)).permute(2, 0, 1).contiguous()


def padded(imgs, canvas=None, fill=0) -> tuple:
    """A batch: images at the top-left of one canvas (filled with `fill`) and their real sizes."""
    H = canvas[0] if canvas else max(i.shape[1] for i in imgs)
    W = canvas[1] if canvas else max(i.shape[2] for i in imgs)
    batch = torch.full((len(imgs), 3, H, W), fill, dtype=torch.uint8)
    for k, img in enumerate(imgs):
        batch[k, :, : img.shape[1], : img.shape[2]] = img
    return batch, torch.tensor([list(i.shape[1:]) for i in imgs])


def view(img, box, S, angle=None, flip=None, antialias=True) -> torch.Tensor:
    """One image's view of one box through the batch pipeline, (3, S, S)."""
    maps = crop_affine(torch.tensor([box], dtype=torch.float32), None, angle, flip, S)
    return resample(img[None], torch.tensor([list(img.shape[1:])]), maps, S, antialias=antialias)[0]


def tv_view(img, box, S) -> torch.Tensor:
    """torchvision's resized_crop (antialiased bilinear) of the original image, float, (3, S, S)."""
    return TF.resized_crop(img.float(), *box, [S, S], antialias=True)


def box_of(h, w, frac, aspect, where=(1 / 3, 1 / 2)) -> tuple:
    """A whole-pixel box of area fraction `frac` and aspect w/h inside an h x w image, (top, left, height, width)."""
    bw = min(w, round(math.sqrt(frac * h * w * aspect)))
    bh = min(h, round(math.sqrt(frac * h * w / aspect)))
    return int((h - bh) * where[0]), int((w - bw) * where[1]), bh, bw


def mae(a, b) -> float:
    """Mean absolute difference, 0..255 units."""
    return (a.float() - b.float()).abs().mean().item()


def maxe(a, b) -> float:
    """Largest absolute difference, 0..255 units."""
    return (a.float() - b.float()).abs().max().item()


# --- unturned views are torchvision's resized_crop --------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("S", [32, 64])
def test_center_view_is_torchvisions_resized_crop_of_the_center_box(shape, S):
    img = painting(*shape)
    top, left, h, w = center_boxes(torch.tensor([shape]))[0].long().tolist()
    l_, t_, r_, b_ = center_box(shape[1], shape[0])  # the per-item pipeline's box, (l, t, r, b)
    assert (top, left, h, w) == (t_, l_, b_ - t_, r_ - l_)
    out = center_views(img[None], torch.tensor([shape]), S)[0]
    ref = tv_view(img, (top, left, h, w), S)
    assert mae(out, ref) < 0.35 and maxe(out, ref) <= 1.0  # uint8 rounding of the CPU's uint8 resize only
    assert torch.equal(out, TF.resized_crop(img, top, left, h, w, [S, S], antialias=True).float())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("frac", [0.08, 0.3, 1.0])
@pytest.mark.parametrize("aspect", [3 / 4, 4 / 3])
def test_fixed_box_views_equal_torchvision(shape, frac, aspect):
    img = painting(*shape)
    box = box_of(*shape, frac, aspect)
    for flip in (False, True):
        out = view(img, box, 32, flip=torch.tensor([flip]))
        ref = tv_view(img, box, 32)
        ref = ref.flip(2) if flip else ref
        assert mae(out, ref) < 0.35 and maxe(out, ref) <= 1.0


# --- turned views: one bilinear tap from a prefiltered level -------------------------------------------------------

@pytest.mark.parametrize("shape", [(97, 53), (300, 180)])
@pytest.mark.parametrize("angle", [7.0, -15.0, 30.0])
def test_turned_views_without_antialias_are_grid_sample_with_reflection(shape, angle):
    img = painting(*shape)
    box = box_of(*shape, 0.5, 1.0, where=(0.0, 1.0))  # touching the top and right edges: the corners leave the image
    maps = crop_affine(torch.tensor([box], dtype=torch.float32), None, torch.tensor([angle]), None, 32)
    x = maps[:, 0, 0, None, None] * torch.arange(32.0)[None, None] + maps[:, 0, 1, None, None] * \
        torch.arange(32.0)[None, :, None] + maps[:, 0, 2, None, None]
    y = maps[:, 1, 0, None, None] * torch.arange(32.0)[None, None] + maps[:, 1, 1, None, None] * \
        torch.arange(32.0)[None, :, None] + maps[:, 1, 2, None, None]
    assert x.min() < 0 or y.min() < 0 or x.max() > shape[1] - 1  # the reflection is exercised
    grid = torch.stack([(2 * x + 1) / shape[1] - 1, (2 * y + 1) / shape[0] - 1], -1)
    ref = F.grid_sample(img.float()[None], grid, padding_mode="reflection", align_corners=False)[0]
    batch, sizes = padded([img], canvas=(320, 320), fill=0)  # the canvas's own edges are far away: unused
    out = resample(batch, sizes, maps, 32, antialias=False)[0]
    assert maxe(out, ref) < 0.01


@pytest.mark.parametrize("shape", [(256, 256), (300, 180)])
@pytest.mark.parametrize("shrink", [2.5, 3.5, 5.0])
def test_turned_views_match_a_tent_filter_and_do_not_alias(shape, shrink):
    img = painting(*shape)
    side = round(32 * shrink)
    box = ((shape[0] - side) // 2, (shape[1] - side) // 3, side, side)
    maps = crop_affine(torch.tensor([box], dtype=torch.float32), None, torch.tensor([9.0]), None, 32)
    ref = tent_reference(img, maps, 32)[0]
    out = resample(img[None], torch.tensor([shape]), maps, 32)[0]
    plain = resample(img[None], torch.tensor([shape]), maps, 32, antialias=False)[0]
    # measured: mean 2.6 / 0.85 / 0.55 at 2.5x / 3.5x / 5x (max 13); plain bilinear 14-17 (max 50-70)
    assert mae(out, ref) < {2.5: 3.3, 3.5: 1.3, 5.0: 0.9}[shrink]
    assert maxe(out, ref) < 18
    assert mae(plain, ref) > 4 * mae(out, ref) and mae(plain, ref) > 10


def test_antialias_matters_for_big_boxes_shrunk_3_to_4x():
    img = painting(256, 256)
    for side, S in ((256, 64), (230, 64), (192, 48)):  # 4x, 3.6x, 4x
        box = (0, 0, side, side) if side == 256 else (13, 7, side, side)
        ref = tv_view(img, box, S)
        out, plain = view(img, box, S), view(img, box, S, antialias=False)
        assert mae(out, ref) < 0.35
        assert mae(plain, ref) > 8 and maxe(plain, ref) > 30  # plain bilinear aliases the fine texture
        tilted = view(img, box, S, angle=torch.tensor([1e-3]))  # the turned path on the same box
        assert mae(tilted, ref) < 1.5 and mae(plain, ref) > 6 * mae(tilted, ref)


# --- geometry: rotation, flip, reflection ---------------------------------------------------------------------------

def test_rotation_by_90_degrees_of_a_square_image_is_rot90():
    img = painting(40, 40)
    out = view(img, (0, 0, 40, 40), 40, angle=torch.tensor([90.0]))
    # counter-clockwise, as torchvision's rotate; float32 cos(90 deg) is -4e-8, not 0: a 0.02/255 tolerance
    assert maxe(out, torch.rot90(img, 1, dims=(1, 2))) < 0.02
    assert maxe(out, TF.rotate(img, 90.0).float()) < 0.02


def test_rotation_about_the_box_centre_matches_torchvisions_rotate():
    img = painting(64, 64)
    out = view(img, (0, 0, 64, 64), 64, angle=torch.tensor([30.0]))
    ref = TF.rotate(img.float(), 30.0, interpolation=TF.InterpolationMode.BILINEAR)
    inner = (slice(None), slice(20, 44), slice(20, 44))  # torchvision fills outside with zeros; compare inside
    assert maxe(out[inner], ref[inner]) < 0.01


@pytest.mark.parametrize("angle", [0.0, 12.0])
def test_flipped_view_is_the_mirrored_unflipped_view(angle):
    img = painting(97, 53)
    box = box_of(97, 53, 0.4, 0.8)
    for S in (32, 33):
        plain = view(img, box, S, angle=torch.tensor([angle]), flip=torch.tensor([False]))
        flipped = view(img, box, S, angle=torch.tensor([angle]), flip=torch.tensor([True]))
        assert maxe(flipped, flip_views(plain[None])[0]) < 0.01


def test_reflection_stays_inside_each_images_own_pixels():
    white = [torch.full((3, h, w), 255, dtype=torch.uint8) for h, w in ((60, 40), (45, 90), (64, 64))]
    batch, sizes = padded(white, canvas=(100, 120), fill=0)  # a marker 0 all around each image
    g = torch.Generator().manual_seed(1)
    for S in (16, 48):
        out = train_views(batch, sizes, S, g, min_scale=0.5, max_rotate=45.0, p_rotate=1.0)
        assert out.min() > 254.99
    assert center_views(batch, sizes, 48).min() > 254.99


def test_views_of_a_padded_mixed_batch_equal_views_of_each_image_alone():
    imgs = [painting(h, w, seed=k) for k, (h, w) in enumerate(SHAPES)]
    batch, sizes = padded(imgs, fill=7)
    out = train_views(batch, sizes, 32, torch.Generator().manual_seed(3), max_rotate=20.0, p_rotate=0.5)
    again = torch.Generator().manual_seed(3)
    boxes = sample_crop_boxes(sizes, 0.08, RATIO, again)
    angles = (torch.rand(4, generator=again, dtype=torch.float64) * 40 - 20)
    angles = angles * (torch.rand(4, generator=again, dtype=torch.float64) < 0.5)
    flips = torch.rand(4, generator=again, dtype=torch.float64) < 0.5
    maps = crop_affine(boxes, sizes, angles, flips, 32)
    assert (angles == 0).any() and (angles != 0).any()  # both paths
    for k, img in enumerate(imgs):
        alone = resample(img[None], sizes[k : k + 1], maps[k : k + 1], 32)[0]
        assert maxe(out[k], alone) < 0.01


def test_a_ragged_list_gives_the_views_of_its_padded_canvas_bit_for_bit():
    imgs = [painting(h, w, seed=k) for k, (h, w) in enumerate(SHAPES)]
    hwc = [img.permute(1, 2, 0).contiguous().permute(2, 0, 1) for img in imgs]  # the store's layout: channels last
    batch, sizes = padded(imgs, fill=7)
    last = batch.contiguous(memory_format=torch.channels_last)
    for canvas, ragged in ((batch, imgs), (last, hwc)):
        for S in (16, 40):
            a = train_views(canvas, sizes, S, torch.Generator().manual_seed(9), max_rotate=30.0, p_rotate=0.5)
            b = train_views(ragged, None, S, torch.Generator().manual_seed(9), max_rotate=30.0, p_rotate=0.5)
            assert torch.equal(a, b)
            assert torch.equal(center_views(canvas, sizes, S), center_views(ragged, sizes, S))
    same = [painting(50, 70, seed=k) for k in range(3)]  # one shared centre box: resized together
    assert torch.equal(center_views(same, None, 24), center_views(*padded(same), 24))
    for k, img in enumerate(same):
        assert torch.equal(center_views(same, None, 24)[k], center_views([img], None, 24)[0])


def test_bad_ragged_batches_raise_naming_the_image():
    img = painting(40, 60)
    with pytest.raises(ValueError, match="empty list"):
        center_views([], None, 16)
    with pytest.raises(ValueError, match=r"images\[1\]: need a uint8 \(3, h, w\) tensor, got torch.float32"):
        center_views([img, img.float()], None, 16)
    with pytest.raises(ValueError, match=r"images\[0\].*\(1, 40, 60\)"):
        center_views([img[:1]], None, 16)
    with pytest.raises(ValueError, match=r"images\[0\].*ndarray"):
        center_views([img.numpy()], None, 16)
    with pytest.raises(ValueError, match=r"sizes=\[\[60, 40\]\].*\[\[40, 60\]\]"):
        train_views([img], torch.tensor([[60, 40]]), 16, torch.Generator())


# --- the box distribution is torchvision's -------------------------------------------------------------------------

def torchvision_boxes(h, w, n, min_scale, seed) -> np.ndarray:
    """n draws of RandomResizedCrop.get_params (global RNG inside fork_rng, restored after), (n, 4) t, l, h, w."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        img = torch.empty(1, h, w)
        return np.array([RandomResizedCrop.get_params(img, [min_scale, 1.0], list(RATIO)) for _ in range(n)])


@pytest.mark.parametrize("shape,min_scale", [((200, 300), 0.08), ((256, 256), 0.35), ((37, 301), 0.08)])
def test_box_distribution_matches_torchvision(shape, min_scale):
    stats = pytest.importorskip("scipy.stats")
    n = 4000
    ours = sample_crop_boxes(torch.tensor([shape] * n), min_scale, RATIO, torch.Generator().manual_seed(0))
    ours = ours.numpy().astype(float)
    ref = torchvision_boxes(*shape, n, min_scale, seed=1).astype(float)
    assert np.array_equal(ours, ours.round()) and (ours[:, 2:] >= 1).all()
    assert (ours[:, 0] + ours[:, 2] <= shape[0]).all() and (ours[:, 1] + ours[:, 3] <= shape[1]).all()
    H, W = shape
    for name, f in [("area", lambda b: b[:, 2] * b[:, 3] / (H * W)),
                    ("log-aspect", lambda b: np.log(b[:, 3] / b[:, 2])),
                    ("top", lambda b: b[:, 0] / np.maximum(H - b[:, 2], 1)),
                    ("left", lambda b: b[:, 1] / np.maximum(W - b[:, 3], 1))]:
        p = stats.ks_2samp(f(ours), f(ref)).pvalue
        assert p > 1e-3, f"{name}: KS p={p:.2g}"
    # torchvision's fallback: the whole image clamped to the aspect range, centred (37 x 301 -> 37 x 49 at the centre)
    fh, fw = _fallback_hw(H, W)
    fallback = np.array([(H - fh) // 2, (W - fw) // 2, fh, fw])
    rate_ours, rate_ref = (ours == fallback).all(1).mean(), (ref == fallback).all(1).mean()
    if shape == (37, 301):
        assert 0.05 < rate_ref < 0.6  # measurable
    assert abs(rate_ours - rate_ref) < 4 * math.sqrt(max(rate_ref, 1e-3) * (1 - rate_ref) / n) * math.sqrt(2) + 1e-9


def _fallback_hw(H, W) -> tuple:
    """torchvision's fallback box size (h, w) for RATIO."""
    ratio = W / H
    if ratio < RATIO[0]:
        return int(round(W / RATIO[0])), W
    if ratio > RATIO[1]:
        return H, int(round(H * RATIO[1]))
    return H, W


def test_fallback_fires_always_on_a_hopeless_image():
    boxes = sample_crop_boxes(torch.tensor([[10, 400]] * 50), 0.5, RATIO, torch.Generator().manual_seed(0))
    assert (boxes == torch.tensor([0.0, (400 - 13) // 2, 10, 13])).all()


# --- determinism, local RNG, formats, arguments ---------------------------------------------------------------------

def test_same_seed_same_batch_other_seed_other_batch_global_rng_untouched():
    batch, sizes = padded([painting(h, w) for h, w in SHAPES])
    state, py_state = torch.get_rng_state(), random.getstate()
    a = train_views(batch, sizes, 32, torch.Generator().manual_seed(5))
    b = train_views(batch, sizes, 32, torch.Generator().manual_seed(5))
    c = train_views(batch, sizes, 32, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state


def test_views_are_float_batches_in_0_255():
    batch, sizes = padded([painting(h, w) for h, w in SHAPES])
    for out in (train_views(batch, sizes, 24, torch.Generator().manual_seed(0)), center_views(batch, sizes, 24)):
        assert out.dtype == torch.float32 and out.shape == (4, 3, 24, 24)
        assert out.min() >= 0 and out.max() <= 255 and out.std() > 10


def test_bad_arguments_raise_value_errors_naming_the_value():
    batch, sizes = padded([painting(40, 60)])
    g = torch.Generator()
    for min_scale in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"min_scale={min_scale}"):
            train_views(batch, sizes, 32, g, min_scale=min_scale)
        with pytest.raises(ValueError, match="min_scale"):
            store_side(64, min_scale, 256)
    for size in (7, 0, 32.0):
        with pytest.raises(ValueError, match=f"size={size}"):
            center_views(batch, sizes, size)
        with pytest.raises(ValueError, match=f"size={size}"):
            store_side(size, 0.5, 256)
    with pytest.raises(ValueError, match="ratio"):
        sample_crop_boxes(sizes, 0.08, (4 / 3, 3 / 4), g)
    with pytest.raises(ValueError, match="max_rotate=-1"):
        train_views(batch, sizes, 32, g, max_rotate=-1)
    with pytest.raises(ValueError, match="p_rotate=1.5"):
        train_views(batch, sizes, 32, g, p_rotate=1.5)
    with pytest.raises(ValueError, match="generator=None"):
        train_views(batch, sizes, 32, None)
    with pytest.raises(ValueError, match="images"):
        center_views(batch.float(), sizes, 32)
    with pytest.raises(ValueError, match="sizes"):
        center_views(batch, torch.tensor([[41, 60]]), 32)  # taller than the canvas
    with pytest.raises(ValueError, match="sizes"):
        center_views(batch, torch.tensor([[40.0, 60.0]]), 32)


def test_store_side_rule():
    assert store_side(64, 0.08, 256) == 227  # ceil(64 / sqrt(0.08)) = ceil(226.27)
    assert store_side(128, 0.08, 256) == 256  # 453 needed, the image has 256
    assert store_side(64, 0.25, 1000) == 128  # exactly 64 / 0.5
    assert store_side(224, 1.0, 300) == 224
    assert store_side(128, 0.35, 1000, cap=200) == 200
    for size, s in ((64, 0.08), (96, 0.35), (128, 0.2)):
        side = store_side(size, s, 10_000)
        assert math.sqrt(s) * side >= size > math.sqrt(s) * (side - 1)  # the smallest side that avoids upsampling


def test_per_item_crop_names_still_work():
    from PIL import Image
    img = Image.fromarray(painting(60, 80).permute(1, 2, 0).numpy())
    left, top, right, bottom = random_crop_box(80, 60, 0.08, RATIO, random.Random(0))
    assert 0 <= left < right <= 80 and 0 <= top < bottom <= 60
    assert valid_crop(img, 32).size == (32, 32)
    assert ArtistCrop(32).size == 32


def test_the_float_resize_path_of_other_devices_agrees_with_the_uint8_one(monkeypatch):
    import artlearn.augment as augment
    batch, sizes = padded([painting(h, w, seed=k) for k, (h, w) in enumerate(SHAPES)])
    fast = train_views(batch, sizes, 32, torch.Generator().manual_seed(2))
    fast_center = center_views(batch, sizes, 32)
    monkeypatch.setattr(augment, "_fast_uint8", lambda device: False)  # what CUDA runs: float resizes, no rounding
    slow = train_views(batch, sizes, 32, torch.Generator().manual_seed(2))
    slow_center = center_views(batch, sizes, 32)
    assert maxe(fast, slow) <= 1.0 and mae(fast, slow) < 0.3
    assert maxe(fast_center, slow_center) <= 1.0 and not torch.equal(slow_center, slow_center.round())  # uint8 rounds


def test_a_channels_last_batch_gives_the_same_views():
    batch, sizes = padded([painting(h, w, seed=k) for k, (h, w) in enumerate(SHAPES)])
    cl = batch.contiguous(memory_format=torch.channels_last)
    a = train_views(batch, sizes, 32, torch.Generator().manual_seed(4))
    b = train_views(cl, sizes, 32, torch.Generator().manual_seed(4))
    assert maxe(a, b) < 1e-3
    assert torch.equal(center_views(batch, sizes, 32), center_views(cl, sizes, 32))


def test_colour_jitter_is_torchvisions_brightness_contrast_saturation_with_the_drawn_factors():
    """Oracle: torchvision's adjust_brightness, adjust_contrast, adjust_saturation (in that order) of each view (0..1
    floats) with the factors colour_jitter draws, which lie in [1 - s, 1 + s] and differ per image."""
    x = torch.stack([painting(24, 24, seed).float() for seed in range(6)])
    s = 0.4
    ours = colour_jitter(x, s, torch.Generator().manual_seed(3))
    draws = torch.rand((3, len(x)), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    factors = (1 - s + 2 * s * draws).float()
    assert factors.min() >= 1 - s and factors.max() <= 1 + s and len(set(factors[0].tolist())) == len(x)
    for i, img in enumerate(x / 255):
        b, c, sat = factors[:, i].tolist()
        want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), sat) * 255
        torch.testing.assert_close(ours[i], want, atol=1e-3, rtol=1e-4)
    assert not torch.equal(ours, x) and ours.min() >= 0 and ours.max() <= 255


def test_colour_jitter_off_draws_nothing_and_recipe_views_are_train_views():
    """strength 0 returns the views as they are and leaves the generator's stream alone, so a recipe without colour
    jitter makes exactly train_views' batches (same seed, same crops); with it, the same crops recoloured."""
    from artlearn.recipe import FAST
    imgs = [painting(*shape, seed=i) for i, shape in enumerate(SHAPES)]
    canvas, sizes = padded(imgs)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 8, 8) * 255
    assert colour_jitter(x, 0.0, gen) is x
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(5).get_state())
    plain = train_views(canvas, sizes, 32, torch.Generator().manual_seed(9), min_scale=0.35, max_rotate=15.0)
    recipe = FAST.override(size=32)
    torch.testing.assert_close(recipe_views(canvas, sizes, recipe, torch.Generator().manual_seed(9)), plain)
    jittered = recipe_views(canvas, sizes, recipe.override(colour_jitter=0.3), torch.Generator().manual_seed(9))
    assert not torch.allclose(jittered, plain)
    gray = 0.2989 * jittered[:, 0] + 0.587 * jittered[:, 1] + 0.114 * jittered[:, 2]
    plain_gray = 0.2989 * plain[:, 0] + 0.587 * plain[:, 1] + 0.114 * plain[:, 2]
    for a, b in zip(gray, plain_gray):  # per image, luma changes only by brightness x contrast (affine) and clipping
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95  # the same crops, recoloured
