"""train_kfold run directories, resuming, refusing mixed configurations, OOF scores and select_folds."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

import artlearn as al
from conftest import quiet_train_kfold
import artlearn.kfold as kfold_module
from artlearn.checkpoint import FoldMeta
from artlearn.kfold import KFoldRun, select_folds

TINY = dict(n_folds=2, arch="resnet18", size=32, epochs=1, bs=8, progress=False)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A tiny synthetic training table."""
    root = al.make_synthetic_artworks(tmp_path_factory.mktemp("kf") / "data", n_artists=4, n_train=40, n_test=8,
                                      seed=5)
    return al.read_artworks(root / "train.csv", kind="train")


def _train(df, out, **kw):
    """train_kfold on TINY settings, quietly, collecting its log lines."""
    return quiet_train_kfold(df, out, TINY, **kw)


def _record_fits(monkeypatch, fail_on=None):
    """Record which folds _fit_fold trains; raise KeyboardInterrupt mid-fit on fold `fail_on`."""
    trained, real_fit = [], kfold_module._fit_fold

    def fit(learn, epochs, fold):
        trained.append(fold)
        if fold == fail_on:
            learn.fit(1, cbs=[_InterruptAfterBatches(2)])
        real_fit(learn, epochs, fold)

    monkeypatch.setattr(kfold_module, "_fit_fold", fit)
    return trained


class _InterruptAfterBatches(__import__("fastai.callback.core", fromlist=["Callback"]).Callback):
    """Simulates Ctrl-C in the middle of an epoch."""

    def __init__(self, n):
        self.n = n

    def after_batch(self):
        if self.training and self.iter + 1 >= self.n:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def finished(table, tmp_path_factory):
    """A finished 2-fold run."""
    out = tmp_path_factory.mktemp("run") / "r"
    run, lines = _train(table, out)
    return run, lines


