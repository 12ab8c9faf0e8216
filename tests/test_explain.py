"""predict (top-k per image from a run's fold ensemble), Grad-CAM with a known answer, explain's figure, and
examples/predict.py, on one tiny run shared by the module."""
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import artlearn as al
from conftest import make_tiny_run
from artlearn.augment import center_views
from artlearn.store import PresizeCache, fold_store_side, pad_batch, presize_for
from artlearn.ensemble import PREDICT_COLUMNS, ensemble, predict
from artlearn.explain import explain, explain_map, gradcam

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "predict.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-fold x 1-epoch ResNet-18 run at 32 px on 4 synthetic artists, and its test table."""
    run, df, root = make_tiny_run(tmp_path_factory.mktemp("explain"), n_test=8, seed=1, folds=[0, 1])
    return run, df, al.read_artworks(root / "test.csv", kind="test")


# ---------------------------------------------------------------- Grad-CAM with a known answer


class BrightPatch(nn.Module):
    """Known answer: class 0's logit is the mean of a channel firing on bright pixels, class 1's on dark ones."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))

    def forward_features(self, x):
        b = nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)  # an 8x8 map from 32 px, like a stride-4 stage
        return torch.cat([torch.relu(b - 0.5), torch.relu(0.5 - b)], 1)

    def forward_head(self, feats):
        return self.fc(feats.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def patch_image(left: int, top: int = 12, side: int = 8, size: int = 32):
    """(3, size, size): a bright square on a black background."""
    x = torch.zeros(3, size, size)
    x[:, top:top + side, left:left + side] = 1.0
    return x


@pytest.mark.parametrize("left, half", [(4, slice(0, 16)), (20, slice(16, 32))])
def test_gradcam_finds_and_follows_the_bright_patch(left, half):
    model = BrightPatch().train()
    heat = gradcam(model, patch_image(left), 0)
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1 and heat.std() > 0.1
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert 12 <= row < 20 and left <= col < left + 8
    assert heat[:, half].sum() / heat.sum() > 0.9
    dark = gradcam(model, patch_image(left), 1)  # the dark-background class looks everywhere but the patch
    assert dark[14:18, left + 2:left + 6].max() < 0.05 and dark.mean() > 0.5
    assert model.training and model.fc.weight.grad is None  # mode restored, no weight gradients left behind


def test_gradcam_on_a_resnet_and_bad_arguments():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = al.build_model("resnet18", n_classes=3).eval()
    heat = gradcam(model, torch.randn(1, 3, 64, 64), 2)
    assert heat.shape == (64, 64) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    with pytest.raises(ValueError, match="forward_features"):
        gradcam(nn.Linear(3, 2), torch.randn(3, 8, 8), 0)
    with pytest.raises(ValueError, match="one preprocessed image"):
        gradcam(model, torch.randn(2, 3, 64, 64), 0)
    with pytest.raises(ValueError, match="class_idx=3"):
        gradcam(model, torch.randn(3, 64, 64), 3)


# ---------------------------------------------------------------- predict


def test_predict_top1_is_the_ensemble_argmax(tiny):
    run, _, test = tiny
    probs, vocab = ensemble(run, test)
    top = predict(run, test, k=3)
    assert list(top.columns) == PREDICT_COLUMNS and top["rank"].tolist() == [1, 2, 3] * len(test)
    first = top[top["rank"] == 1]
    assert first["artist"].tolist() == [vocab[i] for i in probs.argmax(1)]
    assert first["image"].tolist() == test["img_path"].tolist()
    np.testing.assert_allclose(top["probability"].to_numpy().reshape(-1, 3), -np.sort(-probs, 1)[:, :3], atol=1e-6)


def _probs(table) -> dict:
    """{(image, artist): probability} of a predict table."""
    return {(i, a): p for i, a, p in zip(table["image"], table["artist"], table["probability"])}


def test_predict_accepts_paths_pil_images_and_one_fold_folder(tiny, tmp_path):
    run, _, test = tiny
    paths = test["img_path"].tolist()
    full = _probs(predict(run, test, k=4))
    for images in (paths[0], Path(paths[0]), paths[:3]):
        part = predict(run, images, k=4)
        assert part["image"].unique().tolist() == [str(p) for p in np.atleast_1d(images)]
        assert all(np.isclose(full[key], p, atol=1e-6) for key, p in _probs(part).items())
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 45, 4), dtype=np.uint8))
    rgb.save(tmp_path / "rgb.png")
    rgba.save(tmp_path / "rgba.png")
    from_files = predict(run, [tmp_path / "rgb.png", tmp_path / "rgba.png"], k=4)
    in_memory = predict(run, [rgb, rgba], k=4)
    assert in_memory["image"].unique().tolist() == ["<PIL image 0>", "<PIL image 1>"]
    np.testing.assert_allclose(in_memory["probability"], from_files["probability"], atol=1e-6)
    assert predict(run, rgb, k=1)["image"].tolist() == ["<PIL image 0>"]
    one_fold = predict(run.fold_dir(0), paths, k=1, tta=None)
    probs, vocab = ensemble(run, test, folds=[0], tta=None)
    assert one_fold["artist"].tolist() == [vocab[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(one_fold["probability"], probs.max(1), atol=1e-6)
    with pytest.raises(ValueError, match="folds"):
        predict(run.fold_dir(0), paths, folds=[0])


def test_predict_k(tiny):
    run, _, test = tiny
    every = predict(run, test.iloc[:2], k=50)
    assert every.groupby("image").size().tolist() == [len(run.vocab)] * 2
    np.testing.assert_allclose(every.groupby("image")["probability"].sum(), 1.0, atol=1e-5)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=f"k={bad!r}"):
            predict(run, test, k=bad)


def test_predict_reads_a_training_cache_without_growing_it(tiny):
    run, df, test = tiny
    cache = PresizeCache(fold_store_side(run.metas[0]))  # the training run's store
    cache.fill(df["img_path"])
    size, decodes, read = len(cache), cache.n_decodes, []
    get = cache.get
    cache.get = lambda p: read.append(str(p)) or get(p)
    images = [df["img_path"].iloc[0], test["img_path"].iloc[0]]
    top = predict(run, images, cache=cache)
    assert len(cache) == size and cache.n_decodes == decodes
    assert set(read) == {str(images[0])}  # the held image is read from the cache, the new one decoded apart
    pd.testing.assert_frame_equal(top, predict(run, images))


def test_pil_images_stay_in_a_temporary_folder(tiny, tmp_path, monkeypatch):
    run, _, _ = tiny
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = sorted(run.path.rglob("*"))
    cache = PresizeCache(presize_for(32), mode="disk")  # a disk cache would keep a PIL image's pixels
    predict(run, [Image.new("RGB", (40, 50), (200, 30, 30)), Image.new("L", (60, 30), 90)], cache=cache)
    assert list(scratch.iterdir()) == [] and sorted(run.path.rglob("*")) == before and len(cache) == 0


# ---------------------------------------------------------------- explain


def test_explain_map_uses_the_ensemble_view_and_the_predicted_artist(tiny):
    run, _, test = tiny
    path = test["img_path"].iloc[0]
    heat, crop, artist = explain_map(run, path)
    assert heat.shape == (32, 32) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    assert run.metas[0]["pipeline"] == "device"  # so the view is the device pipeline's centre view, as validated
    store = PresizeCache(fold_store_side(run.metas[0]))
    store.fill([path])
    stored = torch.from_numpy(store.get(path).copy()).permute(2, 0, 1)
    view = center_views(*pad_batch([stored]), 32)[0].round().clamp(0, 255).to(torch.uint8)
    expected = view.permute(1, 2, 0).numpy()
    assert crop.dtype == np.uint8 and np.array_equal(crop, expected)
    assert artist == predict(run, path, k=1, tta=None)["artist"].iloc[0]
    assert explain_map(run, Image.open(path), artist=run.vocab[-1])[2] == run.vocab[-1]


def test_explain_figure_and_unknown_artist(tiny):
    run, _, test = tiny
    path = test["img_path"].iloc[0]
    fig = explain(run, path, k=3)
    painting, overlay, bars, colorbar = fig.axes
    assert isinstance(fig, Figure) and len(bars.patches) == 3 and overlay.get_title().startswith("Grad-CAM: ")
    assert colorbar.get_ylabel().startswith("Grad-CAM") and colorbar.get_ylim() == (0.0, 1.0)
    crop = painting.images[0].get_array()
    assert [im.get_array().shape[:2] for im in overlay.images] == [crop.shape[:2]] * 2  # the painting, the map
    heat, opacity = overlay.images[1].get_array(), overlay.images[1].get_alpha()
    assert opacity.shape == heat.shape and opacity.max() <= 0.7 + 1e-6  # never hides the painting
    assert np.allclose(opacity, 0.7 * np.clip(heat, 0, 1))  # see-through where the map is low
    with pytest.raises(ValueError, match=f"'Nobody'.*{run.vocab[0]}"):
        explain(run, path, artist="Nobody")
    with pytest.raises(ValueError, match="one image"):
        explain(run, test["img_path"].iloc[:2].tolist())


# ---------------------------------------------------------------- examples/predict.py


def _cli(args, cwd):
    """Run examples/predict.py with this checkout's artlearn (one torch thread: the CPUs are shared)."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_predict_script(tiny, tmp_path):
    run, _, test = tiny
    paths = test["img_path"].iloc[:2].tolist()
    done = _cli([run.path, *paths, "--k", "2", "--tta", "none", "--csv", tmp_path / "top.csv",
                 "--explain", tmp_path / "why.png"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = predict(run, paths, k=2, tta=None)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "top.csv"), expected, atol=1e-6)
    assert all(a in done.stdout for a in expected["artist"]) and "rank" in done.stdout
    assert sorted(p.name for p in tmp_path.glob("why-*.png")) == sorted(f"why-{Path(p).stem}.png" for p in paths)


