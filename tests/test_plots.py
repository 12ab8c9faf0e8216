"""Figures: assert on the matplotlib objects (axes, lines, data, bands, labels), never on pixels."""

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from PIL import Image

from artlearn import plots
from artlearn.plots import (
    HISTORY_COLUMNS, METRICS, compare_runs, describe_artworks, plot_artist_counts, plot_artist_recall,
    plot_confusion, plot_history, save_run_figures,
)

N_FOLDS, N_EPOCHS = 3, 5
ARTISTS = ["Van_Gogh"] * 6 + ["Degas"] * 4 + ["Monet"] * 2 + ["Rare"]


def fake_history(fold: int, shift: float = 0.0) -> pd.DataFrame:
    """A history.csv table whose values encode fold and epoch, so plotted data can be checked exactly."""
    e = np.arange(N_EPOCHS)
    return pd.DataFrame({
        "epoch": e, "train_loss": 3 - 0.4 * e + fold / 10 + shift, "valid_loss": 3.2 - 0.3 * e + fold / 10 + shift,
        "train_acc": 0.1 * e + fold / 100, "valid_acc": 0.08 * e + fold / 100 + shift,
        "f1_macro": 0.05 * e + fold / 100, "lr": 1e-3 * (1 + np.cos(np.pi * e / N_EPOCHS)) / 2,
        "seconds": 1.0 + fold,
    }, columns=list(HISTORY_COLUMNS))


def fake_oof() -> pd.DataFrame:
    """OOF table: Van_Gogh 5/6 right, Degas 2/4, Monet 0/2 (both called Degas), Rare 0/1 (called Van_Gogh)."""
    pred = ["Van_Gogh"] * 5 + ["Degas"] + ["Degas", "Degas", "Van_Gogh", "Monet"] + ["Degas", "Degas"] + ["Van_Gogh"]
    vocab = sorted(set(ARTISTS))
    probs = np.full((len(ARTISTS), len(vocab)), 0.1)
    for i, p in enumerate(pred):
        probs[i, vocab.index(p)] = 0.7
    df = pd.DataFrame({"img_path": [f"x{i}.jpg" for i in range(len(ARTISTS))], "fold": np.arange(len(ARTISTS)) % 3,
                       "artist": ARTISTS, "pred": pred})
    return df.join(pd.DataFrame(probs, columns=[f"p_{a}" for a in vocab]))


def make_run(root: Path, name: str, config: dict, shift: float = 0.0, oof: bool = True) -> Path:
    """A fake train_kfold run dir: config.json, fold<k>/meta.json (complete), history.csv and oof.csv."""
    run = root / name
    table = fake_oof()
    for k in range(N_FOLDS):
        (run / f"fold{k}").mkdir(parents=True)
        fake_history(k, shift).to_csv(run / f"fold{k}" / "history.csv", index=False)
        vocab = sorted(table["artist"].unique())
        meta = {"complete": True, "fold": k, "epoch": 0, "vocab": vocab,
                "model": {"arch": "resnet18", "n_classes": len(vocab)}}
        (run / f"fold{k}" / "meta.json").write_text(json.dumps(meta))
        if oof:
            table[table["fold"] == k].to_csv(run / f"fold{k}" / "oof.csv", index=False)
    (run / "config.json").write_text(json.dumps({"format": "artlearn-run", "format_version": 2, **config}))
    return run


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path, "r50", {"arch": "resnet50", "size": 288, "pool": "avg", "out": str(tmp_path)})


def fake_learner(n_epochs=3, batches=4, names=("epoch", "train_loss", "valid_loss", "accuracy", "f1_score", "time")):
    """A fastai-like learner: recorder.values (one row per epoch, no 'epoch'/'time'), metric_names, lrs, iters."""
    width = len([n for n in names if n not in ("epoch", "time")])
    values = [[10 * e + j for j in range(width)] for e in range(n_epochs)]
    lrs = [float(b) for b in range(n_epochs * batches)]  # the lr equals the batch index
    iters = [batches * (e + 1) for e in range(n_epochs)]
    return SimpleNamespace(recorder=SimpleNamespace(values=values, metric_names=list(names), lrs=lrs, iters=iters))


