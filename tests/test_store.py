"""artlearn.store: the decode-once image store."""
import os

import numpy as np
import pytest
from conftest import raises_with, write_broken, write_image

from artlearn.store import PresizeCache
from artlearn.tables import load_rgb, read_artworks


# ---------------------------------------------------------------- presize cache


def test_cache_decodes_once(dataset):
    df = read_artworks(dataset([4, 3], size=(40, 30)))
    paths = list(df["img_path"])
    cache = PresizeCache(24, mode="memory")
    cache.fill(paths)
    cache.fill(paths)
    arrays = [cache.get(p) for p in paths]
    cache.fill(reversed(paths))
    assert cache.n_decodes == len(paths) == len(cache)
    for p, arr in zip(paths, arrays):
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) == 24
        assert np.array_equal(arr, cache.get(p))
    assert cache.n_decodes == len(paths)


def test_cache_redecodes_changed_file(tmp_path):
    path = write_image(tmp_path / "a.png", (40, 30), color=(10, 10, 10))
    cache = PresizeCache(16, mode="memory")
    first = cache.get(path)
    st = os.stat(path)
    write_image(path, (40, 30), color=(240, 240, 240))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    second = cache.get(path)
    assert cache.n_decodes == 2 and second.mean() > first.mean() + 100
    cache.get(path)
    assert cache.n_decodes == 2


def test_cache_shorter_side_and_no_upscale(tmp_path):
    big = write_image(tmp_path / "big.jpg", (64, 40))
    tall = write_image(tmp_path / "tall.png", (30, 60))
    small = write_image(tmp_path / "small.png", (12, 10))
    cache = PresizeCache(20, mode="memory")
    assert cache.get(big).shape == (20, 32, 3)
    assert cache.get(tall).shape == (40, 20, 3)
    assert cache.get(small).shape == (10, 12, 3)
    assert np.array_equal(cache.get(small), np.asarray(load_rgb(small)))


def test_cache_disk_mode(dataset, tmp_path):
    paths = list(read_artworks(dataset([3, 2], size=(40, 30)))["img_path"])
    cache_dir = tmp_path / "cache"
    disk = PresizeCache(16, mode="disk", cache_dir=cache_dir)
    disk.fill(paths)
    assert disk.n_decodes == 5 and disk.nbytes == 0 and len(list(cache_dir.glob("*.npy"))) == 5
    again = PresizeCache(16, mode="disk", cache_dir=cache_dir)
    loaded = [again.get(p) for p in paths]
    assert again.n_decodes == 0
    memory = PresizeCache(16, mode="memory")
    assert all(np.array_equal(a, memory.get(p)) for a, p in zip(loaded, paths))
    auto = PresizeCache(16, mode="auto", cache_dir=tmp_path / "auto", max_memory=100)
    auto.fill(paths)
    assert auto.nbytes == 0 and len(list((tmp_path / "auto").glob("*.npy"))) == 5
    roomy = PresizeCache(16, mode="auto", cache_dir=tmp_path / "roomy", max_memory=1 << 30)
    roomy.fill(paths)
    assert roomy.nbytes > 0 and not (tmp_path / "roomy").exists()


def test_cache_bad_arguments():
    with raises_with("mode='ram'"):
        PresizeCache(16, mode="ram")
    with raises_with("presize=4"):
        PresizeCache(4)


def test_cache_fill_lists_unreadable(tmp_path):
    broken = write_broken(tmp_path)
    cache = PresizeCache(16)
    with raises_with("3 unreadable", *broken.values()):
        cache.fill(list(broken.values()))




def test_batch_gathers_stored_pixels_on_a_padded_canvas(tmp_path):
    import torch

    from artlearn.store import pad_batch
    paths = [str(write_image(tmp_path / f"{i}.png", size, seed=i)) for i, size in enumerate([(30, 20), (18, 40)])]
    cache = PresizeCache(16)
    cache.fill(paths)
    canvas, sizes = cache.batch(paths)
    assert canvas.dtype == torch.uint8 and sizes.tolist() == [[16, 24], [36, 16]]  # (h, w), shorter side 16
    assert canvas.shape == (2, 3, 36, 24)
    for i, p in enumerate(paths):
        h, w = sizes[i].tolist()
        assert np.array_equal(canvas[i, :, :h, :w].permute(1, 2, 0).numpy(), cache.get(p))
        assert int(canvas[i, :, h:, :].sum()) == 0 and int(canvas[i, :, :, w:].sum()) == 0
    one, _ = pad_batch([torch.from_numpy(cache.get(paths[0])).permute(2, 0, 1)])
    assert torch.equal(one[0], canvas[0, :, :16, :24])
    assert cache.device_memory == 0 or torch.cuda.is_available()  # nothing is kept on a device without a GPU