def test_predict_script_refuses_an_unknown_artist(tiny, tmp_path, capsys):
    run, _, test = tiny
    spec = importlib.util.spec_from_file_location("predict_script", SCRIPT)  # in-process: no second start-up
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "x.png"
    assert script.main([str(run.path), test["img_path"].iloc[0], "--explain", str(out), "--artist", "Nobody"]) == 2
    assert "'Nobody'" in capsys.readouterr().err and not out.exists()


def test_predict_script_uses_the_runs_own_views_by_default(tiny, tmp_path):
    """Without --tta the script predicts with the views the run recorded (config.json's tta), as its submission."""
    import json
    run, _, test = tiny
    spec = importlib.util.spec_from_file_location("predict_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = json.loads((run.path / "config.json").read_text())
    assert script.recorded_tta(run.path) == config["tta"]
    assert script.recorded_tta(run.path / "fold0") == "flip"  # a fold folder has no config.json
    for recorded, read in (("multicrop", "multicrop"), (None, "none")):
        other = tmp_path / f"run-{read}"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**config, "tta": recorded}))
        assert script.recorded_tta(other) == read
    path = test["img_path"].iloc[0]
    assert script.main([str(run.path), path, "--k", "2", "--csv", str(tmp_path / "top.csv")]) == 0
    expected = predict(run, [path], k=2, tta=None if config["tta"] == "none" else config["tta"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "top.csv"), expected, atol=1e-6)