def ydata(ax):
    return [list(line.get_ydata()) for line in ax.get_lines()]


# ---------------------------------------------------------------- plot_history


def test_history_from_run_dir(run_dir):
    fig = plot_history(run_dir)
    assert isinstance(fig, Figure) and len(fig.axes) == len(METRICS)
    for ax, metric in zip(fig.axes, METRICS):
        assert len(ax.get_lines()) == N_FOLDS
        assert ax.get_title() == plots.TITLES[metric] and ax.get_xlabel() == "epoch"
        for k, line in enumerate(ax.get_lines()):
            csv = pd.read_csv(run_dir / f"fold{k}" / "history.csv")
            np.testing.assert_allclose(line.get_xdata(), csv["epoch"])
            np.testing.assert_allclose(line.get_ydata(), csv[metric])
            assert line.get_label() == f"fold {k}"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["fold 0", "fold 1", "fold 2"]
    assert "r50" in fig._suptitle.get_text()


def test_history_sources_agree(run_dir):
    hist = {k: pd.read_csv(run_dir / f"fold{k}" / "history.csv") for k in range(N_FOLDS)}
    expected = ydata(plot_history(run_dir, metrics=["valid_loss"]).axes[0])
    run = SimpleNamespace(histories=hist, path=run_dir)
    for source in (run, hist, list(hist.values()), pd.concat([h.assign(fold=k) for k, h in hist.items()])):
        assert ydata(plot_history(source, metrics=["valid_loss"]).axes[0]) == expected
    single = plot_history(hist[1], metrics="valid_acc")
    assert ydata(single.axes[0]) == [list(hist[1]["valid_acc"])]


def test_history_folds_axs_and_title(run_dir):
    fig = plot_history(run_dir, metrics=("valid_loss", "f1_macro"), folds=[2, 0], title="mine")
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["fold 2", "fold 0"]
    assert fig._suptitle.get_text() == "mine"
    host = Figure()
    axs = host.subplots(1, 2)
    assert plot_history(run_dir, metrics=("train_loss", "lr"), axs=axs) is host
    assert [len(ax.get_lines()) for ax in axs] == [N_FOLDS, N_FOLDS]
    assert host._suptitle is None  # the caller's figure is not retitled


def test_history_log_scale(run_dir, three_runs):
    fig = plot_history(run_dir, logy=True)
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log", "log", "linear", "linear"]
    assert fig.axes[1].get_title() == "train loss (log scale)"
    fig = compare_runs(three_runs, metrics=("valid_loss", "lr"), logy=["lr"])
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log"]
    with pytest.raises(ValueError, match=r"logy=\['top5'\]"):
        plot_history(run_dir, logy=["top5"])


def test_history_auto_log_scale_only_for_a_spike():
    calm = pd.DataFrame({"epoch": range(5), "valid_loss": [2.0, 1.8, 1.6, 1.5, 1.4],
                         "train_loss": [2.1, 1.9, 1.7, 1.6, 1.5]})
    spiky = calm.assign(valid_loss=[60.0, 1.8, 1.6, 1.5, 1.4])  # the from-scratch epoch-0 spike (40x)
    metrics = ("train_loss", "valid_loss")
    assert [ax.get_yscale() for ax in plot_history(calm, metrics=metrics).axes] == ["linear", "linear"]
    fig = plot_history(spiky, metrics=metrics)
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log"]
    ys = fig.axes[1].get_lines()[0].get_ydata()
    assert max(ys) == 60.0 and fig.axes[1].get_ylim()[1] >= 60.0  # the spike stays visible
    assert [ax.get_yscale() for ax in plot_history(spiky, metrics=metrics, logy=False).axes] == ["linear"] * 2


