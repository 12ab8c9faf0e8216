"""artlearn.store: the decode-once image store."""
import os

import numpy as np
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


