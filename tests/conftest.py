"""Shared fixtures: tiny competition-layout datasets written into tmp_path, and the real data when present."""

import os
import random
from contextlib import contextmanager
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


MODES = ["L", "P", "PT", "RGBA", "LA", "CMYK", "I;16", "1"]  # PT: palette with a transparent colour


def write_mode_image(path, mode, size=(24, 20), seed=0) -> Path:
    """A small image saved in the given PIL mode ('PT' = palette with transparency)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8))
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (size[1], size[0])).astype(np.uint16)).save(path)
    elif mode == "PT":
        rgb.convert("P").save(path, transparency=0)
    else:
        rgb.convert(mode).save(path)
    return path


def mode_suffix(mode) -> str:
    return ".jpg" if mode == "CMYK" else ".png"


@contextmanager
def raises_with(*parts):
    """pytest.raises(ValueError) whose message must contain every part (the problem and the place)."""
    with pytest.raises(ValueError) as info:
        yield info
    missing = [str(p) for p in parts if str(p) not in str(info.value)]
    assert not missing, f"{missing} not in error message: {info.value}"


@pytest.fixture
def no_rng_leak():
    """Run a test with its own global RNG states, restored afterwards."""
    import torch
    state = random.getstate()
    with torch.random.fork_rng():
        yield
    random.setstate(state)



def write_broken(folder) -> dict:
    """One file per kind of breakage; name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = write_image(folder / "full.jpg", (64, 48), seed=1)
    data = full.read_bytes()
    paths = {"zero": folder / "zero.jpg", "truncated": folder / "truncated.jpg", "text": folder / "text.jpg"}
    paths["zero"].write_bytes(b"")
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["text"].write_text("id,img_path\nnot an image\n")
    return {k: str(v) for k, v in paths.items()}




def broken_dataset(dataset):
    """A small training table plus its broken files appended (same artists)."""
    csv = dataset([6, 5, 4])
    broken = write_broken(csv.parent / "train")
    table = pd.read_csv(csv)
    extra = pd.DataFrame({"id": list(broken), "img_path": [os.path.relpath(p, csv.parent) for p in broken.values()],
                          "artist": ["A00", "A01", "A02"]})
    pd.concat([table, extra]).to_csv(csv, index=False)
    return csv, broken


def make_tiny_run(base, n_test: int = 8, seed: int = 1, folds=None, **overrides):
    """A 2-fold x 1-epoch ResNet-18 run at 32 px on 4 synthetic artists under `base`: (run, train table, data root)."""
    import warnings

    import artlearn as al
    root = al.make_synthetic_artworks(Path(base) / "data", n_artists=4, n_train=40, n_test=n_test, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = al.read_artworks(root / "train.csv", kind="train")
        run = al.train_kfold(df, Path(base) / "run", n_folds=2, folds=folds, arch="resnet18", size=32, epochs=1,
                             bs=8, progress=False, **overrides)
    return run, df, root


def quiet_train_kfold(df, out, defaults: dict, **kw):
    """train_kfold with `defaults` (overridden by `kw`), its warnings hidden, collecting its log lines."""
    import warnings

    import artlearn as al
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = al.train_kfold(df, out, log=lines.append, **{**defaults, **kw})
    return run, lines
