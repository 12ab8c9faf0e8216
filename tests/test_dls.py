"""artlearn.dls: fastai DataLoaders of one fold; `import artlearn` stays light."""
import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from conftest import MODES, broken_dataset, mode_suffix, raises_with, write_mode_image
from PIL import Image

from artlearn.checkpoint import DataMeta
from artlearn.dls import ArtistDataLoaders, artist_dls
from artlearn.store import PresizeCache
from artlearn.tables import load_rgb, read_artworks


# ---------------------------------------------------------------- DataLoaders


def test_dls_batches_vocab_meta(dataset):
    df = read_artworks(dataset([9, 7, 5, 4, 3], size=(40, 30)))
    cache = PresizeCache(19)
    vocabs = []
    for fold in (0, 1):
        with pytest.warns(UserWarning, match="A04"):
            dls = artist_dls(df, fold=fold, size=16, bs=4, cache=cache)
        x, y = dls.one_batch()
        assert tuple(x.shape) == (4, 3, 16, 16) and x.dtype.is_floating_point
        assert int(y.min()) >= 0 and int(y.max()) < len(dls.vocab)
        meta = dls.data_meta
        assert isinstance(dls, ArtistDataLoaders) and isinstance(meta, DataMeta) and dls.cache is cache
        assert meta.size == 16 and meta.fold == fold and meta.n_folds == 4 and meta.split_seed == 42
        assert len(meta.mean) == len(meta.std) == 3 and meta.store_side == cache.presize
        assert len(dls.train_ds) + len(dls.valid_ds) == len(df)
        vocabs.append(list(dls.vocab))
        assert list(meta.vocab) == list(dls.vocab)
    assert vocabs[0] == vocabs[1] == sorted(df["artist"].unique())
    assert cache.n_decodes == len(df)  # two folds, one decode per image


def test_dls_vocab_includes_artists_absent_from_training(dataset):
    df = read_artworks(dataset([6, 5, 1]))
    df = df.assign(fold=[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0])
    dls = artist_dls(df, fold=0, size=16, bs=4)  # the single A02 work is in the validation split only
    assert list(dls.vocab) == ["A00", "A01", "A02"]
    ys = [int(y) for _, y in dls.valid_ds]
    assert 2 in ys


