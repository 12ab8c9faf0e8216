"""The built-in synthetic dataset: procedurally painted artworks in a competition layout.

Generative model. An artist is a *style*: a five-colour palette, a composition (horizon, central
figure, vertical bands, ...) that lays the palette out as a base colour field, a brush (stroke
length, width, curvature, direction field, bristle streaks) and a canvas grain (weave or hatching
with a 2-4 px period, visible only at full resolution). Each artist paints in 2-3 *periods* that
shift the palette, rescale the brush or borrow another artist's palette (intra-class variance);
two thirds of the artists come in look-alike pairs that share palettes and compositions and differ
only in the grain, or only in stroke size and bristles (inter-class similarity). An image is the
base field overpainted by hundreds of opaque strokes in three passes (broad to fine), each stroke
coloured from the field or a palette accent, then the grain, uneven lighting and a colour cast.
Artist counts follow a long tail (top artist ~11% when there are enough artists, the smallest 1-3
works); the test split follows it proportionally. Every image comes from its own seeded generator,
so a seed gives the same bytes (for a given numpy / Pillow / libjpeg) and another seed differs.
"""
from __future__ import annotations

import colorsys
import csv
import json
import math
import operator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .files import atomic_write_text

__all__ = ["make_synthetic_artworks"]

GENERATOR_VERSION = 1
MARKER = "synthetic.json"
BUILDING = ".synthetic_building"

_FIRST = ("Aurelio", "Berthild", "Casimir", "Delphine", "Emrik", "Fenna", "Gustavo", "Hedda",
          "Ilario", "Jorunn", "Kasimir", "Liesel", "Mattias", "Noor", "Octavia", "Piet",
          "Quirina", "Rasmus", "Solveig", "Teodor", "Ulla", "Vesna", "Wendel", "Ysolde")
_LAST = ("Vandermolen", "Osterholt", "de_la_Calva", "Brannock", "Lindqvist", "Moravec",
         "Quillfeather", "Achterberg", "di_Santoro", "Hallgrimsson", "Ferrandis", "Kowalczuk",
         "van_Ommeren", "Saint-Clair", "Ystrom", "Nakagawa", "Oyelaran", "Pellegrini",
         "Roskilde", "Tavernier", "Urquhart", "Wilhelmsen", "Zanetti", "Eberhardt")
MAX_ARTISTS = len(_FIRST) * len(_LAST)

_SCHEMES = ("analogous", "complementary", "triadic", "earth", "tonal", "vivid")
_SCHEME_WEIGHTS = (0.2, 0.15, 0.1, 0.3, 0.15, 0.1)  # earthy palettes are the most common
_COMPOSITIONS = ("horizon", "figure", "bands", "diagonal", "field", "portrait")
_BRUSHES = ("dab", "short", "long", "hatch", "broad", "sweep")
_FLOWS = ("fixed", "wave", "swirl", "radial", "random")
_GRAINS = ("weave", "twill", "crosshatch", "linen", "ribbed", "gesso")
_ODD_KINDS = ("L", "P_transparent", "RGBA", "CMYK", "P")  # cycled over the odd files
_LAYERS = ((1.8, 0.6, 1.0), (1.0, 1.0, 1.0), (0.55, 0.3, 2.0))  # size, coverage, accent factor
_STEP = 0.7  # stroke sampling step in px; <= 1/sqrt(2) leaves no holes at any angle
_TOP_SHARE = 0.11


@dataclass(frozen=True)
class Brush:
    """How an artist lays paint: stroke geometry, direction field and colour handling."""

    length: float  # stroke length, fraction of the image's short side
    width: float  # stroke width, fraction of the short side
    curve: float  # bend: offset at the stroke ends = curve * length / 4
    flow: str  # direction field: one of _FLOWS
    angle: float  # main direction in radians
    kappa: float  # von Mises concentration around the field (0: uniform)
    streak: float  # bristle streak contrast
    bristle: float  # bristle streak period in px
    dry: float  # chance a sample near the stroke's end is dropped (dry brush)
    accent: float  # chance a stroke takes a random palette colour instead of the field's
    jitter: float  # per-stroke colour noise


@dataclass(frozen=True, eq=False)
class Period:
    """One period of an artist: a palette (5x3 RGB in [0, 1]), a composition and a brush."""

    palette: np.ndarray
    composition: str
    brush: Brush


@dataclass(frozen=True, eq=False)
class Style:
    """An artist: periods with their weights, a canvas grain and a priming colour."""

    name: str
    periods: tuple
    weights: np.ndarray
    grain: str
    grain_period: float
    grain_amp: float
    ground: np.ndarray


