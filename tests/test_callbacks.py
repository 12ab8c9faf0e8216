"""Callbacks and checkpoints against independent oracles (torch's scheduler and loss, recomputed averages).

A tiny registered architecture keeps every fit to a fraction of a second; the ResNet path is covered in
test_learner.py.
"""
import builtins
import json
import pickle
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorCategory, TensorImage
from safetensors.torch import load_file, save_file
from torch import nn

from artlearn import models
from artlearn.callbacks import (
    HISTORY_COLUMNS,
    CosineAnnealing,
    FlushDenormals,
    FoldCheckpoint,
    History,
    LabelSmoothing,
    NonFiniteLossError,
    Reproducible,
    ReuseHeap,
    cosine_lr,
    data_meta,
)
from artlearn.checkpoint import DataMeta, load_fold, save_weights
from artlearn.dls import ArtistDataLoaders
from artlearn.learner import artist_learner

VOCAB = ["Ana", "Bo", "Cy"]


class TinyNet(nn.Module):
    """A registered stand-in architecture: conv-bn-relu, pool, fc, with a `config` like the real models."""

    def __init__(self, n_classes, pool="avg", width=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, n_classes)
        self._config = dict(arch="tiny", depth=None, n_classes=n_classes, pool=pool, width=width)

    @property
    def config(self):
        return dict(self._config)

    def forward_features(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def forward_head(self, feats):
        return self.fc(feats.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def build_tiny(n_classes, pool="avg", depth=None, drop_path=0.0, zero_init_residual=False, grad_checkpoint=False,
               **kw):
    """TinyNet; the recipe's model settings that every builder takes mean nothing to it."""
    return TinyNet(n_classes, pool, **kw)


@pytest.fixture(autouse=True)
def tiny_arch(monkeypatch):
    """Register 'tiny' for this test only (the registry is how load_fold rebuilds models)."""
    monkeypatch.setitem(models.ARCHITECTURES, "tiny", build_tiny)


def make_items(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None].float()
    return [(TensorImage(x[i]), TensorCategory(y[i])) for i in range(n)]


def tiny_dls(n_train=32, n_valid=12, bs=8, meta=True, **kw):
    dls = DataLoaders.from_dsets(make_items(n_train, 0), make_items(n_valid, 1), bs=bs, device="cpu",
                                 num_workers=0, **kw)
    if meta:
        dls = ArtistDataLoaders.wrap(dls, DataMeta(size=8, mean=[0.1, 0.2, 0.3], std=[1.0, 1.1, 1.2], vocab=list(VOCAB),
                                                   fold=0, n_folds=4, split_seed=42))
    dls.vocab = list(VOCAB)
    return dls


def tiny_learner(dls=None, **kw):
    kw.setdefault("progress", False)
    return artist_learner(dls if dls is not None else tiny_dls(), arch="tiny", **kw)


def plain(t):
    """A detached plain-tensor copy (fastai batches are TensorImage/TensorCategory subclasses)."""
    return t.detach().as_subclass(torch.Tensor).clone()


class Capture(Callback):
    """Records (training, pred, y, loss) at after_loss."""
    order = 90

    def __init__(self):
        self.records = []

    def after_loss(self):
        self.records.append((self.learn.training, plain(self.learn.pred), plain(self.learn.yb[0]),
                             plain(self.learn.loss)))


# ---------------------------------------------------------------- cosine LR

@pytest.mark.parametrize("t_max,eta_min,epochs", [(10, 0.0, 10), (5, 1e-5, 12), (3, 0.0, 9), (1, 0.0, 4),
                                                  (7, 2e-4, 7), (4, 5e-4, 30)])
def test_cosine_lr_is_bit_identical_to_torch(t_max, eta_min, epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    for e in range(epochs):
        assert cosine_lr(e, 3e-3, t_max, eta_min) == opt.param_groups[0]["lr"], e
        opt.step()
        sched.step()


def torch_cosine(base, t_max, eta_min, epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("t_max,eta_min,epochs,lr", [(None, 0.0, 4, 1e-3), (3, 1e-4, 6, 2e-3), (6, 0.0, 6, 5e-4)])
def test_cosine_callback_lr_per_epoch_in_a_fit(t_max, eta_min, epochs, lr):
    learn = tiny_learner(epochs=t_max, eta_min=eta_min)
    learn.fit(epochs, lr=lr)
    expected = torch_cosine(lr, t_max or epochs, eta_min, epochs)
    assert learn.history.frame()["lr"].tolist() == expected
    per_batch = np.array(learn.recorder.lrs).reshape(epochs, -1)  # constant within each epoch
    assert (per_batch == np.array(expected)[:, None]).all()


def test_cosine_warmup_composes_like_torch_sequential_lr():
    w, t_max, epochs, base = 2, 7, 9, 1e-3
    learn = tiny_learner(epochs=t_max, warmup=w, eta_min=1e-5)
    learn.fit(epochs, lr=base)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max - w, eta_min=1e-5)], milestones=[w])
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(learn.history.frame()["lr"], expected, rtol=1e-12)
    assert learn.history.frame()["lr"][w] == base  # the cosine starts at the base LR


def test_cosine_rejects_bad_settings():
    with pytest.raises(ValueError, match="t_max=0"):
        CosineAnnealing(t_max=0)
    with pytest.raises(ValueError, match="warmup=-1"):
        CosineAnnealing(warmup=-1)
    with pytest.raises(ValueError, match="warmup=2 must be shorter than epochs=2"):  # the recipe's rule, at once
        tiny_learner(epochs=2, warmup=2)
    with pytest.raises(ValueError, match="must exceed warmup"):  # t_max = the fit's length, known at the fit
        tiny_learner(warmup=2).fit(2)


# ---------------------------------------------------------------- label smoothing / history

@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
def test_label_smoothing_loss_equals_torch_in_training_and_validation(eps):
    cap = Capture()
    learn = tiny_learner(label_smoothing=eps, cbs=cap)
    installed = learn.loss_func  # installed when the learner is made, kept (fastai's reduction protocol)
    assert isinstance(installed, CrossEntropyLossFlat) and installed.func.label_smoothing == eps
    learn.fit(1)
    assert learn.loss_func is installed
    assert {t for t, *_ in cap.records} == {True, False}
    for _, pred, y, loss in cap.records:
        torch.testing.assert_close(loss, F.cross_entropy(pred, y, label_smoothing=eps), rtol=1e-6, atol=1e-7)
    # validate() reports the same smoothed loss, recomputed here from the model alone
    learn.model.eval()
    with torch.no_grad():
        xs = plain(torch.stack([x for x, _ in learn.dls.valid_ds]))
        ys = plain(torch.stack([y for _, y in learn.dls.valid_ds])).long()
        expected = F.cross_entropy(learn.model(xs), ys, label_smoothing=eps).item()
    assert learn.validate()[0] == pytest.approx(expected, rel=1e-5)
    assert learn.loss_func is installed
    # one loss per item under fastai's loss_not_reduced (get_preds(with_loss=True), interpretation)
    _, _, losses = learn.get_preds(with_loss=True)
    assert losses.shape == (len(learn.dls.valid_ds),)
    assert losses.mean().item() == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_rejects_bad_eps():
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            LabelSmoothing(bad)


def test_history_train_columns_are_plain_means_of_the_batches():
    cap = Capture()
    learn = tiny_learner(cbs=cap)
    learn.fit(2)
    hist = learn.history.frame()
    assert list(hist.columns) == list(HISTORY_COLUMNS) and hist["epoch"].tolist() == [0, 1]
    n_batches = len(learn.dls.train)
    train = [r for r in cap.records if r[0]]
    for e in range(2):
        batch = train[e * n_batches:(e + 1) * n_batches]
        assert hist["train_loss"][e] == pytest.approx(np.mean([float(r[3]) for r in batch]), rel=1e-6)
        correct = sum(int((r[1].argmax(-1) == r[2]).sum()) for r in batch)
        assert hist["train_acc"][e] == pytest.approx(correct / sum(len(r[2]) for r in batch))
    rec = np.array(learn.recorder.values)  # valid_loss, accuracy, f1_macro
    np.testing.assert_allclose(hist[["valid_loss", "valid_acc", "f1_macro"]].to_numpy(), rec[:, 1:4])
    assert (hist["seconds"] > 0).all()


# ---------------------------------------------------------------- fold checkpoint

def read_meta(folder):
    return json.loads((folder / "meta.json").read_text())


def test_fold_checkpoint_files_meta_and_reload(tmp_path):
    learn = tiny_learner(out=tmp_path, fold=2, seed=0)
    learn.fit(4)
    folder = tmp_path / "fold2"
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors", "history.csv", "meta.json"]
    assert not list(tmp_path.rglob("*.tmp"))
    hist = pd.read_csv(folder / "history.csv")
    assert list(hist.columns) == list(HISTORY_COLUMNS) and len(hist) == 4
    pd.testing.assert_frame_equal(hist, learn.history.frame(), check_exact=False, rtol=1e-12)
    meta = read_meta(folder)
    best = int(hist["valid_loss"].idxmin())
    assert meta["epoch"] == best and meta["score"] == pytest.approx(hist["valid_loss"].min(), rel=1e-12)
    assert meta["complete"] is True and meta["epochs_run"] == 4 and "stopped" not in meta
    assert meta["model"] == learn.model.config and meta["arch"] == "tiny" and meta["n_classes"] == 3
    assert meta["vocab"] == VOCAB and meta["size"] == 8 and meta["fold"] == 2 and meta["monitor"] == "valid_loss"
    assert meta["mean"] == [0.1, 0.2, 0.3] and meta["std"] == [1.0, 1.1, 1.2] and meta["artlearn_version"]
    # the learner ends with the best weights, which are the file's
    saved = load_file(folder / "best.safetensors")
    for k, v in learn.model.state_dict().items():
        assert torch.equal(saved[k], v), k
    model, meta2 = load_fold(folder)
    assert not model.training and meta2 == meta
    fresh = tiny_learner(out=None)
    fresh.model = model
    assert fresh.validate()[0] == pytest.approx(meta["score"], rel=1e-5)


@pytest.mark.parametrize("monitor,column", [("valid_acc", "valid_acc"), ("f1_macro", "f1_macro")])
def test_fold_checkpoint_monitors_higher_is_better(tmp_path, monitor, column):
    learn = tiny_learner(out=tmp_path, fold=0, monitor=monitor, seed=1)
    learn.fit(3)
    hist, meta = learn.history.frame(), read_meta(tmp_path / "fold0")
    assert meta["epoch"] == int(hist[column].idxmax()) and meta["score"] == pytest.approx(hist[column].max())
    assert meta["monitor"] == monitor
    with pytest.raises(ValueError, match=r"monitor='top5'.*valid_loss"):
        FoldCheckpoint(tmp_path, 0, monitor="top5")


def test_validate_after_fit_leaves_files_and_history_alone(tmp_path):
    learn = tiny_learner(out=tmp_path, fold=0)
    learn.fit(2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "fold0").iterdir()}
    rows = list(learn.history.rows)
    learn.validate()
    learn.get_preds()
    assert {p.name: p.read_bytes() for p in (tmp_path / "fold0").iterdir()} == before
    assert learn.history.rows == rows