def test_gather_hands_out_the_stored_pixels_themselves_on_the_cpu_and_a_canvas_elsewhere(tmp_path):
    paths = [str(write_image(tmp_path / f"{i}.png", size, seed=i)) for i, size in enumerate([(30, 20), (18, 40)])]
    cache = PresizeCache(16)
    cache.fill(paths)
    images, sizes = cache.gather(paths)
    assert sizes is None and [tuple(t.shape) for t in images] == [(3, 16, 24), (3, 36, 16)]
    for t, p in zip(images, paths):
        assert t.data_ptr() == cache.get(p).ctypes.data  # zero-copy: no canvas, no copy per batch
        assert t.stride(0) == 1  # channels interleaved, the layout the CPU resizes fastest
    canvas, sizes = cache.gather(paths, "meta")  # not held on that device: copied as one padded canvas
    assert canvas.device.type == "meta" and canvas.shape == (2, 3, 36, 24) and sizes.shape == (2, 2)


def test_new_images_are_read_not_stored(tmp_path):
    stored = str(write_image(tmp_path / "a.png", (30, 20), seed=1))
    new = str(write_image(tmp_path / "b.png", (30, 20), seed=2))
    cache = PresizeCache(16)
    cache.fill([stored])
    canvas, _ = cache.batch([stored, new])
    assert len(cache) == 1 and new not in cache  # predicting a new painting never grows the store
    assert canvas.shape[0] == 2 and int(canvas[1].sum()) > 0
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="c.png: unreadable image"):
        cache.view(str(tmp_path / "c.png"))


def test_disk_store_never_serves_stale_pixels_of_a_replaced_image(tmp_path):
    import os
    path = write_image(tmp_path / "a.png", (30, 20), color=(200, 0, 0), seed=1)
    stat = os.stat(path)
    first = PresizeCache(16, mode="disk", cache_dir=tmp_path / "cache")
    first.fill([str(path)])
    old = first.get(str(path)).copy()
    write_image(path, (30, 20), color=(0, 0, 200), seed=1)  # same size in bytes? force the same mtime too
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = PresizeCache(16, mode="disk", cache_dir=tmp_path / "cache")
    again.fill([str(path)])
    assert again.n_decodes == 1 and not np.array_equal(again.get(str(path)), old)


# ---------------------------------------------------------------- the store's resolution rule


def test_store_presize_rules():
    from artlearn.store import presize_for, store_presize
    big = 1 << 40
    assert store_presize("presize", 64, 0.08, 5311, big) == presize_for(64) == 74
    assert store_presize("crop", 64, 0.08, 5311, big) == 227  # ceil(64 / sqrt(0.08))
    assert store_presize("crop", 64, 0.35, 5311, big) == 109
    assert store_presize("crop", 288, 1.0, 10, big) == presize_for(288)  # never below the 1.15 x size floor
    assert store_presize("full", 64, 0.08, 10, big) == 4096  # as decoded, up to the largest side handled
    # the memory budget caps the side (n * side^2 * 3 * 1.4 bytes), never below presize_for(size)
    budget = 5311 * 150 * 150 * 3 * 1.4
    assert store_presize("crop", 64, 0.08, 5311, budget) == 150
    assert store_presize("full", 64, 0.08, 5311, budget) == 150
    assert store_presize("crop", 64, 0.08, 5311, 1000) == 74


def test_store_presize_bad_input():
    from artlearn.store import store_presize
    with raises_with("store='huge'", "crop", "presize", "full"):
        store_presize("huge", 64, 0.08, 10)
    with raises_with("n_images=0"):
        store_presize("crop", 64, 0.08, 0)


def test_fold_store_side_reads_meta_or_the_legacy_presize():
    from artlearn.store import fold_store_side
    assert fold_store_side({"size": 64, "store_side": 227}) == 227
    assert fold_store_side({"size": 64}) == 74  # folds written before the store rule existed