# ---------------------------------------------------------------------------------------------
# Arguments and the on-disk cache


def _check_int(name, value, low, high=None, low_name=None):
    """Return `value` as an int, or raise ValueError naming the argument and its valid range."""
    low_text = f"{low_name} ({low})" if low_name else str(low)
    rng_text = f">= {low_text}" if high is None else f"in [{low_text}, {high}]"
    if isinstance(value, bool):  # the contract: every bad argument is a ValueError
        raise ValueError(f"{name} must be an integer {rng_text}, got {value!r}")  # noqa: TRY004
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer {rng_text}, got {value!r}") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {rng_text}, got {value}")
    return value


def _check_args(n_artists, n_train, n_test, seed, min_size, max_size, overwrite):
    """Validate the arguments and return them as the parameter dict stored in the marker."""
    n_artists = _check_int("n_artists", n_artists, 2, MAX_ARTISTS)
    n_train = _check_int("n_train", n_train, n_artists, low_name="n_artists")
    n_test = _check_int("n_test", n_test, 1)
    seed = _check_int("seed", seed, 0)
    min_size = _check_int("min_size", min_size, 16, 4096)
    max_size = _check_int("max_size", max_size, min_size, 4096, low_name="min_size")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")  # noqa: TRY004
    return {"n_artists": n_artists, "n_train": n_train, "n_test": n_test, "seed": seed,
            "min_size": min_size, "max_size": max_size, "version": GENERATOR_VERSION}


def _listed_files_exist(dest):
    """True when both CSVs exist and every image they list is on disk."""
    for name in ("train.csv", "test.csv"):
        path = dest / name
        if not path.is_file():
            return False
        with open(path, newline="") as f:
            if not all((dest / row["img_path"]).is_file() for row in csv.DictReader(f)):
                return False
    return all((dest / n).is_file() for n in ("sample_submission.csv", "test_solution.csv"))


def _cache_state(dest, params):
    """'fresh', 'stale' (ours: redo), 'different' (ours, other parameters), 'foreign' or 'empty'."""
    marker = dest / MARKER
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text()).get("params")
        except (OSError, ValueError, AttributeError):
            return "stale"
        if stored != params:
            same_request = isinstance(stored, dict) and {**stored, "version": params["version"]} == params
            return "stale" if same_request else "different"  # another generator version: rebuild
        return "fresh" if _listed_files_exist(dest) else "stale"
    if (dest / BUILDING).exists():
        return "stale"
    has_data = any((dest / n).exists() for n in ("train.csv", "test.csv")) or any(
        (dest / d).is_dir() and any((dest / d).iterdir()) for d in ("train", "test"))
    return "foreign" if has_data else "empty"


def _write_csv(df, path):
    """Write a DataFrame as CSV atomically."""
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))


def _clear_images(dest):
    """Remove image files this module names (TRAIN_*/TEST_*) from dest/train and dest/test."""
    for split, prefix in (("train", "TRAIN_"), ("test", "TEST_")):
        folder = dest / split
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(prefix) and path.suffix in (".jpg", ".png"):
                    path.unlink()


# ---------------------------------------------------------------------------------------------
# Artists and how many works each has