def test_dls_normalisation(tmp_path):
    """Training-split statistics (checked against numpy), then ~N(0, 1) over the validation loader."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        arr = np.clip(rng.normal([60, 120, 200], [20, 40, 10], (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append((str(tmp_path / f"{i}.png"), f"A{i % 3}"))
    df = pd.DataFrame(rows, columns=["img_path", "artist"])
    dls = artist_dls(df, fold=0, size=24, bs=4, n_folds=3)  # 24 px images: the validation crop is the image
    train = np.concatenate([np.asarray(load_rgb(p)).reshape(-1, 3) for p in dls.train_ds.items["img_path"]]) / 255
    assert np.allclose(dls.data_meta.mean, train.mean(0), atol=1e-6)
    assert np.allclose(dls.data_meta.std, train.std(0), atol=1e-5)
    import torch
    xs = torch.cat([x for x, _ in dls.valid])
    assert xs.shape[0] == len(dls.valid_ds)
    assert xs.mean((0, 2, 3)).abs().max() < 0.15
    assert (xs.std((0, 2, 3)) - 1).abs().max() < 0.15


def test_dls_every_mode(tmp_path):
    import torch
    rows = [(str(write_mode_image(tmp_path / f"{m.replace(';', '')}_{k}{mode_suffix(m)}", m, (28, 24), seed=k)),
             f"A{k}") for m in MODES for k in range(2)]
    df = pd.DataFrame(rows, columns=["img_path", "artist"])
    dls = artist_dls(df, fold=0, n_folds=2, size=16, bs=8)
    for loader in (dls.train, dls.valid):
        for x, _ in loader:
            assert x.shape[1:] == (3, 16, 16) and bool(torch.isfinite(x).all())
    assert dls.cache.n_decodes == len(df)


def test_dls_bad_arguments(dataset):
    df = read_artworks(dataset([4, 4]))
    with raises_with("fold=4", "0..3"):
        artist_dls(df, fold=4, size=16)
    with raises_with("fold=-1"):
        artist_dls(df, fold=-1, size=16)
    with raises_with("fold=2", "0..1"):
        artist_dls(df.assign(fold=[0, 1] * 4), fold=2, size=16)
    with raises_with("size="):
        artist_dls(df, size=4)
    with raises_with("sampler="):
        artist_dls(df, size=16, sampler="uniform")
    with raises_with("'img_path' and 'artist'"):
        artist_dls(df.drop(columns="artist"), size=16)


def test_dls_broken_files(dataset):
    csv, broken = broken_dataset(dataset)
    df = read_artworks(csv)
    with raises_with("3 unreadable", *broken.values(), "truncated image file", "not an image", "empty file (0 bytes)"):
        artist_dls(df, fold=0, size=16, bs=4)
    with pytest.warns(UserWarning, match="dropped 3 row") as rec:
        dls = artist_dls(df, fold=0, size=16, bs=4, on_bad="drop")
    assert any(broken["truncated"] in str(w.message) for w in rec)
    assert len(dls.train_ds) + len(dls.valid_ds) == 15
    kept = set(dls.train_ds.items["img_path"]) | set(dls.valid_ds.items["img_path"])
    assert len(kept) == 15 and not kept & set(broken.values())


def test_dls_cache_shared_across_epochs(dataset):
    df = read_artworks(dataset([6, 5, 4]))
    cache = PresizeCache(19)
    dls = artist_dls(df, fold=0, size=16, bs=4, cache=cache, n_folds=3)
    for _ in range(2):
        assert sum(len(x) for x, _ in dls.train) > 0
    artist_dls(df, fold=2, size=16, bs=4, cache=cache, n_folds=3)
    assert cache.n_decodes == len(df)


def test_dls_reproducible_with_seeded_globals(dataset, no_rng_leak):
    """pipeline='items' (fastai's): same seed -> identical first training batch once the global RNGs (crop:
    `random`; flip/rotate: torch) are seeded; the shuffle order alone is seeded by artist_dls itself."""
    import fastai.vision.all  # noqa: F401 - importing fastai draws from the global RNG: do it before seeding
    import torch
    df = read_artworks(dataset([6, 5, 4], size=(40, 30)))
    cache = PresizeCache(19)

    def first_batch(seed, global_seed):
        random.seed(global_seed)
        torch.manual_seed(global_seed)
        return next(iter(artist_dls(df, fold=0, size=16, bs=6, seed=seed, cache=cache, n_folds=3,
                                    pipeline="items").train))

    (xa, ya), (xb, yb) = first_batch(42, 0), first_batch(42, 0)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = first_batch(42, 1)
    assert not torch.equal(xa, xc)  # augmentation follows the global RNGs
    orders = {tuple(first_batch(42, g)[1].tolist()) for g in range(3)}
    assert len(orders) == 1  # the shuffle follows `seed` only


def test_device_pipeline_follows_its_own_seed_only(dataset, no_rng_leak):
    """pipeline='device': shuffling AND crops come from the loader's own seeded RNG; the global RNGs neither
    change the batches nor are touched."""
    import torch
    df = read_artworks(dataset([6, 5, 4], size=(40, 30)))
    cache = PresizeCache(19)

    def first_batch(seed, global_seed):
        random.seed(global_seed)
        torch.manual_seed(global_seed)
        dl = artist_dls(df, fold=0, size=16, bs=6, seed=seed, cache=cache, n_folds=3, pipeline="device").train
        state = torch.get_rng_state()
        dl.create_batch([0, 1, 2])  # gathering and augmenting draw from the loader's RNG only
        assert torch.equal(state, torch.get_rng_state())  # (torch's DataLoader iterator itself draws a base seed)
        dl.rng = random.Random(seed)
        return next(iter(dl))

    (xa, ya), (xb, yb) = first_batch(42, 0), first_batch(42, 1)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = first_batch(7, 0)
    assert not torch.equal(xa, xc)
    assert xa.shape == (6, 3, 16, 16) and type(xa).__name__ == "TensorImage"

    def epoch_labels(seed):
        dls = artist_dls(df, fold=0, size=16, bs=6, seed=seed, cache=cache, n_folds=3)
        return [int(i) for _, y in dls.train for i in y]
    assert epoch_labels(42) == epoch_labels(42) != epoch_labels(7)


@pytest.mark.parametrize("pipeline", ["device", "items"])
def test_dls_balanced_sampler(dataset, no_rng_leak, pipeline):
    counts = {"big": 30, "mid": 10, "rare": 4}
    df = read_artworks(dataset(counts))
    df = df.assign(fold=np.arange(len(df)) % 2)
    dls = artist_dls(df, fold=0, n_folds=2, size=16, bs=11, sampler="balanced", max_rotate=0.0, pipeline=pipeline)
    drawn = Counter()
    for _ in range(10):
        for _, y in dls.train:
            drawn.update(dls.vocab[int(i)] for i in y)
    total = sum(drawn.values())
    assert total == 10 * len(dls.train_ds)
    share = {a: n / len(df) for a, n in counts.items()}
    assert drawn["rare"] / total > 2 * share["rare"]  # ~1/3 instead of 1/11
    assert drawn["big"] / total < 0.6 * share["big"]  # ~1/3 instead of 2/3
    assert all(abs(drawn[a] / total - 1 / 3) < 0.12 for a in counts)


def test_device_loader_batches_are_the_dataset_rows_and_test_dl_reads_its_own(dataset):
    """StoreBatchDL reads a table of the dataset's rows built once: each batch's labels and pixels are those rows'
    (checked against the per-item dataset and the store's centre views), and a test_dl gets its own table."""
    import torch
    from artlearn.augment import center_views
    df = read_artworks(dataset([6, 5, 4], size=(40, 30)))
    cache = PresizeCache(19)
    dls = artist_dls(df, fold=0, size=16, bs=4, cache=cache, n_folds=3)
    valid = dls.valid
    seen = torch.cat([y for _, y in valid])
    assert seen.tolist() == [int(valid.dataset[i][1]) for i in range(len(valid.dataset))]
    x, _ = valid.create_batch([2, 0])
    paths = [valid.dataset[i][0] for i in (2, 0)]
    expected = center_views(*cache.batch(paths), 16) / 255
    torch.testing.assert_close(x.as_subclass(torch.Tensor), expected)
    shuffled = [int(i) for _, y in dls.train for i in y]
    assert len(shuffled) == len(dls.train) * 4 and set(shuffled) <= set(range(len(dls.vocab)))
    rows = df.iloc[[5, 1, 9]].reset_index(drop=True)
    test = dls.test_dl(rows[["img_path"]])
    (tx,) = test.create_batch([0, 1, 2])  # before the batch transforms (normalisation)
    torch.testing.assert_close(tx.as_subclass(torch.Tensor), center_views(*cache.batch(rows["img_path"]), 16) / 255)


def test_validation_views_are_computed_once_and_again_only_for_a_changed_file(dataset, monkeypatch):
    """Centre views are deterministic: the first validation epoch computes them, later ones gather the kept copies
    (bit-identical), a repainted file is viewed afresh, and a budget too small to keep anything changes nothing."""
    import torch

    import artlearn.dls as dls_module
    from artlearn.augment import center_views
    df = read_artworks(dataset([6, 5, 4], size=(40, 30)))
    cache = PresizeCache(19)
    valid = artist_dls(df, fold=0, size=16, bs=4, cache=cache, n_folds=3).valid
    computed = []
    monkeypatch.setattr(dls_module, "center_views", lambda *a: computed.append(len(a[0])) or center_views(*a))
    first = [x.as_subclass(torch.Tensor).clone() for x, _ in valid]
    assert sum(computed) == len(valid.dataset)
    second = [x.as_subclass(torch.Tensor) for x, _ in valid]
    assert sum(computed) == len(valid.dataset)  # nothing computed again
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    path = valid.dataset[1][0]
    Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8)).save(path)  # the painting changes on disk
    (x,) = valid.create_batch([0, 1])[:1]
    assert computed[-1] == 1  # only the changed row
    torch.testing.assert_close(x.as_subclass(torch.Tensor), center_views(*cache.batch([valid.dataset[0][0], path]),
                                                                         16) / 255)
    assert float(x[1].min()) * 255 > 199  # the new pixels, not the kept view
    valid.create_batch([0, 1])
    assert computed[-1] == 1 and len(computed) == len(valid) + 1  # the repainted row is kept again: nothing new
    for budget, kept in ((0, 0), (3 * 3 * 16 * 16, 3)):  # nothing kept; three uint8 views kept, the rest each time
        monkeypatch.setattr(dls_module, "EVAL_VIEW_BYTES", budget)
        tight = artist_dls(df, fold=0, size=16, bs=4, cache=cache, n_folds=3).valid
        for _ in range(2):
            assert all(torch.equal(a, b.as_subclass(torch.Tensor)) for a, (b, _) in zip(second[1:], list(tight)[1:]))
        assert tight._view_bytes == budget and len(tight._views) == kept


