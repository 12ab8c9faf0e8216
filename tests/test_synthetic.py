"""The built-in synthetic dataset: layout, long tail, determinism, odd files, sizes, cache, arguments."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from artlearn import synthetic
from artlearn.synthetic import _long_tail_counts, make_synthetic_artworks

SMALL = {"n_artists": 12, "n_train": 120, "n_test": 30, "seed": 0, "min_size": 32, "max_size": 72}
TINY = {"n_artists": 3, "n_train": 9, "n_test": 4, "seed": 1, "min_size": 16, "max_size": 24}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small dataset shared by the read-only tests."""
    return make_synthetic_artworks(tmp_path_factory.mktemp("syn") / "data", **SMALL)


def _tables(root):
    """train, test, sample_submission and test_solution as DataFrames."""
    return [pd.read_csv(root / f"{n}.csv") for n in ("train", "test", "sample_submission", "test_solution")]


def _files(root):
    """Relative path -> bytes of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_columns(built):
    train, test, sample, solution = _tables(built)
    assert list(train.columns) == ["id", "img_path", "artist"]
    assert list(test.columns) == ["id", "img_path"]
    assert list(sample.columns) == ["id", "artist"] and list(solution.columns) == ["id", "artist"]
    assert len(train) == SMALL["n_train"] and len(test) == SMALL["n_test"]
    assert train["id"].str.fullmatch(r"TRAIN_\d{4}").all() and test["id"].str.fullmatch(r"TEST_\d{4}").all()
    assert train["id"].is_unique and test["id"].is_unique
    assert train["img_path"].str.fullmatch(r"\./train/TRAIN_\d{4}\.(jpg|png)").all()
    assert test["img_path"].str.fullmatch(r"\./test/TEST_\d{4}\.(jpg|png)").all()
    assert all((built / p).is_file() for p in pd.concat([train["img_path"], test["img_path"]]))
    assert len(list((built / "train").iterdir())) == len(train) and len(list((built / "test").iterdir())) == len(test)
    assert train["artist"].nunique() == SMALL["n_artists"]
    assert all(re.fullmatch(r"[A-Z][A-Za-z]+(_[A-Za-z-]+)+", a) for a in train["artist"].unique())
    marker = json.loads((built / "synthetic.json").read_text())
    assert {k: marker["params"][k] for k in SMALL} == SMALL
    assert not list(built.glob("*.tmp")) and not (built / ".synthetic_building").exists()


def test_test_ids_match_submission_and_solution(built):
    train, test, sample, solution = _tables(built)
    assert list(sample["id"]) == list(test["id"]) == list(solution["id"])
    counts = train["artist"].value_counts()
    assert sample["artist"].nunique() == 1 and counts[sample["artist"][0]] == counts.max()
    assert set(solution["artist"]) <= set(train["artist"])


def test_long_tail_counts(built):
    train, _, _, solution = _tables(built)
    counts = train["artist"].value_counts()
    assert list(counts) == sorted(counts, reverse=True)
    assert 0.08 <= counts.iloc[0] / len(train) <= 0.14
    assert 1 <= counts.iloc[-1] <= 3 and counts.iloc[0] >= 4 * counts.iloc[-1]
    expected = counts / len(train) * len(solution)  # the test split follows the train distribution
    got = solution["artist"].value_counts().reindex(counts.index, fill_value=0)
    assert (np.abs(got - expected) < 1).all()


@pytest.mark.parametrize("n_artists,n_total", [(12, 480), (50, 5000), (40, 480), (8, 120), (5, 5), (2, 10)])
def test_long_tail_profile(n_artists, n_total):
    counts = _long_tail_counts(n_artists, n_total)
    assert counts.sum() == n_total and len(counts) == n_artists and counts.min() >= 1
    assert (np.diff(counts) <= 0).all()
    if n_total > n_artists:
        assert 1 <= counts[-1] <= 3
    if n_artists >= 12:
        assert 0.08 <= counts[0] / n_total <= 0.14
    if n_artists >= 40:  # enough artists for the real shape: ~11% then ~8%
        assert 0.10 <= counts[0] / n_total <= 0.12 and 0.06 <= counts[1] / n_total <= 0.10


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    again = make_synthetic_artworks(tmp_path / "again", **SMALL)
    assert _files(again) == _files(built)
    other = make_synthetic_artworks(tmp_path / "other", **{**SMALL, "seed": 1})
    a, b = _files(built), _files(other)
    images = [p for p in a if p.startswith(("train/", "test/")) and p in b]
    assert sum(a[p] != b[p] for p in images) >= 0.9 * len(images)
    assert a["train.csv"] != b["train.csv"]


def test_odd_modes_present_and_valid(built):
    for split in ("train", "test"):
        modes, transparent_p = [], 0
        for path in sorted((built / split).iterdir()):
            with Image.open(path) as img:
                img.load()
                modes.append(img.mode)
                assert img.format == ("JPEG" if path.suffix == ".jpg" else "PNG")
                transparent_p += img.mode == "P" and "transparency" in img.info
        assert {"L", "P", "RGBA", "CMYK"} <= set(modes), (split, set(modes))
        assert modes.count("RGB") >= 0.8 * len(modes) and transparent_p >= 1


def test_sizes_and_aspects_vary(built):
    sizes = [Image.open(p).size for p in sorted((built / "train").iterdir())]
    short = np.array([min(s) for s in sizes])
    aspect = np.array([w / h for w, h in sizes])
    assert short.min() >= SMALL["min_size"] and short.max() <= SMALL["max_size"]
    assert np.ptp(short) >= 0.6 * (SMALL["max_size"] - SMALL["min_size"])
    assert aspect.min() < 0.8 and aspect.max() > 1.3 and 0.55 <= aspect.min() and aspect.max() <= 1.75
    assert len(set(sizes)) >= 0.5 * len(sizes)


def test_images_look_like_paintings(built):
    """Colourful, textured canvases: neither flat fills nor noise, and artists differ in colour."""
    train = pd.read_csv(built / "train.csv")
    means = {}
    for artist, path in zip(train["artist"], train["img_path"], strict=True):
        with Image.open(built / path) as img:
            a = np.asarray(img.convert("RGB"), dtype=np.float32)
        assert 5 < a.std() < 90
        means.setdefault(artist, []).append(a.reshape(-1, 3).mean(0))
    centroids = np.array([np.mean(m, axis=0) for m in means.values()])
    gaps = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)[np.triu_indices(len(centroids), 1)]
    assert np.median(gaps) > 20


def test_learnable_above_majority_baseline(built):
    """Nearest-centroid on colour + gradient-orientation histograms beats the majority class clearly."""
    def features(path):
        a = np.asarray(Image.open(built / path).convert("RGB"), dtype=np.float32) / 255
        q = np.minimum((a * 4).astype(int), 3)
        colour = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / q[..., 0].size
        gy, gx = np.gradient(a.mean(-1))
        angle = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 8).astype(int), 7)
        orient = np.bincount(angle.ravel(), weights=np.hypot(gx, gy).ravel(), minlength=8)
        return np.concatenate([colour, orient / (orient.sum() + 1e-9)])

    train, test, _, solution = _tables(built)
    x_train = np.stack([features(p) for p in train["img_path"]])
    x_test = np.stack([features(p) for p in test["img_path"]])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    artists = sorted(train["artist"].unique())
    centroids = np.stack([((x_train - mu) / sd)[train["artist"].to_numpy() == a].mean(0) for a in artists])
    dist = np.linalg.norm((x_test - mu)[:, None] / sd - centroids[None], axis=-1)
    accuracy = (np.array(artists)[dist.argmin(1)] == solution["artist"].to_numpy()).mean()
    baseline = (solution["artist"] == train["artist"].value_counts().index[0]).mean()
    assert accuracy >= 2 * baseline


def test_cache_returns_without_rewriting(tmp_path):
    root = make_synthetic_artworks(tmp_path / "d", **TINY)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert make_synthetic_artworks(str(tmp_path / "d"), **TINY) == root
    assert make_synthetic_artworks(tmp_path / "d", **TINY, overwrite=True) == root  # same parameters: kept
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_other_parameters_need_overwrite(tmp_path):
    root = make_synthetic_artworks(tmp_path / "d", **{**TINY, "n_train": 12})
    with pytest.raises(ValueError, match="overwrite=True"):
        make_synthetic_artworks(root, **TINY)
    make_synthetic_artworks(root, **TINY, overwrite=True)
    assert json.loads((root / "synthetic.json").read_text())["params"]["n_train"] == TINY["n_train"]
    assert len(pd.read_csv(root / "train.csv")) == TINY["n_train"]
    assert len(list((root / "train").iterdir())) == TINY["n_train"]  # no stale images left behind


def test_new_generator_version_rebuilds(tmp_path, monkeypatch):
    root = make_synthetic_artworks(tmp_path / "d", **TINY)
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    make_synthetic_artworks(root, **TINY)  # the same request, another generator: no overwrite needed
    assert json.loads((root / "synthetic.json").read_text())["params"]["version"] == synthetic.GENERATOR_VERSION


def test_interrupted_or_damaged_build_is_redone(tmp_path):
    root = make_synthetic_artworks(tmp_path / "d", **TINY)
    reference = _files(root)
    (root / "synthetic.json").unlink()
    (root / ".synthetic_building").write_text("{}")  # as left by an interrupted build
    make_synthetic_artworks(root, **TINY)
    assert _files(root) == reference
    first = root / pd.read_csv(root / "train.csv")["img_path"][0]
    first.unlink()
    make_synthetic_artworks(root, **TINY)
    assert first.is_file() and _files(root) == reference


def test_foreign_data_is_not_overwritten(tmp_path):
    (tmp_path / "train.csv").write_text("id,img_path,artist\n")
    with pytest.raises(ValueError, match="not made by make_synthetic_artworks"):
        make_synthetic_artworks(tmp_path, **TINY)
    assert (tmp_path / "train.csv").read_text() == "id,img_path,artist\n"
    make_synthetic_artworks(tmp_path, **TINY, overwrite=True)
    assert len(pd.read_csv(tmp_path / "train.csv")) == TINY["n_train"]


@pytest.mark.parametrize("kw,match", [
    ({"n_artists": 1}, r"n_artists must be in \[2, "),
    ({"n_artists": 2.5}, "n_artists must be an integer"),
    ({"n_artists": True}, "n_artists must be an integer"),
    ({"n_artists": 5, "n_train": 4}, r"n_train must be >= n_artists \(5\)"),
    ({"n_test": 0}, "n_test must be >= 1"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"min_size": 8}, r"min_size must be in \[16, 4096\]"),
    ({"min_size": 64, "max_size": 32}, r"max_size must be in \[min_size \(64\), 4096\]"),
    ({"overwrite": "yes"}, "overwrite must be True or False"),
])
def test_bad_arguments_raise(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_artworks(tmp_path / "d", **{**TINY, **kw})
    assert not (tmp_path / "d").exists()