def _artist_names(n):
    """n distinct fictional names in the dataset's `First_Last` style."""
    k = np.arange(n)
    first, last = k % len(_FIRST), (k + 7 * (k // len(_FIRST))) % len(_LAST)
    return [f"{_FIRST[a]}_{_LAST[b]}" for a, b in zip(first, last, strict=True)]


def _bisect(f, lo, hi, target, iters=60):
    """x in [lo, hi] with f(x) ~ target for an increasing f."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def _round_to_total(values, total):
    """Largest-remainder rounding of `values` to integers summing to `total`."""
    floors = np.floor(values).astype(np.int64)
    order = np.argsort(-(values - floors), kind="stable")
    floors[order[: total - floors.sum()]] += 1
    return floors


def _long_tail_counts(n_artists, n_total):
    """Works per artist, largest first: top ~11%, the smallest 1-3, a smooth decay in between.

    With enough artists (about 40 or more) the profile is log-convex,
    c(x) = top * (smallest / top) ** (x ** p) over x = rank / (n_artists - 1), with p <= 1 solved so
    the counts sum to n_total: a fast drop after the top, then a long tail. With fewer artists an
    11% top cannot reach the total that way; the profile becomes the declining
    c(x) = smallest + (top - smallest) * (1 - x) ** q with q >= 0.6 solved, and when even q = 0.6
    falls short, the top share is raised instead (about 13% for 12 artists).
    """
    if n_total == n_artists:
        return np.ones(n_artists, dtype=np.int64)
    s = 2.0 if n_total >= 3 * n_artists else 1.0
    x = np.arange(n_artists) / (n_artists - 1)
    top_max = n_total - (n_artists - 1) * s  # every other artist at the smallest count
    top = min(max(_TOP_SHARE * n_total, s + 1.0), top_max)

    def log_convex(p):
        return top * (s / top) ** (x**p)

    def declining(t, q):
        return s + (t - s) * (1 - x) ** q

    q_min = 0.6
    if log_convex(1.0).sum() >= n_total:
        values = log_convex(_bisect(lambda p: log_convex(p).sum(), 1e-3, 1.0, n_total))
    elif declining(top, q_min).sum() >= n_total:
        values = declining(top, _bisect(lambda q: -declining(top, q).sum(), q_min, 64.0, -n_total))
    else:
        values = declining(_bisect(lambda t: declining(t, q_min).sum(), top, top_max, n_total), q_min)
    return np.sort(_round_to_total(values * n_total / values.sum(), n_total))[::-1]


def _test_counts(train_counts, n_test):
    """Test works per artist, proportional to the train counts (may be 0 for tiny artists)."""
    return _round_to_total(train_counts * n_test / train_counts.sum(), n_test)


# ---------------------------------------------------------------------------------------------
# Styles


def _hsv_palette(hues, sats, vals):
    """(n, 3) float32 RGB colours from HSV components."""
    rgb = [colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
           for h, s, v in zip(hues, sats, vals, strict=True)]
    return np.asarray(rgb, dtype=np.float32)


def _palette_hsv(rng):
    """A random five-colour palette as (hues, saturations, values) from a colour scheme."""
    scheme, h0 = rng.choice(_SCHEMES, p=_SCHEME_WEIGHTS), rng.random()
    sats = rng.uniform(0.35, 0.8, 5)
    if scheme == "analogous":
        hues = h0 + rng.uniform(-0.08, 0.08, 5)
    elif scheme == "complementary":
        hues = h0 + np.array([0.0, 0.03, 0.5, 0.53, 0.1]) + rng.normal(0, 0.01, 5)
    elif scheme == "triadic":
        hues = h0 + np.array([0.0, 1 / 3, 2 / 3, 0.04, 0.37]) + rng.normal(0, 0.01, 5)
    elif scheme == "earth":
        hues, sats = rng.uniform(0.02, 0.14, 5), rng.uniform(0.25, 0.65, 5)
    elif scheme == "tonal":
        hues, sats = h0 + rng.normal(0, 0.02, 5), rng.uniform(0.05, 0.35, 5)
    else:  # vivid
        hues, sats = rng.random(5), rng.uniform(0.7, 1.0, 5)
    vals = rng.permutation(np.linspace(0.22, 0.95, 5)) + rng.normal(0, 0.04, 5)
    return hues, sats, vals


def _brush(rng):
    """A random brush drawn around one of a few archetypes (dab, hatch, sweep, ...)."""
    kind = rng.choice(_BRUSHES)
    length, width = {
        "dab": (rng.uniform(0.022, 0.035), None),
        "short": (rng.uniform(0.05, 0.09), rng.uniform(0.02, 0.032)),
        "long": (rng.uniform(0.12, 0.2), rng.uniform(0.015, 0.028)),
        "hatch": (rng.uniform(0.07, 0.13), rng.uniform(0.008, 0.013)),
        "broad": (rng.uniform(0.08, 0.13), rng.uniform(0.045, 0.065)),
        "sweep": (rng.uniform(0.18, 0.28), rng.uniform(0.028, 0.042)),
    }[kind]
    width = length * rng.uniform(0.7, 1.0) if width is None else width
    flow = rng.choice(_FLOWS)
    return Brush(length=length, width=width, curve=rng.uniform(-0.6, 0.6) * (kind == "sweep")
                 + rng.normal(0, 0.15), flow=flow, angle=rng.uniform(0, math.pi),
                 kappa=0.0 if flow == "random" else rng.uniform(2.0, 25.0),
                 streak=rng.uniform(0.03, 0.16), bristle=rng.uniform(1.6, 3.6),
                 dry=rng.uniform(0.0, 0.6), accent=rng.uniform(0.02, 0.2),
                 jitter=rng.uniform(0.02, 0.07))


def _vary_brush(rng, brush):
    """The brush of another period: rescaled strokes, turned direction, changed concentration."""
    flow = rng.choice(_FLOWS) if rng.random() < 0.35 else brush.flow
    return replace(brush, length=brush.length * rng.uniform(0.7, 1.45),
                   width=brush.width * rng.uniform(0.75, 1.35),
                   curve=brush.curve + rng.normal(0, 0.15), flow=flow,
                   angle=brush.angle + rng.normal(0, 0.25),
                   kappa=0.0 if flow == "random" else max(brush.kappa, 2.0) * rng.uniform(0.6, 1.6))


def _period_palettes(rng, hsv, n):
    """n period palettes: the artist's palette with a hue shift and saturation/value scaling."""
    hues, sats, vals = hsv
    out = []
    for _ in range(n):
        shift = rng.choice((-1, 1)) * rng.uniform(0.02, 0.09)
        out.append(_hsv_palette(hues + shift, sats * rng.uniform(0.75, 1.25),
                                vals * rng.uniform(0.85, 1.12)))
    return out


def _artist_style(seed, k, name):
    """The style of artist k: periods (palette, composition, brush), grain and ground."""
    rng = np.random.default_rng([seed, 1, k])
    n_periods = int(rng.integers(2, 4))
    palettes = _period_palettes(rng, _palette_hsv(rng), n_periods)
    favourites = rng.choice(_COMPOSITIONS, size=2, replace=False)
    base = _brush(rng)
    periods = tuple(Period(palette=pal, composition=str(favourites[int(rng.random() < 0.3)]),
                           brush=base if i == 0 else _vary_brush(rng, base))
                    for i, pal in enumerate(palettes))
    return Style(name=name, periods=periods, weights=rng.dirichlet(np.full(n_periods, 3.0)),
                 grain=str(rng.choice(_GRAINS)), grain_period=float(rng.choice((2.0, 3.0, 4.0))),
                 grain_amp=rng.uniform(0.03, 0.08),
                 ground=_hsv_palette([rng.uniform(0.05, 0.15)], [rng.uniform(0.05, 0.4)],
                                     [rng.uniform(0.5, 0.95)])[0])


def _copied_brush(rng, brush):
    """A brush that lays the same strokes at another size and with another hand."""
    size = rng.choice((0.6, 1.6)) * rng.uniform(0.9, 1.1)
    return replace(brush, length=brush.length * size,
                   width=brush.width * size * rng.uniform(0.8, 1.2), streak=rng.uniform(0.03, 0.16),
                   bristle=rng.uniform(1.6, 3.6), dry=rng.uniform(0.0, 0.6))


def _lookalike(rng, model, own, differ):
    """`own` repainting `model`'s periods: only the grain, or only the stroke size and hand, differ."""
    if differ == "grain":
        grain = own.grain
        if grain == model.grain:
            grain = _GRAINS[(_GRAINS.index(grain) + 1) % len(_GRAINS)]
        return replace(model, name=own.name, grain=grain, grain_period=own.grain_period,
                       grain_amp=own.grain_amp)
    periods = tuple(replace(p, brush=_copied_brush(rng, p.brush)) for p in model.periods)
    return replace(model, name=own.name, periods=periods)


def _borrow_palettes(rng, styles, chance=0.4):
    """Let later periods take another artist's first palette, re-toned (shared influences)."""
    out = []
    for k, style in enumerate(styles):
        periods = list(style.periods)
        for i in range(1, len(periods)):
            if rng.random() < chance:
                other = styles[(k + 1 + int(rng.integers(len(styles) - 1))) % len(styles)]
                tone = rng.normal(1.0, 0.06, 3).astype(np.float32)
                palette = np.clip(other.periods[0].palette * tone, 0, 1)
                periods[i] = replace(periods[i], palette=palette)
        out.append(replace(style, periods=tuple(periods)))
    return out


def _styles(seed, names):
    """All artists' styles: some periods borrow palettes, two thirds of the artists are in pairs."""
    rng = np.random.default_rng([seed, 2])
    styles = _borrow_palettes(rng, [_artist_style(seed, k, name) for k, name in enumerate(names)])
    perm = rng.permutation(len(names))
    for i in range(len(names) // 3):
        model, copier = sorted(perm[2 * i: 2 * i + 2])  # the better-represented artist is copied
        differ = ("grain", "brush")[i % 2]
        styles[copier] = _lookalike(rng, styles[model], styles[copier], differ)
    return styles


# ---------------------------------------------------------------------------------------------
# Painting


def _mix(a, b, t):
    """Blend colours a and b by t (an (h, w) or broadcastable array) into an (h, w, 3) field."""
    return a + (b - a) * np.clip(t, 0.0, 1.0)[..., None]


def _composition(rng, kind, pal, h, w):
    """The base colour field (h, w, 3) of a composition laid out with palette `pal`."""
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    ones = np.ones((h, w), dtype=np.float32)
    if kind == "horizon":
        wobble = np.sin(2 * np.pi * rng.uniform(0.5, 2) * x + rng.uniform(0, 2 * np.pi))
        hz = rng.uniform(0.3, 0.65) + 0.04 * wobble
        field = np.where((y < hz)[..., None], _mix(pal[0], pal[1], y / hz * ones),
                         _mix(pal[2], pal[3], (y - hz) / (1 - hz) * ones))
        if rng.random() < 0.5:
            cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.08, 0.25), rng.uniform(0.04, 0.09)
            field[((x - cx) * w / h) ** 2 + (y - cy) ** 2 < r * r] = pal[4]
    elif kind == "figure":
        cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)
        d = ((x - cx) / rng.uniform(0.15, 0.3)) ** 2 + ((y - cy) / rng.uniform(0.18, 0.35)) ** 2
        field = np.where((d < 1)[..., None], _mix(pal[2], pal[3], d), _mix(pal[0], pal[1], y * ones))
        field[(d > 0.15) & (d < 0.3) & (x < cx)] = pal[4]
    elif kind == "bands":
        edges = np.sort(rng.uniform(0.1, 0.9, int(rng.integers(2, 5))))
        band = np.searchsorted(edges, x[0]) + int(rng.integers(0, 5))
        field = np.broadcast_to(pal[band % 5][None], (h, w, 3)) * (0.9 + 0.2 * y)[..., None]
    elif kind == "diagonal":
        a = rng.uniform(0, 2 * np.pi)
        d = (x - 0.5) * np.cos(a) + (y - 0.5) * np.sin(a) + rng.uniform(-0.15, 0.15)
        field = np.where((d > 0)[..., None], _mix(pal[0], pal[1], 2 * d), _mix(pal[2], pal[3], -2 * d))
        field[np.abs(d) < 0.03] = pal[4]
    elif kind == "field":
        fx, fy, ph = rng.uniform(-2, 2, 3), rng.uniform(-2, 2, 3), rng.uniform(0, 2 * np.pi, 3)
        f = sum(np.sin(2 * np.pi * (fx[i] * x + fy[i] * y) + ph[i]) for i in range(3))
        t = (f - f.min()) / max(float(np.ptp(f)), 1e-6) * 3.999
        i = t.astype(np.int64)
        field = _mix(pal[i], pal[i + 1], t - i)
    else:  # portrait
        cx = 0.5 + rng.uniform(-0.08, 0.08)
        head = ((x - cx) / 0.14) ** 2 * (w / h) ** 2 + ((y - 0.33) / 0.17) ** 2 < 1
        body = (y > 0.52) & (np.abs(x - cx) * w / h < 0.14 + 0.5 * (y - 0.52))
        field = _mix(pal[0], pal[1], y * ones)
        field[body] = pal[2]
        field[head] = pal[3]
        field[head & (y < 0.22)] = pal[4]
    return np.ascontiguousarray(field, dtype=np.float32)


def _directions(rng, brush, cx, cy, h, w):
    """Stroke angles at centres (cx, cy) in px from the brush's direction field plus noise."""
    if brush.flow in ("swirl", "radial"):
        ox, oy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        theta = np.arctan2(cy - oy, cx - ox) + (np.pi / 2 if brush.flow == "swirl" else 0.0)
    elif brush.flow == "wave":
        freq, phase = rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
        theta = brush.angle + 0.6 * np.sin(2 * np.pi * freq * cy / h + phase)
    elif brush.flow == "random":
        return rng.uniform(0, 2 * np.pi, cx.size)
    else:
        theta = np.full(cx.size, brush.angle)
    return theta + rng.vonmises(0.0, brush.kappa, cx.size)


def _image_brush(rng, brush):
    """The brush of one painting: the period's brush with small changes of size, angle and hand."""
    return replace(brush, length=brush.length * rng.lognormal(0, 0.2),
                   width=brush.width * rng.lognormal(0, 0.15),
                   angle=brush.angle + rng.normal(0, 0.2), kappa=brush.kappa * rng.lognormal(0, 0.3),
                   streak=brush.streak * rng.uniform(0.7, 1.3))


def _strokes(rng, brush, field, pal, h, w):
    """Stroke parameters for the three passes (broad to fine), in drawing order."""
    short, area = min(h, w), h * w
    parts = []
    for scale, coverage, accent in _LAYERS:
        length = max(brush.length * scale * short, 1.5)
        width = max(brush.width * scale * short, 1.0)
        n = int(np.clip(coverage * area / (length * width), 8, 6000))
        cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
        colour = field[cy.astype(np.int64), cx.astype(np.int64)]
        pick = rng.random(n) < brush.accent * accent
        colour[pick] = pal[rng.integers(0, 5, int(pick.sum()))]
        colour *= 1 + rng.normal(0, brush.jitter, (n, 3)) + rng.normal(0, brush.jitter, (n, 1))
        parts.append({"cx": cx, "cy": cy, "theta": _directions(rng, brush, cx, cy, h, w),
                      "length": length * rng.lognormal(0, 0.25, n),
                      "width": width * rng.lognormal(0, 0.2, n),
                      "curve": brush.curve + rng.normal(0, 0.1, n),
                      "phase": rng.uniform(0, 2 * np.pi, n), "colour": colour})
    return {key: np.concatenate([p[key] for p in parts]).astype(np.float32) for key in parts[0]}


def _draw(rng, canvas, s, brush):
    """Paint strokes `s` onto `canvas` (h, w, 3) in order, later strokes on top; returns coverage.

    A stroke is sampled about every _STEP px in its own frame: rows along it (bent by the
    curvature), each row a line of samples across it, narrowed towards the ends (a flat brush with
    rounded ends) and thinned near the tail (dry brush). The latest sample on a pixel paints it,
    shaded by bristle streaks across the stroke.
    """
    h, w, _ = canvas.shape
    length, width = np.maximum(s["length"], 1.5), np.maximum(s["width"], 1.0)
    nu = np.ceil(length / _STEP).astype(np.int64)
    sid = np.repeat(np.arange(nu.size), nu)  # rows: stroke index of each
    fu = ((np.arange(sid.size) - np.repeat(np.cumsum(nu) - nu, nu) + 0.5) / nu[sid] - 0.5).astype(np.float32)
    a = 4 * fu * fu
    row_width = width[sid] * np.sqrt(1 - a * a)
    nv = np.ceil(row_width / _STEP).astype(np.int64) + 1
    u = fu * length[sid]
    cos, sin = np.cos(s["theta"])[sid], np.sin(s["theta"])[sid]
    bend = s["curve"][sid] * u * u / length[sid]
    x0 = s["cx"][sid] + u * cos - bend * sin
    y0 = s["cy"][sid] + u * sin + bend * cos
    step = (row_width / nv).astype(np.float32)
    rid = np.repeat(np.arange(sid.size), nv)  # samples: row index of each
    j = np.arange(rid.size, dtype=np.float32) - np.repeat(np.cumsum(nv) - nv, nv).astype(np.float32)
    v = (j - 0.5 * (nv - 1).astype(np.float32)[rid]) * step[rid]  # px across the stroke
    xi = np.floor(x0[rid] - v * sin[rid]).astype(np.int64)
    yi = np.floor(y0[rid] + v * cos[rid]).astype(np.int64)
    dry = (brush.dry * np.clip(4 * fu - 1, 0, 1)).astype(np.float32)
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & (rng.random(rid.size, dtype=np.float32) >= dry[rid])
    elements = np.flatnonzero(ok)  # later strokes have larger indices
    winner = np.full(h * w, -1, dtype=np.int64)
    np.maximum.at(winner, yi[elements] * w + xi[elements], elements)
    covered = winner >= 0
    e = winner[covered]
    stroke = sid[rid[e]]
    shade = 1 + brush.streak * np.sin(2 * np.pi / brush.bristle * v[e] + s["phase"][stroke])
    shade -= 0.08 * (fu[rid[e]] + 0.5)
    canvas.reshape(-1, 3)[covered] = s["colour"][stroke] * shade[:, None]
    return covered.reshape(h, w)


def _grain(rng, kind, period, h, w):
    """A canvas texture in [-1, 1] with a period of a few px (weave, hatching, linen, ...)."""
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    f, (p0, p1) = np.float32(2 * np.pi / period), rng.uniform(0, 2 * np.pi, 2).astype(np.float32)
    if kind == "weave":
        return np.cos(f * x + p0) * np.cos(f * y + p1)
    if kind == "twill":
        return np.cos(f * (x + y) + p0) * np.ones_like(y)
    if kind == "crosshatch":
        return 0.5 * (np.cos(f * (x + y) + p0) + np.cos(f * (x - y) + p1))
    if kind == "linen":
        slubs = rng.uniform(0.4, 1.0, w).astype(np.float32)[None, :]
        return np.cos(f * x + p0) * slubs * 0.8 + 0.2 * np.cos(f * y + p1)
    if kind == "ribbed":
        return np.cos(f * y + p0) * np.ones_like(x)
    return np.clip(rng.standard_normal((h, w), dtype=np.float32) * 0.5, -1, 1)  # gesso


def _paint(rng, style, h, w):
    """One painting by `style` as an (h, w, 3) uint8 array."""
    period = style.periods[int(rng.choice(len(style.periods), p=style.weights))]
    pal = np.clip(period.palette * rng.normal(1.0, 0.06, (5, 3)), 0, 1).astype(np.float32)
    brush = _image_brush(rng, period.brush)
    field = _composition(rng, period.composition, pal, h, w)
    canvas = 0.55 * field + 0.45 * style.ground
    covered = _draw(rng, canvas, _strokes(rng, brush, field, pal, h, w), brush)
    amp = style.grain_amp * rng.uniform(0.8, 1.2) * np.where(covered, 1.0, 2.0).astype(np.float32)
    canvas *= (1 + amp * _grain(rng, style.grain, style.grain_period, h, w))[..., None]
    a, tilt = rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi)
    x, y = (np.arange(w) / w - 0.5)[None, :], (np.arange(h) / h - 0.5)[:, None]
    light = 1 + a * (np.cos(tilt) * x + np.sin(tilt) * y)  # uneven lighting of the photograph
    cast = rng.normal(1.0, 0.05, 3) * rng.normal(1.0, 0.07)  # its white balance and exposure
    canvas *= light[..., None].astype(np.float32) * cast.astype(np.float32)
    return np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)


