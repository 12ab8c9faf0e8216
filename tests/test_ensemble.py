"""ensemble() against a hand-written flip-TTA reference, its inputs (one fold, one path, PIL images), fold
compatibility checks, write_submission."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import artlearn as al
from conftest import make_tiny_run
from artlearn.checkpoint import load_fold
from artlearn.augment import valid_crop
from artlearn.store import PresizeCache, fold_store_side, presize_for
from artlearn.tables import load_rgb
from artlearn.ensemble import crop_batch


def _shrink(img, presize):
    """Oracle of the presize cache's resize: shorter side to presize (never upscale), bilinear, reducing_gap 3."""
    short = min(img.size)
    if short <= presize:
        return img
    size = (max(1, round(img.width * presize / short)), max(1, round(img.height * presize / short)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-fold x 1-epoch ResNet-18 run at 32 px on tiny synthetic data, fastai's per-item pipeline (PIL oracle)."""
    run, df, root = make_tiny_run(tmp_path_factory.mktemp("ens"), n_test=12, seed=3, pipeline="items")
    return run, df, al.read_artworks(root / "test.csv", kind="test")


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """The same tiny run trained with the device pipeline (the default)."""
    run, df, root = make_tiny_run(tmp_path_factory.mktemp("ens-device"), n_test=12, seed=3)
    return run, df, al.read_artworks(root / "test.csv", kind="test")


def test_device_run_ensemble_equals_its_centre_view_oracle(device_run):
    from artlearn.augment import center_views
    from artlearn.store import pad_batch
    run, _, test = device_run
    assert all(run.metas[k]["pipeline"] == "device" for k in (0, 1))
    probs, _ = al.ensemble(run, test, folds=[0, 1], tta="flip")
    total = 0
    for k in (0, 1):
        model, meta = load_fold(run.fold_dir(k))
        store = PresizeCache(fold_store_side(meta))  # the store's own decoding is tested against PIL in test_store
        store.fill(test["img_path"])
        stored = [torch.from_numpy(store.get(p).copy()).permute(2, 0, 1) for p in test["img_path"]]
        x = center_views(*pad_batch(stored), 32) / 255
        x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            total = total + model(x).softmax(1) + model(x.flip(3)).softmax(1)
    np.testing.assert_allclose(probs, (total / 4).numpy(), atol=1e-5)


def test_device_ensemble_view_equals_the_device_validation_loader(device_run):
    run, df, _ = device_run
    folds = pd.read_csv(run.path / "folds.csv")
    dls = al.artist_dls(folds.assign(img_path=df["img_path"]), fold=0, size=32, bs=64, n_folds=2)
    x_loader = torch.cat([xb for xb, _ in dls.valid]).cpu()
    model, meta = load_fold(run.fold_dir(0))
    with torch.no_grad():
        from_loader = model(x_loader).softmax(1).numpy()
    probs, _ = al.ensemble([run.fold_dir(0)], dls.valid.items, tta=None)
    np.testing.assert_allclose(probs, from_loader, atol=1e-5)  # OOF sees exactly what validation saw


def reference_probs(fold_dirs, paths, flip=True):
    """Hand-written oracle: per fold softmax(model(x)) and softmax(model(flip(x))), averaged."""
    total = 0
    for d in fold_dirs:
        model, meta = load_fold(d)
        mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
        side = fold_store_side(meta)
        imgs = [np.asarray(valid_crop(_shrink(load_rgb(p, max_side=side), side), meta["size"])) for p in paths]
        x = (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            total = total + model(x).softmax(1) + (model(x.flip(3)).softmax(1) if flip else 0)
    return (total / (len(fold_dirs) * (2 if flip else 1))).numpy()


def test_ensemble_equals_hand_written_flip_tta(tiny_run):
    run, _, test = tiny_run
    probs, vocab = al.ensemble(run, test, folds=[0, 1], tta="flip")
    expected = reference_probs([run.fold_dir(0), run.fold_dir(1)], test["img_path"])
    assert probs.shape == (len(test), len(run.vocab)) and vocab == run.vocab
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_tta_none_and_logit_average(tiny_run):
    run, _, test = tiny_run
    plain, _ = al.ensemble(run, test, folds=[0], tta=None)
    np.testing.assert_allclose(plain, reference_probs([run.fold_dir(0)], test["img_path"], flip=False), atol=1e-5)
    spelled, _ = al.ensemble(run, test, folds=[0], tta="none")  # the Recipe's spelling of no TTA
    np.testing.assert_array_equal(spelled, plain)
    by_prob, _ = al.ensemble(run, test, folds=[0, 1], average="prob")
    by_logit, _ = al.ensemble(run, test, folds=[0, 1], average="logit")
    np.testing.assert_allclose(by_logit.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(by_prob, by_logit)


def test_ensemble_view_equals_the_validation_loader(tiny_run):
    run, df, _ = tiny_run
    folds = pd.read_csv(run.path / "folds.csv")
    dls = al.artist_dls(folds.assign(img_path=df["img_path"]), fold=0, size=32, bs=64, n_folds=2, pipeline="items")
    x_fastai = torch.cat([xb for xb, _ in dls.valid]).cpu()
    valid_paths = dls.valid.items["img_path"]
    mean = torch.tensor(dls.data_meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(dls.data_meta.std).view(1, 3, 1, 1)
    ours = (crop_batch(dls.cache, valid_paths, 32)[0].float() / 255 - mean) / std
    np.testing.assert_allclose(np.asarray(x_fastai), ours.numpy(), atol=1e-5)


def test_a_cache_at_another_resolution_is_refused(tiny_run):
    run, _, test = tiny_run
    side = fold_store_side(run.metas[0])
    assert side == run.metas[1]["store_side"] > presize_for(32)  # the 'crop' rule of the default recipe
    with pytest.raises(ValueError, match=f"shorter side of {presize_for(32)} px.*store at {side} px"):
        al.ensemble(run, test, cache=PresizeCache(presize_for(32)))


def test_each_image_decoded_once_for_all_folds_and_flips(tiny_run):
    run, _, test = tiny_run
    cache = PresizeCache(fold_store_side(run.metas[0]))
    al.ensemble(run, test, folds=[0, 1], tta="flip", cache=cache)
    assert cache.n_decodes == len(test)
    al.ensemble(run, test, folds=[0, 1], tta="flip", cache=cache)
    assert cache.n_decodes == len(test)


def test_default_folds_follow_the_selection(tiny_run):
    run, _, test = tiny_run
    chosen = run.summary["selection"]["folds"]
    auto, _ = al.ensemble(al.load_run(run.path), test)
    named, _ = al.ensemble(run, test, folds=chosen)
    np.testing.assert_allclose(auto, named, atol=1e-6)


def _copy_fold(run, tmp_path, name, change):
    """A copy of fold 0 whose meta.json is changed by `change`."""
    dst = tmp_path / name
    shutil.copytree(run.fold_dir(0), dst)
    meta = json.loads((dst / "meta.json").read_text())
    change(meta)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_folds_with_other_vocab_or_size_are_refused(tiny_run, tmp_path):
    run, _, test = tiny_run
    renamed = _copy_fold(run, tmp_path, "renamed", lambda m: m.update(vocab=[v + "_x" for v in m["vocab"]]))
    with pytest.raises(ValueError, match="different vocabs"):
        al.ensemble([run.fold_dir(0), renamed], test)
    resized = _copy_fold(run, tmp_path, "resized", lambda m: m.update(size=48))
    with pytest.raises(ValueError, match="different sizes"):
        al.ensemble([run.fold_dir(0), resized], test)


def test_bad_arguments(tiny_run):
    run, _, test = tiny_run
    with pytest.raises(ValueError, match="tta"):
        al.ensemble(run, test, tta="multi")
    with pytest.raises(ValueError, match="average"):
        al.ensemble(run, test, average="median")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        al.ensemble(run, test, folds=[5])
    with pytest.raises(ValueError, match="img_path"):
        al.ensemble(run, pd.DataFrame({"path": ["x.jpg"]}))


def test_write_submission_order_and_atomicity(tmp_path):
    vocab = ["A", "B", "C"]
    probs = np.array([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1], [0.2, 0.2, 0.6]])
    path = al.write_submission(["t2", "t0", "t1"], probs, vocab, tmp_path / "sub" / "submission.csv")
    sub = pd.read_csv(path)
    assert list(sub.columns) == ["id", "artist"]
    assert sub["id"].tolist() == ["t2", "t0", "t1"] and sub["artist"].tolist() == ["B", "A", "C"]
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


@pytest.mark.parametrize("ids, probs, message", [
    (["a", "a"], np.eye(2), "duplicated id"),
    (["a", "b", "c"], np.eye(2), "one row per id"),
    (["a", "b"], np.ones((2, 3)), "vocabulary has 2"),
    (["a", "b"], np.array([[np.nan, 1.0], [1.0, 0.0]]), "NaN"),
])
def test_write_submission_refuses_bad_input(tmp_path, ids, probs, message):
    with pytest.raises(ValueError, match=message):
        al.write_submission(ids, probs, ["A", "B"], tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def _normalised(arrays, meta):
    """(n, 3, s, s) float tensor from uint8 HxWx3 arrays, normalised with a fold's statistics."""
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255 - mean) / std


def test_multicrop_tta_equals_hand_written_views(tiny_run):
    run, _, test = tiny_run
    paths = test["img_path"].iloc[:6]
    cache = PresizeCache(fold_store_side(run.metas[0]))
    probs, _ = al.ensemble(run, test.iloc[:6], folds=[0], tta="multicrop", cache=cache)
    model, meta = load_fold(run.fold_dir(0))
    s = meta["size"]
    total, n = 0, 0
    for arr_views in zip(*[[np.asarray(valid_crop(Image.fromarray(cache.get(p)), s))]
                           + [_at_presize(cache.get(p), s)[y:y + s, x:x + s]
                              for y, x in _windows(_at_presize(cache.get(p), s).shape, s)]
                           for p in paths]):
        x = _normalised(arr_views, meta)
        with torch.no_grad():
            total = total + model(x).softmax(1) + model(x.flip(3)).softmax(1)
        n += 2
    np.testing.assert_allclose(probs, (total / n).numpy(), atol=1e-5)
    assert n == 12


def test_multicrop_windows_do_not_depend_on_the_stores_resolution(tmp_path):
    """The five windows are taken at the 1.15 x size scale: from a large stored image (store 'crop'/'full') they
    equal, within resampling error, the windows of the same image stored at 1.15 x size (v0.1's definition)."""
    from artlearn.tta import native_windows
    yy, xx = np.mgrid[0:240, 0:300]
    path = tmp_path / "big.png"  # smooth gradients: windows at another scale would have other colours
    Image.fromarray(np.stack([xx * 255 // 299, yy * 255 // 239, (xx + yy) * 255 // 538], 2).astype(np.uint8)).save(path)
    small, large = PresizeCache(presize_for(32)), PresizeCache(200)
    small.fill([path]), large.fill([path])
    assert min(large.get(path).shape[:2]) == 200 and min(small.get(path).shape[:2]) == presize_for(32)
    a = torch.stack(native_windows(small, [path], 32)).float()
    b = torch.stack(native_windows(large, [path], 32)).float()
    assert a.shape == b.shape == (5, 1, 3, 32, 32)
    assert (a - b).abs().mean() < 3.0  # 0..255 scale: the same windows, resampled along two paths


def _at_presize(arr, s):
    """The stored image at multicrop's scale: shorter side 1.15 x s when it is larger (PIL bilinear, reducing_gap 3)."""
    img, target = Image.fromarray(arr), presize_for(s)
    if min(img.size) <= target:
        return arr
    scale = target / min(img.size)
    size = (max(s, round(img.width * scale)), max(s, round(img.height * scale)))
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))


def _windows(shape, s):
    """Top-left corners of the centre and the four corner windows."""
    h, w = shape[:2]
    return [((h - s) // 2, (w - s) // 2), (0, 0), (0, w - s), (h - s, 0), (h - s, w - s)]


def test_prior_adjust_is_post_hoc_logit_adjustment(tiny_run):
    run, _, test = tiny_run
    tau = 1.0
    probs, _ = al.ensemble(run, test, folds=[0], tta=None, prior_adjust=tau)
    model, meta = load_fold(run.fold_dir(0))
    counts = torch.tensor(meta["class_counts"], dtype=torch.float32) + 1
    side = fold_store_side(meta)
    imgs = [np.asarray(valid_crop(_shrink(load_rgb(p, max_side=side), side), 32)) for p in test["img_path"]]
    with torch.no_grad():
        logits = model(_normalised(imgs, meta))
    expected = (logits - tau * (counts / counts.sum()).log()).softmax(1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert sum(meta["class_counts"]) == len(pd.read_csv(run.path / "folds.csv").query("fold != 0"))
    plain, _ = al.ensemble(run, test, folds=[0], tta=None)
    rarest = int(np.argmin(meta["class_counts"]))
    assert probs[:, rarest].mean() > plain[:, rarest].mean()


def test_one_fold_folder_and_one_image_path(tiny_run, tmp_path):
    run, _, test = tiny_run
    path = test["img_path"].iloc[0]
    by_run, vocab = al.ensemble(run, test.iloc[:1], folds=[0], tta=None)
    for fold_dir, image in ((run.fold_dir(0), path), (str(run.fold_dir(0)), Path(path))):
        probs, v = al.ensemble(fold_dir, image, tta=None)
        assert probs.shape == (1, len(vocab)) and v == vocab
        np.testing.assert_allclose(probs, by_run, atol=1e-6)
    with pytest.raises(ValueError, match="folds=\\[0\\]"):
        al.ensemble(run.fold_dir(0), path, folds=[0])
    with pytest.raises(ValueError, match="is a folder"):
        al.ensemble(run, run.path)
    with pytest.raises(ValueError, match="neither a run directory"):
        al.ensemble(tmp_path, path)


def test_progress_bar_changes_nothing(tiny_run):
    run, _, test = tiny_run
    quiet, _ = al.ensemble(run, test, bs=5)
    shown, _ = al.ensemble(run, test, bs=5, progress=True)
    np.testing.assert_array_equal(quiet, shown)


def test_pil_images_are_ensembled_without_entering_the_cache(tiny_run, tmp_path):
    run, _, test = tiny_run
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    img.save(tmp_path / "painting.png")
    cache = PresizeCache(fold_store_side(run.metas[0]))
    from_pil, _ = al.ensemble(run, [img], cache=cache)
    assert len(cache) == 0
    np.testing.assert_allclose(from_pil, al.ensemble(run, tmp_path / "painting.png")[0], atol=1e-6)


@pytest.mark.parametrize("tta", ["none", "flip", "multicrop"])
def test_each_image_costs_the_forward_passes_the_budget_planner_charges(device_run, monkeypatch, tta):
    """tta.TTA_VIEWS' views (what FoldPlanner reserves time for) equal the images ensemble() passes through each
    fold."""
    import sys

    from artlearn.tta import TTA_VIEWS
    ensemble_module = sys.modules["artlearn.ensemble"]  # artlearn.ensemble is the function
    run, _, test = device_run
    seen, real_load = [], ensemble_module.load_folds

    def counting_load(*args, **kw):
        models, metas, device = real_load(*args, **kw)
        for m in models:
            m.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
        return models, metas, device
    monkeypatch.setattr(ensemble_module, "load_folds", counting_load)
    al.ensemble(run.path, test, tta=tta, bs=5)
    assert sum(seen) == len(test) * len(run.folds) * TTA_VIEWS[tta].views