class RaiseAt(Callback):
    """Raises `exc` at before_train of `epoch`."""

    def __init__(self, epoch, exc):
        self.at, self.exc = epoch, exc

    def before_train(self):
        if self.epoch == self.at:
            raise self.exc


def rng_states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def test_interrupted_fit_keeps_best_epoch_and_stays_incomplete(tmp_path):
    learn = tiny_learner(out=tmp_path, fold=1, seed=3, cbs=RaiseAt(2, KeyboardInterrupt()))
    states, loss_func = rng_states(), learn.loss_func
    with pytest.raises(KeyboardInterrupt):
        learn.fit(5)
    after = rng_states()
    assert after[0] == states[0] and after[1] == states[1] and torch.equal(after[2], states[2])
    assert learn.loss_func is loss_func
    folder = tmp_path / "fold1"
    meta, hist = read_meta(folder), pd.read_csv(folder / "history.csv")
    assert meta["complete"] is False and len(hist) == 2 and meta["epoch"] == int(hist["valid_loss"].idxmin())
    model, _ = load_fold(folder)  # the best epoch so far is a valid checkpoint
    saved = load_file(folder / "best.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # a new training fit in the same folder starts over
    tiny_learner(out=tmp_path, fold=1).fit(1)
    assert read_meta(folder)["complete"] is True and len(pd.read_csv(folder / "history.csv")) == 1


def test_non_finite_loss_stops_with_message_and_keeps_best(tmp_path, poison_batch):
    learn = tiny_learner(out=tmp_path, fold=0, cbs=poison_batch(1, 2))
    with pytest.raises(NonFiniteLossError, match=r"^fold 0: .*epoch 1, batch 2 .*Lower the learning rate"):
        learn.fit(3)
    meta = read_meta(tmp_path / "fold0")
    assert meta["stopped"] == "non-finite loss at epoch 1" and meta["complete"] is False and meta["epoch"] == 0
    model, _ = load_fold(tmp_path / "fold0")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in learn.model.state_dict().values() if v.is_floating_point())
    assert len(pd.read_csv(tmp_path / "fold0" / "history.csv")) == 1