def test_run_directory_has_every_file(finished):
    run, _ = finished
    for name in ("config.json", "folds.csv", "summary.json", "oof.csv"):
        assert (run.path / name).is_file(), name
    for k in (0, 1):
        for name in ("best.safetensors", "meta.json", "history.csv", "oof.csv"):
            assert (run.fold_dir(k) / name).is_file(), f"fold{k}/{name}"
    config = json.loads((run.path / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["size"] == 32 and config["seed"] == 42
    assert config["label_smoothing"] == 0.05 and config["optimizer"] == "adam"
    assert not list(run.path.rglob("*.tmp*"))


def test_run_object(finished, table):
    run, _ = finished
    assert run.folds == [0, 1]
    assert set(run.histories) == {0, 1} and all(len(h) == 1 for h in run.histories.values())
    assert list(run.best.index) == [0, 1] and (run.best["status"] == "complete").all()
    assert run.vocab == sorted(table["artist"].unique())


def test_oof_covers_every_row_once_and_scores_match_sklearn(finished, table):
    run, _ = finished
    oof, folds = run.oof, pd.read_csv(run.path / "folds.csv")
    pd.testing.assert_frame_equal(pd.read_csv(run.path / "oof.csv"), oof)
    assert sorted(oof["img_path"]) == sorted(table["img_path"])
    merged = oof.merge(folds, on="img_path", suffixes=("", "_assigned"))
    assert (merged["fold"] == merged["fold_assigned"]).all()
    probs = oof[[f"p_{a}" for a in run.vocab]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (np.array(run.vocab)[probs.argmax(1)] == oof["pred"]).all()
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["oof"]["accuracy"] == pytest.approx(accuracy_score(oof["artist"], oof["pred"]))
    assert summary["oof"]["f1_macro"] == pytest.approx(f1_score(oof["artist"], oof["pred"], average="macro"))
    top_share = table["artist"].value_counts(normalize=True).iloc[0]
    assert summary["majority_baseline"]["accuracy"] == pytest.approx(top_share)
    assert summary["selection"]["folds"]


def test_rerun_trains_nothing(finished, table, monkeypatch):
    run, _ = finished
    trained = _record_fits(monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in run.path.rglob("best.safetensors")}
    _, lines = _train(table, run.path)
    assert trained == []
    assert sum("not retrained" in line for line in lines) == 2
    assert before == {p: p.stat().st_mtime_ns for p in run.path.rglob("best.safetensors")}


def test_interrupted_fold_is_retrained_alone(table, tmp_path, monkeypatch):
    trained = _record_fits(monkeypatch, fail_on=1)
    with pytest.raises(KeyboardInterrupt):
        _train(table, tmp_path / "r", epochs=2)
    assert trained == [0, 1]
    assert json.loads((tmp_path / "r" / "fold0" / "meta.json").read_text())["complete"] is True
    fold1 = tmp_path / "r" / "fold1" / "meta.json"
    assert not fold1.exists() or json.loads(fold1.read_text())["complete"] is False
    fold0_weights = (tmp_path / "r" / "fold0" / "best.safetensors").read_bytes()
    trained.clear()
    monkeypatch.undo()
    trained = _record_fits(monkeypatch)
    run, _ = _train(table, tmp_path / "r", epochs=2)
    assert trained == [1]
    assert run.folds == [0, 1]
    assert (tmp_path / "r" / "fold0" / "best.safetensors").read_bytes() == fold0_weights


def test_other_configuration_or_data_is_refused(finished, table):
    run, _ = finished
    with pytest.raises(ValueError, match="epochs: 1 in the run dir, 3 now"):
        _train(table, run.path, epochs=3)
    with pytest.raises(ValueError, match="different configuration.*data"):
        _train(table.iloc[:-4], run.path)


def test_tta_is_a_recipe_setting_and_old_spelling_resumes(finished, table, tmp_path, monkeypatch):
    run, _ = finished
    assert json.loads((run.path / "config.json").read_text())["tta"] == "flip"
    with pytest.raises(ValueError, match="tta: 'flip' in the run dir, 'multicrop' now"):
        _train(table, run.path, tta="multicrop")
    out = tmp_path / "no-tta"
    _train(table, out, folds=[0], tta=None)
    config = json.loads((out / "config.json").read_text())
    assert config["tta"] == "none"  # tta=None: no TTA (not "the preset's")
    config["tta"] = None  # how runs written before tta was a Recipe setting spell it
    (out / "config.json").write_text(json.dumps(config))
    trained = _record_fits(monkeypatch)
    _train(table, out, folds=[0], tta=None)
    assert trained == []  # same configuration: resumed, nothing retrained


def test_run_written_before_a_setting_existed_resumes(finished, table, monkeypatch):
    """A config.json without zero_init_residual (runs before it was a Recipe setting) meant False: it resumes."""
    run, _ = finished
    config = json.loads((run.path / "config.json").read_text())
    assert config.pop("zero_init_residual") is False
    (run.path / "config.json").write_text(json.dumps(config))
    trained = _record_fits(monkeypatch)
    _train(table, run.path)
    assert trained == []
    with pytest.raises(ValueError, match="zero_init_residual: False in the run dir, True now"):
        _train(table, run.path, zero_init_residual=True)


def test_bad_arguments(table, tmp_path):
    with pytest.raises(ValueError, match="folds \\[7\\] out of range"):
        _train(table, tmp_path / "a", folds=[7])
    with pytest.raises(ValueError, match="preset"):
        _train(table, tmp_path / "b", preset="fastest")
    with pytest.raises(ValueError, match="unknown setting"):
        _train(table, tmp_path / "c", colour="blue")
    with pytest.raises(ValueError, match="larger than the table"):
        _train(table, tmp_path / "d", n_folds=len(table) + 1)


def _history(losses, acc):
    """A fake history with the given valid losses and a constant best accuracy."""
    n = len(losses)
    return pd.DataFrame(dict(epoch=range(n), train_loss=np.linspace(3, 1, n), valid_loss=losses,
                             train_acc=0.5, valid_acc=acc, f1_macro=acc, lr=1e-3, seconds=1.0))


def _fake_run(tmp_path, histories, statuses=None):
    """A KFoldRun from histories, best epoch = lowest valid loss."""
    metas = {}
    for k, h in histories.items():
        meta = dict(complete=True, epoch=int(h["valid_loss"].idxmin()), monitor="valid_loss", vocab=["a", "b"])
        meta.update((statuses or {}).get(k, {}))
        metas[k] = FoldMeta(model=dict(arch="tiny", n_classes=2), **meta)
    return KFoldRun(path=tmp_path, config={}, histories=histories, metas=metas)


SMOOTH = [2.0, 1.6, 1.3, 1.1, 1.0, 0.95, 0.92, 0.90, 0.89, 0.88]
SPIKY = [2.0, 1.6, 1.3, 1.1, 1.0, 1.6, 0.9, 1.7, 0.95, 1.5]


def test_select_folds_drops_the_unstable_fold_and_says_why(tmp_path):
    run = _fake_run(tmp_path, {0: _history(SMOOTH, 0.62), 1: _history(SMOOTH, 0.63), 2: _history(SMOOTH, 0.62),
                               3: _history(SPIKY, 0.62)})
    assert select_folds(run).folds == [0, 1, 2, 3]  # default: every complete fold (issue 16's held-out study)
    assert select_folds(run).rule == "every complete fold" and not select_folds(run).excluded
    selection = select_folds(run, rule="stable")  # the report's rule
    assert selection.folds == [0, 1, 2]
    assert list(selection.excluded) == [3] and "unstable valid loss" in selection.excluded[3]
    assert json.loads(json.dumps(selection.as_dict()))["excluded"]["3"].startswith("unstable")


def test_select_folds_drops_a_fold_far_below_the_others(tmp_path):
    run = _fake_run(tmp_path, {0: _history(SMOOTH, 0.62), 1: _history(SMOOTH, 0.50), 2: _history(SMOOTH, 0.63)})
    selection = select_folds(run, max_gap=0.05, rule="stable")
    assert selection.folds == [0, 2] and "below the median" in selection.excluded[1]
    assert select_folds(run, max_gap=0.2, rule="stable").folds == [0, 1, 2]
    with pytest.raises(ValueError, match="rule='best'"):
        select_folds(run, rule="best")


def test_select_folds_excludes_stopped_folds_and_honours_hand_choice(tmp_path):
    run = _fake_run(tmp_path, {0: _history(SMOOTH, 0.6), 1: _history(SMOOTH, 0.6)},
                    statuses={1: dict(complete=False, stopped="non-finite loss at epoch 3")})
    selection = select_folds(run)
    assert selection.folds == [0] and "non-finite" in selection.excluded[1]
    assert select_folds(run, folds=[0]).rule == "folds named by hand"
    with pytest.raises(ValueError, match="no complete checkpoint"):
        select_folds(run, folds=[1])


def test_best_preset_options_train_through_train_kfold(table, tmp_path):
    run, _ = _train(table, tmp_path / "best", preset="best", epochs=3, progressive=0.34, sampler="sqrt",
                    grad_checkpoint=True, optimizer="adamw", wd=0.05, warmup=1, logit_adjust=1.0)
    config = json.loads((run.path / "config.json").read_text())
    assert config["preset"] == "best" and config["optimizer"] == "adamw" and config["logit_adjust"] == 1.0
    assert config["min_scale"] == 0.35 and config["tta"] == "multicrop"  # best's own settings
    assert config["progressive"] == 0.34 and config["sampler"] == "sqrt"
    assert run.folds == [0, 1] and all(len(h) == 3 for h in run.histories.values())
    assert all(m["size"] == 32 and m["model"]["grad_checkpoint"] for m in run.metas.values())
    with pytest.raises(ValueError, match="progressive"):
        _train(table, tmp_path / "bad", progressive=1.5)
    assert not (tmp_path / "bad").exists()