def _image_size(rng, min_size, max_size):
    """(h, w): short side in [min_size, max_size], aspect w/h log-uniform in [0.6, 1.7]."""
    short = int(rng.integers(min_size, max_size + 1))
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
    return (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)


def _save(rng, rgb, stem, kind):
    """Save an RGB array as `kind` ('RGB', 'L', 'CMYK' as JPEG; 'P', 'P_transparent', 'RGBA' as
    PNG) with fixed settings and no metadata; returns the file name."""
    img = Image.fromarray(rgb, "RGB")
    quality = int(rng.integers(80, 96))
    if kind in ("RGB", "L", "CMYK"):
        path = stem.with_suffix(".jpg")
        img.convert(kind).save(path, "JPEG", quality=quality, optimize=False, progressive=False)
    elif kind == "RGBA":
        path = stem.with_suffix(".png")
        alpha = np.zeros(rgb.shape[:2], dtype=np.uint8)
        m = max(2, min(rgb.shape[:2]) // 25)
        alpha[m:-m, m:-m] = 255  # a transparent margin, as on a cut-out scan
        rgba = np.dstack([rgb * (alpha[..., None] > 0), alpha]).astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(path, "PNG", compress_level=6)
    else:
        path = stem.with_suffix(".png")
        pimg = img.quantize(colors=48, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        extra = {"transparency": int(pimg.getpixel((0, 0)))} if kind == "P_transparent" else {}
        pimg.save(path, "PNG", compress_level=6, **extra)
    return path.name


def _odd_kinds(rng, n):
    """The file kind of each of n images: mostly 'RGB', ~2.5% (at least 4, at most n/4) odd ones."""
    kinds = np.full(n, "RGB", dtype=object)
    n_odd = min(max(len(_ODD_KINDS) - 1, round(0.025 * n)), n // 4)
    where = rng.choice(n, size=n_odd, replace=False)
    kinds[where] = [_ODD_KINDS[i % len(_ODD_KINDS)] for i in range(n_odd)]
    return kinds


def _write_split(dest, split, artists, styles, params):
    """Paint and save one split's images; returns the rows (id, img_path, artist)."""
    prefix = split.upper()
    folder = dest / split
    folder.mkdir(parents=True, exist_ok=True)
    kinds = _odd_kinds(np.random.default_rng([params["seed"], 3, int(split == "test")]), len(artists))
    digits = max(4, len(str(len(artists) - 1)))
    rows = []
    for i, (artist, kind) in enumerate(zip(artists, kinds, strict=True)):
        rng = np.random.default_rng([params["seed"], 4, int(split == "test"), i])
        h, w = _image_size(rng, params["min_size"], params["max_size"])
        rgb = _paint(rng, styles[artist], h, w)
        image_id = f"{prefix}_{i:0{digits}d}"
        name = _save(rng, rgb, folder / image_id, kind)
        rows.append((image_id, f"./{split}/{name}", styles[artist].name))
    return rows


def _build(dest, params):
    """Write every image, the four CSVs and, last, the marker."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MARKER).unlink(missing_ok=True)
    atomic_write_text(dest / BUILDING, json.dumps(params))
    _clear_images(dest)
    names = _artist_names(params["n_artists"])
    styles = _styles(params["seed"], names)
    train_counts = _long_tail_counts(params["n_artists"], params["n_train"])
    test_counts = _test_counts(train_counts, params["n_test"])
    rng = np.random.default_rng([params["seed"], 0])
    ks = np.arange(params["n_artists"])
    train = pd.DataFrame(_write_split(dest, "train", rng.permutation(np.repeat(ks, train_counts)),
                                      styles, params), columns=["id", "img_path", "artist"])
    test = pd.DataFrame(_write_split(dest, "test", rng.permutation(np.repeat(ks, test_counts)),
                                     styles, params), columns=["id", "img_path", "artist"])
    _write_csv(train, dest / "train.csv")
    _write_csv(test[["id", "img_path"]], dest / "test.csv")
    _write_csv(test[["id"]].assign(artist=names[0]), dest / "sample_submission.csv")
    _write_csv(test[["id", "artist"]], dest / "test_solution.csv")
    marker = {"params": params, "artists": dict(zip(names, train_counts.tolist(), strict=True)),
              "test_artists": dict(zip(names, test_counts.tolist(), strict=True))}
    atomic_write_text(dest / MARKER, json.dumps(marker, indent=1) + "\n")
    (dest / BUILDING).unlink(missing_ok=True)


def make_synthetic_artworks(dest, n_artists=40, n_train=800, n_test=200, seed=0,
                            min_size=48, max_size=160, overwrite=False):
    """Write the built-in dataset of painted artworks to `dest` (competition layout); return its path.

    Writes ``train/``, ``test/``, ``train.csv`` (id, img_path, artist), ``test.csv`` (id, img_path),
    ``sample_submission.csv`` (id, artist: the most frequent artist), ``test_solution.csv`` (the
    hidden test labels) and, last, ``synthetic.json`` (the parameters). A folder already built with
    the same parameters is returned as it is; one built with other parameters, or holding other
    data, is rewritten only when ``overwrite=True`` (only ``TRAIN_*``/``TEST_*`` images and the
    CSVs are replaced). Image short sides lie in [min_size, max_size], aspects (w/h) in [0.6, 1.7].
    """
    params = _check_args(n_artists, n_train, n_test, seed, min_size, max_size, overwrite)
    dest = Path(dest)
    state = _cache_state(dest, params)
    if state == "fresh":
        return dest
    if state == "different" and not overwrite:
        raise ValueError(f"{dest} holds a synthetic dataset made with other parameters "
                         f"(see {dest / MARKER}); pass overwrite=True to rebuild it with {params}")
    if state == "foreign" and not overwrite:
        raise ValueError(f"{dest} already holds a dataset not made by make_synthetic_artworks; "
                         "pass overwrite=True to replace it, or choose another dest")
    _build(dest, params)
    return dest


def texture_probe(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-looking uint8 (h, w, 3) probe image with fine texture (gradients, sinusoids, a 3 px checker, noise):
    what resampling tests and benchmarks shrink, because aliasing shows on it."""
    rng = np.random.default_rng(seed)
    y, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None]
    smooth = np.stack([70 + 110 * x / w + 0 * y, 60 + 120 * y / h + 0 * x, 120 + 50 * np.sin(x / 19 + y / 29)], -1)
    fine = 28 * np.sin(2 * math.pi * (0.31 * x + 0.07 * y)) + 18 * np.sin(2 * math.pi * (0.05 * x - 0.37 * y))
    checker = 14 * (((x // 3) + (y // 3)) % 2 * 2 - 1)
    image = smooth + (fine + checker)[..., None] + 6 * rng.standard_normal((h, w, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)