def test_history_bad_inputs(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"available columns: \[.*'valid_loss'"):
        plot_history(run_dir, metrics=("valid_loss", "top5"))
    with pytest.raises(ValueError, match="axs has 1 axes"):
        plot_history(run_dir, metrics=("valid_loss", "lr"), axs=[Figure().add_subplot()])
    with pytest.raises(ValueError, match=r"fold 7.*available"):
        plot_history(run_dir, folds=[7])
    with pytest.raises(ValueError, match="not an artlearn run directory"):
        plot_history(tmp_path / "r50" / "fold0")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"format": "artlearn-run", "format_version": 2}))
    with pytest.raises(ValueError, match="no fold<k>/history.csv"):
        plot_history(empty)
    with pytest.raises(ValueError, match="not a run directory"):
        plot_history(tmp_path / "missing")
    with pytest.raises(ValueError, match="from a int"):
        plot_history(3)
    with pytest.raises(ValueError, match="empty"):
        plot_history(pd.DataFrame(columns=HISTORY_COLUMNS))


def test_history_from_fake_learner():
    learn = fake_learner()
    with pytest.warns(UserWarning, match="train_acc"):
        fig = plot_history(learn, logy=False)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [plots.TITLES[m] for m in ("train_loss", "valid_loss", "valid_acc", "lr")]
    assert fig._suptitle.get_text() == "learner: last fit"
    assert ydata(fig.axes[0]) == [[0, 10, 20]]  # train_loss is column 0 of recorder.values
    assert ydata(fig.axes[2]) == [[2, 12, 22]]  # 'accuracy' -> valid_acc
    assert ydata(fig.axes[3]) == [[0.0, 4.0, 8.0]]  # first lr of each epoch
    f1 = plot_history(learn, metrics=["f1_macro"])
    assert ydata(f1.axes[0]) == [[3, 13, 23]]
    with pytest.raises(ValueError, match="none of metrics"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_history(learn, metrics=["train_acc"])


def test_history_fake_learner_with_train_metrics():
    names = ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_f1_score", "time")
    learn = fake_learner(n_epochs=2, names=names)
    learn.recorder.iters = []  # no iters: lrs split evenly over epochs
    fig = plot_history(learn, metrics=METRICS + ("f1_macro",))
    assert [ax.get_title() for ax in fig.axes] == [plots.TITLES[m] for m in METRICS + ("f1_macro",)]
    assert ydata(fig.axes[0]) == [[1, 11]] and ydata(fig.axes[3]) == [[3, 13]] and ydata(fig.axes[4]) == [[0.0, 4.0]]


def test_history_prefers_artlearn_history_table():
    learn = fake_learner()
    learn.history = SimpleNamespace(frame=lambda: fake_history(0))
    fig = plot_history(learn)  # the table has train_acc: no warning, every default panel
    assert [ax.get_title() for ax in fig.axes] == [plots.TITLES[m] for m in METRICS]
    assert ydata(fig.axes[0]) == [list(fake_history(0)["train_acc"])]
    learn.history = SimpleNamespace(frame=lambda: pd.DataFrame(columns=HISTORY_COLUMNS))  # before fit: recorder
    assert ydata(plot_history(learn, metrics="valid_acc").axes[0]) == [[2, 12, 22]]


def test_history_from_real_fastai_learner():
    torch = pytest.importorskip("torch")
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    ds = list(zip(x, y))
    dls = DataLoaders.from_dsets(ds[:48], ds[48:], bs=16, device="cpu")
    learn = Learner(dls, torch.nn.Linear(4, 3), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_logging():
        learn.fit(2, lr=1e-2)
    fig = plot_history(learn, metrics=("train_loss", "valid_loss", "valid_acc", "lr"))
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 1, 1]
    assert fig._suptitle.get_text() == "learner: last fit"  # not the Learner's .path
    np.testing.assert_allclose(fig.axes[2].get_lines()[0].get_ydata(), [float(v[2]) for v in learn.recorder.values])
    np.testing.assert_allclose(fig.axes[3].get_lines()[0].get_ydata(), [1e-2, 1e-2])


# ---------------------------------------------------------------- compare_runs


@pytest.fixture
def three_runs(tmp_path):
    return [make_run(tmp_path, f"run{s}", {"arch": "resnet50", "size": s, "pool": "avg", "out": f"/o/{s}"}, shift=i)
            for i, s in enumerate((224, 288, 320))]


def test_compare_runs_mean_band(three_runs):
    fig = compare_runs(three_runs)
    assert len(fig.axes) == len(METRICS)
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["size=224", "size=288", "size=320"]
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 3  # one min..max band per run
    valid = fig.axes[2].get_lines()[1]
    folds = [pd.read_csv(three_runs[1] / f"fold{k}" / "history.csv")["valid_loss"] for k in range(N_FOLDS)]
    np.testing.assert_allclose(valid.get_ydata(), np.mean(folds, axis=0))
    band = fig.axes[2].collections[1].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(np.min(folds)) and band.max() == pytest.approx(np.max(folds))
    assert "min..max" in fig._suptitle.get_text()


def test_compare_runs_one_fold_and_labels(tmp_path, three_runs):
    fig = compare_runs(three_runs, labels=["a", "b", "c"], metrics=["valid_acc"], fold=1)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b", "c"] and not ax.collections
    expected = pd.read_csv(three_runs[2] / "fold1" / "history.csv")["valid_acc"]
    np.testing.assert_allclose(ax.get_lines()[2].get_ydata(), expected)
    gem = make_run(tmp_path, "gem", {"arch": "resnet34", "size": 288, "pool": "gem"})
    labels = [line.get_label() for line in compare_runs([three_runs[1], gem], metrics="lr").axes[0].get_lines()]
    assert labels == ["resnet50, pool=avg", "resnet34, pool=gem"]
    mapping = compare_runs({"x": three_runs[0], "y": fake_history(0)}, metrics="lr", fold="mean")
    assert [line.get_label() for line in mapping.axes[0].get_lines()] == ["x", "y"]
    same = [make_run(tmp_path, n, {"arch": "resnet50"}, oof=False) for n in ("first", "second")]
    assert [ln.get_label() for ln in compare_runs(same, metrics="lr").axes[0].get_lines()] == ["first", "second"]


def test_compare_runs_bad_inputs(three_runs):
    with pytest.raises(ValueError, match="list of runs"):
        compare_runs(three_runs[0])
    with pytest.raises(ValueError, match="nothing to compare"):
        compare_runs([])
    with pytest.raises(ValueError, match="labels has 1 entries for 3 runs"):
        compare_runs(three_runs, labels=["a"])
    with pytest.raises(ValueError, match="fold='best'"):
        compare_runs(three_runs, fold="best")
    with pytest.raises(ValueError, match="fold 9"):
        compare_runs(three_runs, fold=9)
    with pytest.raises(ValueError, match="available columns"):
        compare_runs(three_runs, metrics=["valid_map"])


# ---------------------------------------------------------------- the data set


def test_describe_artworks(tmp_path):
    paths = []
    for i, (size, mode) in enumerate([((40, 30), "RGB"), ((20, 50), "L"), ((60, 60), "RGB")]):
        paths.append(tmp_path / f"{i}.png")
        Image.new(mode, size).save(paths[-1])
    df = pd.DataFrame({"img_path": [str(p) for p in paths] * 4 + [str(paths[0])], "artist": ARTISTS})
    d = describe_artworks(df, n_folds=3, images=True)
    assert d["n_images"] == 13 and d["n_artists"] == 4
    assert list(d["works_per_artist"]) == [6, 4, 2, 1] and d["works_per_artist"].index[0] == "Van_Gogh"
    assert d["top1_share"] == pytest.approx(6 / 13) and d["top2_share"] == pytest.approx(10 / 13)
    assert d["top5_share"] == pytest.approx(1.0) and d["median_works"] == 3.0 and d["min_works"] == 1
    assert d["rare_artists"] == ["Monet", "Rare"]
    assert d["width"] == {"min": 20, "median": 40.0, "max": 60} and d["height"]["max"] == 60
    assert d["modes"] == {"RGB": 9, "L": 4} and d["unreadable"] == []
    assert "width" not in describe_artworks(df)
    with pytest.raises(ValueError, match="'artist' column"):
        describe_artworks(df.drop(columns="artist"))
    with pytest.raises(ValueError, match="n_folds=0"):
        describe_artworks(df, n_folds=0)
    with pytest.raises(ValueError, match="img_path"):
        describe_artworks(df.drop(columns="img_path"), images=True)


def test_plot_artist_counts():
    df = pd.DataFrame({"artist": ARTISTS})
    fig = plot_artist_counts(df, n_folds=3)
    ax, twin = fig.axes
    assert [p.get_height() for p in ax.patches] == [6, 4, 2, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Van_Gogh", "Degas", "Monet", "Rare"]
    np.testing.assert_allclose(twin.get_lines()[0].get_ydata(), np.cumsum([6, 4, 2, 1]) / 13)
    assert any(list(line.get_ydata()) == [3, 3] for line in ax.get_lines())  # the n_folds line
    many = pd.DataFrame({"artist": [f"a{i:02d}" for i in range(50) for _ in range(50 - i)]})
    ticks = plot_artist_counts(many).axes[0].get_xticklabels()
    assert len(ticks) == 50 and ticks[0].get_rotation() == 90


# ---------------------------------------------------------------- out-of-fold errors


def test_confusion_and_recall_from_oof(run_dir):
    oof = fake_oof()
    oof.to_csv(run_dir.parent / "merged.csv", index=False)
    sources = (run_dir, run_dir.parent / "merged.csv", SimpleNamespace(oof=oof),
               SimpleNamespace(oof=None, path=run_dir), oof, oof.drop(columns="pred"))
    for source in sources:
        fig = plot_confusion(source, normalize=False)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["Van_Gogh", "Degas", "Monet", "Rare"]
        cm = ax.get_images()[0].get_array()
        assert cm[0].tolist() == [5, 1, 0, 0] and cm[2].tolist() == [0, 2, 0, 0] and cm.sum() == 13
    norm = plot_confusion(oof).axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(norm.sum(axis=1), 1.0)
    assert norm[1, 1] == pytest.approx(0.5)
    fig = plot_artist_recall(run_dir)
    ax = fig.axes[0]
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [5 / 6, 0.5, 0.0, 0.0])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Van_Gogh", "Degas", "Monet", "Rare"]
    assert [t.get_text() for t in ax.texts] == ["n=6", "n=4", "n=2", "n=1"]


def test_oof_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no out-of-fold predictions"):
        plot_confusion(tmp_path)
    with pytest.raises(ValueError, match="no out-of-fold predictions"):
        plot_confusion(SimpleNamespace(oof=None, path=tmp_path))
    with pytest.raises(ValueError, match="missing column 'artist'"):
        plot_artist_recall(fake_oof().drop(columns="artist"))
    with pytest.raises(ValueError, match="'pred' column or p_<artist>"):
        plot_confusion(fake_oof()[["artist"]])
    with pytest.raises(ValueError, match="from a list"):
        plot_confusion([1, 2])


def test_save_run_figures(run_dir, tmp_path):
    paths = save_run_figures(run_dir)
    assert [p.name for p in paths] == ["history.png", "confusion.png", "recall.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == [
        "config.json", "confusion.png", "history.png", "recall.png"]  # no temp files left
    bare = make_run(tmp_path, "bare", {}, oof=False)
    assert [p.name for p in save_run_figures(bare)] == ["history.png"]
    with pytest.raises(ValueError, match="not a run directory"):
        save_run_figures(tmp_path / "nope")


def test_four_panels_are_the_reports_two_by_two(three_runs):
    fig = compare_runs(three_runs, metrics=("train_acc", "train_loss", "valid_loss", "valid_acc"))
    rows_cols = {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes}
    assert rows_cols == {(2, 2)} and len(fig.axes) == 4