def test_prefetching_keeps_the_batches_and_their_order(dataset):
    """The background thread builds the same batches as the main process would, in the same order, epoch after
    epoch (the crops draw from the loader's seeded RNG in batch order either way)."""
    import torch
    df = read_artworks(dataset([6, 5, 4], size=(40, 30)))
    cache = PresizeCache(19)

    def two_epochs(prefetch):
        dls = artist_dls(df, fold=0, size=16, bs=3, seed=5, cache=cache, n_folds=3)
        dls.train.prefetch = prefetch
        return [b for _ in range(2) for b in dls.train] + list(dls.valid)

    ahead, inline = two_epochs(2), two_epochs(0)
    assert len(ahead) == len(inline) > 4
    for (xa, ya), (xb, yb) in zip(ahead, inline):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_prefetched_stops_its_thread_and_raises_the_producers_error():
    import threading
    from artlearn.dls import prefetched
    made = []

    def batches(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise OSError(f"batch {i}: unreadable")
            made.append(i)
            yield i

    assert list(prefetched(batches(5), 2)) == [0, 1, 2, 3, 4]
    made.clear()
    for i in prefetched(batches(1000), 1):
        if i == 2:
            break  # the consumer stops early: the producer stops too, a batch or two ahead at most
    assert len(made) <= 5
    assert not any(t.name == "artlearn-prefetch" for t in threading.enumerate())
    with pytest.raises(OSError, match="batch 3: unreadable"):
        list(prefetched(batches(6, fail_at=3), 2))
    with pytest.raises(ValueError, match="prefetch=-1"):
        from artlearn.dls import StoreBatchDL
        StoreBatchDL(prefetch=-1)