def test_non_finite_loss_in_first_batch_saves_no_weights(tmp_path, poison_batch):
    learn = tiny_learner(out=tmp_path, fold=0, cbs=poison_batch(0, 0))
    with pytest.raises(NonFiniteLossError, match="epoch 0, batch 0"):
        learn.fit(2)
    meta = read_meta(tmp_path / "fold0")
    assert meta["stopped"] == "non-finite loss at epoch 0" and meta["epoch"] is None
    assert not (tmp_path / "fold0" / "best.safetensors").exists()


# ---------------------------------------------------------------- load_fold refusals

@pytest.fixture
def fold_dir(tmp_path):
    tiny_learner(out=tmp_path, fold=0).fit(1)
    return tmp_path / "fold0"


def edit_meta(folder, **model):
    meta = read_meta(folder)
    meta["model"].update(model)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_load_fold_unknown_arch(fold_dir):
    edit_meta(fold_dir, arch="resnet9000")
    with pytest.raises(ValueError, match=r"meta.json: unknown architecture 'resnet9000'"):
        load_fold(fold_dir)


def test_load_fold_wrong_shape_names_key_and_shapes(fold_dir):
    edit_meta(fold_dir, n_classes=5)
    meta = json.loads((fold_dir / "meta.json").read_text())
    meta.update(n_classes=5, vocab=[*meta["vocab"], "Dee", "Eve"])  # a consistent meta.json, weights of 3 classes
    (fold_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"best.safetensors: tensor 'fc.weight' has shape \(3, 4\) .*expects \(5, 4\)"):
        load_fold(fold_dir)


