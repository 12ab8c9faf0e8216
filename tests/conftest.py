"""Shared fixtures: tiny competition-layout datasets written into tmp_path, and the real data when present."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "artworks"


@pytest.fixture(scope="session")
def poison_batch():
    """Factory of a fastai callback that makes one training batch (epoch, batch) produce a NaN loss."""
    from fastai.callback.core import Callback

    class PoisonBatch(Callback):
        """Multiplies the inputs of one training batch by NaN."""

        def __init__(self, epoch, batch):
            self.at = (epoch, batch)

        def before_batch(self):
            if self.training and (self.epoch, self.iter) == self.at:
                self.learn.xb = (self.xb[0] * float("nan"),)

    return PoisonBatch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models on 2 cores: one intra-op thread avoids oversubscription (much faster); restored afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_image(path, size=(24, 20), color=None, seed=0, mode="RGB", fmt=None) -> Path:
    """Write a small noisy image of one colour; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    color = rng.integers(0, 256, 3) if color is None else np.asarray(color)
    w, h = size
    arr = np.clip(color + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_dataset(root, counts, size=(24, 20), ext=".jpg", test=0, seed=0) -> Path:
    """Competition layout under root: train.csv (id,img_path,artist), ./train/*.jpg and optionally test.csv.

    `counts` maps artist -> number of works (or is a list of counts, artists named A00, A01, ...). Each artist has
    its own base colour so the images differ by class; sizes vary a little. Returns the train.csv path.
    """
    root = Path(root)
    if not isinstance(counts, dict):
        counts = {f"A{i:02d}": n for i, n in enumerate(counts)}
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for artist, n in counts.items():
        base = rng.integers(20, 236, 3)
        for _ in range(n):
            name = f"TRAIN_{k:04d}{ext}"
            w, h = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
            write_image(root / "train" / name, (w, h), color=base, seed=seed * 100003 + k)
            rows.append((f"TRAIN_{k:04d}", f"./train/{name}", artist))
            k += 1
    pd.DataFrame(rows, columns=["id", "img_path", "artist"]).to_csv(root / "train.csv", index=False)
    if test:
        trows = []
        for j in range(test):
            name = f"TEST_{j:04d}{ext}"
            write_image(root / "test" / name, size, seed=seed * 7919 + j)
            trows.append((f"TEST_{j:04d}", f"./test/{name}"))
        pd.DataFrame(trows, columns=["id", "img_path"]).to_csv(root / "test.csv", index=False)
    return root / "train.csv"


@pytest.fixture
def dataset(tmp_path):
    """Factory: dataset(counts, **kw) -> train.csv path of a tiny dataset in a fresh folder under tmp_path."""
    made = []

    def _make(counts, name=None, **kw):
        folder = tmp_path / (name or f"data{len(made)}")
        made.append(folder)
        return make_dataset(folder, counts, **kw)

    return _make


@pytest.fixture
def real_data() -> Path:
    """The competition data folder (../shared/data/artworks); skips the test when it is absent."""
    if not (REAL_DATA / "train.csv").is_file():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA.resolve()