def test_load_fold_missing_key(fold_dir):
    state = load_file(fold_dir / "best.safetensors")
    del state["bn.running_var"]
    save_file(state, fold_dir / "best.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'bn.running_var'"):
        load_fold(fold_dir)


def test_load_fold_truncated_file(fold_dir):
    path = fold_dir / "best.safetensors"
    path.write_bytes(path.read_bytes()[:-20])
    message = "is truncated or not a safetensors file: retrain this fold or delete its folder"
    with pytest.raises(ValueError, match=message):
        load_fold(fold_dir)


class Evil:
    """Unpickling this creates a file: the kind of payload a .pth can carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_pickled_weights_are_refused_without_running_them(fold_dir, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Evil(probe)))
    assert probe.exists()  # the payload does work when unpickled...
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"fc.weight": Evil(marker)})
    (fold_dir / "model.pth").write_bytes(payload)
    with pytest.raises(ValueError, match=r"model.pth: refusing to load '.pth' weights.*pickle"):
        load_fold(fold_dir / "model.pth")
    (fold_dir / "best.safetensors").unlink()
    with pytest.raises(ValueError, match="refusing"):  # a folder holding only a .pth
        load_fold(fold_dir)
    (fold_dir / "best.safetensors").write_bytes(payload)  # a pickle under the safetensors name
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_fold(fold_dir)
    assert not marker.exists()  # ...but artlearn never unpickled it


def test_load_fold_without_meta(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_fold(tmp_path)


def test_save_weights_makes_contiguous_cpu_copies(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3).t(), "n": torch.tensor(3)}
    assert not state["w"].is_contiguous()
    save_weights(tmp_path / "w.safetensors", state)
    loaded = load_file(tmp_path / "w.safetensors")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["n"], state["n"])
    assert not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------- reproducibility

def test_reproducible_same_seed_same_run_and_global_rng_untouched():
    learners = [tiny_learner(seed=5), tiny_learner(seed=5), tiny_learner(seed=6)]  # (making loaders draws)
    states = rng_states()
    for learn in learners:
        learn.fit(2)
    after = rng_states()
    assert after[0] == states[0] and after[1] == states[1] and torch.equal(after[2], states[2])
    runs = [learn.history.frame()[["train_loss", "valid_loss", "train_acc"]] for learn in learners[:2]]
    pd.testing.assert_frame_equal(runs[0], runs[1], check_exact=True)
    other = learners[2]
    assert not other.history.frame()["train_loss"].equals(runs[0]["train_loss"])


def test_reproducible_restores_after_cancel_and_error_with_plain_learner():
    dls = tiny_dls()
    rng = dls.train.rng
    learn = Learner(dls, TinyNet(3), loss_func=CrossEntropyLossFlat(),
                    cbs=[Reproducible(1), RaiseAt(1, CancelFitException())])
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    learn.logger = print if False else (lambda *a: None)
    states = rng_states()
    learn.fit(3)  # cancelled at epoch 1: fastai still runs after_fit
    after = rng_states()
    assert after[0] == states[0] and after[1] == states[1] and torch.equal(after[2], states[2])
    assert dls.train.rng is rng
    with pytest.raises(ValueError, match="seed"):
        Reproducible(-1)


def test_reproducible_restores_when_an_error_escapes_the_fit():
    learn = tiny_learner(seed=2, cbs=RaiseAt(1, RuntimeError("boom")))
    states = rng_states()
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(3)
    after = rng_states()
    assert after[0] == states[0] and after[1] == states[1] and torch.equal(after[2], states[2])


# ---------------------------------------------------------------- EMA

class WeightLog(Callback):
    """Logs float copies of the model state at chosen events (runs after EMA's own handlers)."""
    order = 25

    def __init__(self):
        self.start, self.steps, self.validated, self.trained, self.epoch_end = None, [], [], [], []

    def _state(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def before_train(self):
        if self.start is None:
            self.start = self._state()

    def after_step(self):
        self.steps.append(self._state())

    def after_train(self):
        self.trained.append(self._state())

    def before_validate(self):
        self.validated.append(self._state())

    def after_epoch(self):
        self.epoch_end.append(self._state())


def test_ema_shadow_validation_and_checkpoint(tmp_path):
    log = WeightLog()
    learn = tiny_learner(ema=0.9, out=tmp_path, fold=0, cbs=log, lr=1e-2)
    learn.fit(1)
    n_steps = len(learn.dls.train)
    assert len(log.steps) == n_steps == learn.ema.n_updates
    shadow = {k: v.clone() for k, v in log.start.items()}
    for n, state in enumerate(log.steps):
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in state.items():
            shadow[k] = d * shadow[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in shadow.items():
        torch.testing.assert_close(learn.ema.shadow[k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(log.validated[0][k], v, rtol=1e-5, atol=1e-6)  # validated with EMA weights
        assert torch.equal(log.epoch_end[0][k], log.trained[0][k])  # training weights back after validation
    saved = load_file(tmp_path / "fold0" / "best.safetensors")
    for k, v in learn.ema.shadow.items():
        assert torch.equal(saved[k], v.cpu()) and torch.equal(learn.model.state_dict()[k], v)
    assert read_meta(tmp_path / "fold0")["ema"] == 0.9
    assert not torch.equal(shadow["fc.weight"], log.trained[0]["fc.weight"])


# ---------------------------------------------------------------- logit adjustment, data meta

def test_logit_adjustment_shifts_the_training_loss_only():
    dls = tiny_dls(n_train=34)  # labels 0,1,2 repeating: counts 12, 11, 11
    counts = np.bincount([int(y) for _, y in dls.train_ds], minlength=3)
    log_prior = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)

    class Raw(Callback):
        order = 0

        def __init__(self):
            self.raw, self.loss = [], []

        def after_pred(self):
            self.raw.append((self.training, plain(self.pred), plain(self.yb[0])))

        def after_loss(self):
            self.loss.append(plain(self.learn.loss))

    raw = Raw()
    learn = tiny_learner(dls, logit_adjust=2.0, label_smoothing=0.1, cbs=raw)
    learn.fit(1)
    for (training, pred, y), loss in zip(raw.raw, raw.loss):
        logits = pred + 2.0 * log_prior if training else pred
        torch.testing.assert_close(loss, F.cross_entropy(logits, y, label_smoothing=0.1), rtol=1e-6, atol=1e-7)
    assert any(t for t, *_ in raw.raw) and not all(t for t, *_ in raw.raw)


def test_data_meta_falls_back_to_vocab_and_normalize():
    dls = tiny_dls(meta=False, after_batch=[Normalize.from_stats([0.4, 0.5, 0.6], [0.2, 0.25, 0.3], cuda=False)])
    meta = data_meta(dls)
    assert isinstance(meta, DataMeta) and meta.vocab == tuple(VOCAB) and meta.size is None and meta.fold is None
    np.testing.assert_allclose(meta.mean, [0.4, 0.5, 0.6], rtol=1e-6)
    np.testing.assert_allclose(meta.std, [0.2, 0.25, 0.3], rtol=1e-6)
    assert History.order > 50  # after fastai's Recorder, which it reads


def test_lr_find_leaves_history_checkpoint_and_schedule_alone(tmp_path):
    learn = tiny_learner(out=tmp_path / "run", fold=0, ema=0.9)
    learn.path = tmp_path  # lr_find saves fastai's own temporary weights there
    learn.fit(2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "fold0").iterdir()}
    rows = list(learn.history.rows)
    learn.lr_find(start_lr=1e-4, end_lr=1e3, num_it=20, show_plot=False)  # diverges on purpose: no error
    assert learn.history.rows == rows
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "fold0").iterdir()} == before
    learn.fit(1)  # and training afterwards starts a fresh history and checkpoint
    assert len(learn.history.rows) == 1 and read_meta(tmp_path / "run" / "fold0")["epochs_run"] == 1


class ValidateEachEpoch(Callback):
    """A user callback that runs learn.validate() inside the fit, after the recording callbacks."""
    order = 70

    def after_epoch(self):
        if not self.learn.lock.locked():  # validate() itself runs after_epoch: don't recurse
            self.learn.validate()


def test_validate_inside_a_fit_changes_nothing(tmp_path):
    runs = []
    for extra in ([], [ValidateEachEpoch()]):
        learn = tiny_learner(seed=4, ema=0.9, out=tmp_path / str(len(extra)), fold=0, cbs=extra)
        learn.fit(3)
        runs.append((learn.history.frame().drop(columns="seconds"), learn.ema.n_updates,
                     read_meta(tmp_path / str(len(extra)) / "fold0")))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0], check_exact=True)
    assert runs[0][1] == runs[1][1] == 3 * 4
    assert runs[1][2]["complete"] is True and runs[0][2]["score"] == runs[1][2]["score"]


# ---------------------------------------------------------------- FlushDenormals


def _denormal_survives() -> bool:
    """Whether float32 arithmetic keeps a denormal (1e-39 is below float32's smallest normal, 1.18e-38)."""
    return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() != 0.0)


def test_flush_denormals_only_during_a_fit():
    inside = []

    class Spy(Callback):
        def before_batch(self):
            inside.append(_denormal_survives())

    assert _denormal_survives()
    learn = tiny_learner(cbs=Spy())
    assert FlushDenormals in {type(cb) for cb in learn.cbs}
    learn.fit(1)
    assert inside and not any(inside)  # flushed in every training and validation batch
    assert _denormal_survives()  # torch's default again after the fit

    class Boom(Callback):
        def before_batch(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_learner(cbs=Boom()).fit(1)
    assert _denormal_survives()  # also after an exception escaped the fit


# ---------------------------------------------------------------- ReuseHeap


def heap_calls(monkeypatch, cuda=False) -> list:
    """Record every reuse_heap(on) the callback makes (the setting itself is tested in test_device.py)."""
    import artlearn.callbacks as callbacks
    calls = []
    monkeypatch.setattr(callbacks, "reuse_heap", lambda on: calls.append(on) or True)
    monkeypatch.setattr(callbacks, "dls_on_cuda", lambda dls: cuda)
    return calls


def test_reuse_heap_during_a_training_fit_only(monkeypatch):
    calls = heap_calls(monkeypatch)
    seen = []

    class Spy(Callback):
        def before_batch(self):
            seen.append(list(calls))

    learn = tiny_learner(cbs=Spy())
    assert ReuseHeap in {type(cb) for cb in learn.cbs}
    learn.fit(1)
    assert seen and all(c == [True] for c in seen)  # on in every training and validation batch of the fit
    assert calls == [True, False]  # glibc's defaults again after it
    learn.validate()
    learn.get_preds()
    assert calls == [True, False]  # validate/get_preds leave the setting alone


def test_reuse_heap_undone_after_an_error_and_never_on_cuda(monkeypatch):
    calls = heap_calls(monkeypatch)

    class Boom(Callback):
        def before_batch(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_learner(cbs=Boom()).fit(1)
    assert calls == [True, False]
    cuda_calls = heap_calls(monkeypatch, cuda=True)
    tiny_learner().fit(1)
    assert cuda_calls == []  # GPU training keeps the process's malloc settings
