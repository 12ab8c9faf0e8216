"""artist_learner: torch optimizer semantics, the reference's defaults, reproducibility, a real ResNet-18 fit, and
the whole fold path on the built-in synthetic dataset (ResNet-18 at 32 px, a few dozen images)."""
import copy
import functools
import inspect
import json
import logging
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorCategory, TensorImage

import artlearn.device as device_module
import artlearn.learner as learner_module
from artlearn.callbacks import (
    EMA,
    CPUAutocast,
    EpochTable,
    HISTORY_COLUMNS,
    CosineAnnealing,
    FoldCheckpoint,
    History,
    LabelSmoothing,
    LogitAdjustment,
    NonFiniteGuard,
    Reproducible,
    cosine_lr,
)
from artlearn.checkpoint import DataMeta, load_fold
from artlearn.dls import ArtistDataLoaders
from artlearn.learner import ArtistLearner, artist_learner

VOCAB = ["Ana", "Bo", "Cy"]


def image_dls(n_train=24, n_valid=12, bs=8, size=32):
    """3 artists, images whose mean depends on the artist: learnable in a few steps."""
    def items(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 3
        x = torch.randn(n, 3, size, size, generator=g) + 0.5 * y[:, None, None, None].float()
        return [(TensorImage(x[i]), TensorCategory(y[i])) for i in range(n)]
    dls = DataLoaders.from_dsets(items(n_train, 0), items(n_valid, 1), bs=bs, device="cpu", num_workers=0)
    dls = ArtistDataLoaders.wrap(dls, DataMeta(size=size, mean=[0.5] * 3, std=[0.25] * 3, vocab=list(VOCAB), fold=0))
    dls.vocab = list(VOCAB)
    return dls


def plain(t):
    return t.detach().as_subclass(torch.Tensor).clone()


class OneStep(Callback):
    """Keeps the first training batch and stops the fit right after its optimizer step."""
    order = 95

    def before_batch(self):
        if self.training:
            self.batch = plain(self.xb[0]), plain(self.yb[0])

    def after_step(self):
        raise CancelFitException()


SGD_NESTEROV = functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("optimizer,wd,torch_opt", [("adam", 0.0, torch.optim.Adam), ("adam", 0.1, torch.optim.Adam),
                                                    ("adamw", 0.1, torch.optim.AdamW), ("sgd", 1e-3, SGD_NESTEROV)])
def test_one_step_equals_plain_torch_optimizer_step(optimizer, wd, torch_opt):
    step = OneStep()
    learn = artist_learner(image_dls(), arch="resnet18", pool="gem", optimizer=optimizer, wd=wd, lr=2e-3,
                           seed=0, progress=False, cbs=step)
    ref = copy.deepcopy(learn.model).to(memory_format=torch.channels_last)  # the layout the learner trains in
    learn.fit(3)
    x, y = step.batch
    ref.train()
    extra = {} if optimizer == "sgd" else dict(betas=(0.9, 0.999), eps=1e-8)
    opt = torch_opt(ref.parameters(), lr=2e-3, weight_decay=wd, **extra)
    F.cross_entropy(ref(x), y, label_smoothing=0.05).backward()
    opt.step()
    ours = learn.model.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert type(learn.opt.opt) is (torch.optim.SGD if optimizer == "sgd" else torch_opt)
    assert learn.opt.opt.defaults["fused"] is True  # one kernel per step, not torch's CPU loop over tensors


def test_fused_maker_falls_back_to_torchs_default_where_fusing_is_refused():
    from artlearn.learner import fused

    class NoFused(torch.optim.SGD):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("no fused kernel here")
            super().__init__(params, **kw)

    params = (p for p in [torch.nn.Parameter(torch.ones(2))])  # a generator: consumed once, reused on fallback
    opt = fused(NoFused)(params, lr=0.1)
    assert type(opt) is NoFused and len(opt.param_groups[0]["params"]) == 1
    assert fused(torch.optim.Adam)([torch.nn.Parameter(torch.ones(2))], lr=0.1).defaults["fused"] is True


def test_defaults_reproduce_the_reference_recipe():
    params = inspect.signature(artist_learner).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == dict(arch=None, pool=None, recipe=None, epochs=None, seed=None, out=None, fold=None,
                            progress=True, channels_last=None, cbs=None, model=None)  # the rest: Recipe()'s
    default = artist_learner(image_dls(), progress=False)
    assert default.model.config["arch"] == "resnet50" and default.model.config["zero_init_residual"] is False
    learn = artist_learner(image_dls(), arch="resnet18", progress=False)
    assert isinstance(learn, Learner) and isinstance(learn, ArtistLearner)
    learn.create_opt()
    group = learn.opt.opt.param_groups[0]
    assert type(learn.opt.opt) is torch.optim.Adam and group["fused"] is True
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)
    types = {type(cb) for cb in learn.cbs}
    assert {LabelSmoothing, CosineAnnealing, History, NonFiniteGuard, Recorder} <= types
    assert not types & {FoldCheckpoint, Reproducible, MixedPrecision, GradientAccumulation, MixUp, EMA}
    assert ChannelsLast in types  # on the CPU too: measured 1.2-1.4x faster there
    assert learn.label_smoothing.eps == 0.05 and learn.cosine_annealing.t_max is None
    assert [m.name for m in learn.metrics] == ["accuracy", "f1_macro"]
    assert learn.model.config["pool"] == "avg" and learn.lr == 1e-3


def test_channels_last_everywhere_unless_turned_off():
    dls = image_dls()
    on = artist_learner(dls, arch="resnet18", progress=False)
    off = artist_learner(dls, arch="resnet18", progress=False, channels_last=False)
    assert ChannelsLast not in {type(cb) for cb in off.cbs}
    on.fit(1)
    conv = on.model.stem[0] if hasattr(on.model, "stem") else next(m for m in on.model.modules()
                                                                    if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(on.recorder.values[-1][0])


def test_compile_compiles_in_place_and_keeps_checkpoint_keys():
    dls = image_dls()
    plain = artist_learner(dls, arch="resnet18", progress=False, seed=3)
    compiled = artist_learner(dls, arch="resnet18", progress=False, seed=3, compile=True)
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())  # no '_orig_mod.' prefix
    with pytest.raises(ValueError, match="compile"):
        artist_learner(dls, arch="resnet18", progress=False, compile="yes")


def test_progress_false_is_quiet_and_metric_names(capsys):
    learn = artist_learner(image_dls(), arch="resnet18", progress=False)
    learn.fit(1)
    assert capsys.readouterr().out == ""
    assert list(learn.recorder.metric_names) == ["epoch", "train_loss", "valid_loss", "accuracy", "f1_macro", "time"]
    loud = artist_learner(image_dls(), arch="resnet18")
    loud.fit(2)
    out = capsys.readouterr().out
    assert "\r" not in out and "\u2588" not in out  # not a terminal: no bars, no carriage-return chains
    header, *rows = out.splitlines()
    assert header.split() == list(HISTORY_COLUMNS) and len(rows) == 2  # one plain line per epoch
    hist = loud.history.frame()
    for line, (_, expected) in zip(rows, hist.iterrows()):  # the console shows history.csv's values
        values = dict(zip(HISTORY_COLUMNS, line.split()))
        assert int(values["epoch"]) == expected["epoch"]
        for name in ("train_loss", "valid_loss", "train_acc", "valid_acc", "f1_macro"):
            assert float(values[name]) == pytest.approx(expected[name], abs=6e-5), name


def test_a_terminal_gets_bars_and_the_same_table(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    learn = artist_learner(image_dls(), arch="resnet18")
    learn.fit(1)
    text = screen.getvalue()
    assert "Epoch 1/1" in text and "\r" in text  # fastai's bars
    lines = [line.split("\r")[-1] for line in text.splitlines()]
    assert lines.count("  ".join(f"{n:>{w}}" for n, w in EpochTable.WIDTHS.items())) == 1
    assert "accuracy" not in text  # fastai's own table (other names, smoothed train_loss) is not printed


def test_no_bar_keeps_the_epoch_table(capsys, monkeypatch):
    from fastprogress import fastprogress
    monkeypatch.setattr(fastprogress, "NO_BAR", True)
    learn = artist_learner(image_dls(), arch="resnet18")
    assert not any(type(cb).__name__ == "ProgressCallback" for cb in learn.cbs)
    learn.fit(1)
    assert len(capsys.readouterr().out.splitlines()) == 2  # header + the epoch


def test_same_seed_same_initialisation_and_first_epoch():
    before = torch.get_rng_state()
    a, b = (artist_learner(image_dls(), arch="resnet18", pool="gem", seed=7, progress=False) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), before)  # seeding the init did not reseed the process
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    a.fit(1)
    b.fit(1)
    cols = ["train_loss", "valid_loss", "train_acc", "valid_acc"]
    pd.testing.assert_frame_equal(a.history.frame()[cols], b.history.frame()[cols], check_exact=True)
    c = artist_learner(image_dls(), arch="resnet18", pool="gem", seed=8, progress=False)
    assert not torch.equal(c.model.conv1.weight, a.model.conv1.weight)


@pytest.mark.parametrize("kw,match", [
    (dict(arch="vgg16"), r"arch='vgg16'.*resnet50"), (dict(pool="max"), r"pool='max'.*'gem'"),
    (dict(optimizer="lion"), r"optimizer='lion'.*'sgd'"), (dict(precision="fp8"), r"precision='fp8'.*'bf16'"),
    (dict(lr=0), "lr=0"), (dict(lr=-1e-3), "lr=-0.001"), (dict(label_smoothing=1.0), r"label_smoothing=1.0.*\[0, 1\)"),
    (dict(label_smoothing=-0.1), "label_smoothing"), (dict(grad_accum=0), "grad_accum=0"),
    (dict(mixup=0.4, cutmix=1.0), "not both"), (dict(ema=1.5), "ema=1.5"), (dict(monitor="top5"), "monitor='top5'"),
    (dict(epochs=0), "epochs=0"), (dict(seed=-1), "seed=-1"), (dict(wd=-1.0), "wd=-1.0")])
def test_bad_arguments_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        artist_learner(image_dls(), **kw)


def test_extras_on_cpu_compose_and_train(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)  # bf16 autocast on any CPU
    dls = image_dls()
    learn = artist_learner(dls, arch="resnet18", pool="gem", precision="bf16", channels_last=True, grad_accum=2,
                           mixup=0.4, ema=0.99, logit_adjust=1.0, progress=False, seed=0)
    types = {type(cb): cb for cb in learn.cbs}
    assert MixedPrecision not in types  # fastai's autocasts CUDA only: CPUAutocast does the CPU's
    assert {ChannelsLast, CPUAutocast, GradientAccumulation, MixUp, EMA, LogitAdjustment} <= set(types)
    assert types[GradientAccumulation].n_acc == 2 * dls.train.bs
    learn.fit(1)
    hist = learn.history.frame()
    assert hist[["train_loss", "valid_loss"]].notna().all().all() and learn.ema.n_updates == 1
    assert CutMix in {type(cb) for cb in artist_learner(dls, arch="resnet18", cutmix=1.0, progress=False).cbs}


def test_cpu_bf16_autocasts_the_forward_pass_only(monkeypatch):
    """precision='bf16' on a CPU with native bf16: the model's layers see bf16 inside the batch, the loss gets float32
    predictions, the weights and gradients stay float32, and autocast is left after every batch; 'auto' and
    'fp32' add no autocast (the CPU's default stays float32)."""
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    dls = image_dls()
    learn = artist_learner(dls, arch="resnet18", precision="bf16", progress=False, seed=0)
    seen = []
    learn.model.fc.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, torch.is_autocast_enabled("cpu"))))
    learn.fit(1)
    assert seen and all(on for _, on in seen) and (torch.bfloat16, True) in seen
    assert not torch.is_autocast_enabled("cpu")
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert learn.history.frame()[["train_loss", "valid_loss"]].notna().all().all()
    for precision in ("auto", "fp32"):
        assert not any(isinstance(cb, CPUAutocast) for cb in
                       artist_learner(dls, arch="resnet18", precision=precision, progress=False).cbs)


def test_cpu_bf16_without_native_support_trains_in_fp32_and_says_so(monkeypatch, caplog):
    """On a CPU without native bf16, precision='bf16' (fast's) trains in fp32, with one log line per process."""
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    learner_module._note_fp32_fallback.cache_clear()  # a fresh process
    dls = image_dls()
    with caplog.at_level(logging.INFO, logger="artlearn"):
        cbs = [artist_learner(dls, arch="resnet18", precision="bf16", progress=False).cbs for _ in range(2)]
    assert not any(isinstance(cb, CPUAutocast) for learner_cbs in cbs for cb in learner_cbs)
    notes = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(notes) == 1 and "runs in fp32" in notes[0]


def test_zero_init_residual_starts_every_block_as_identity():
    """A Recipe setting that reaches torchvision: each residual block's last BatchNorm starts at weight 0."""
    dls = image_dls()
    zeroed = artist_learner(dls, arch="resnet18", zero_init_residual=True, progress=False, seed=0).model
    plain_model = artist_learner(dls, arch="resnet18", progress=False, seed=0).model  # the reference: torchvision's
    last_bns = [blk.bn2 for layer in (zeroed.layer1, zeroed.layer2, zeroed.layer3, zeroed.layer4) for blk in layer]
    assert len(last_bns) == 8 and all(bool((bn.weight == 0).all()) for bn in last_bns)
    assert zeroed.config["zero_init_residual"] is True
    assert bool((plain_model.layer1[0].bn2.weight == 1).all())


# ---------------------------------------------------------------- the built-in synthetic dataset

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic collection (about 80 training works) and its fold-0 loaders at 32 px."""
    from artlearn.dls import artist_dls
    from artlearn.tables import read_artworks
    from artlearn.synthetic import make_synthetic_artworks
    root = make_synthetic_artworks(tmp_path_factory.mktemp("synthetic"), n_train=80, n_test=8)
    with pytest.warns(UserWarning, match="fewer works than n_folds"):
        df = read_artworks(root / "train.csv")
        dls = artist_dls(df, fold=0, size=32, bs=16, workers=0)
    return df, dls


def test_resnet18_gem_three_epochs_training_loss_falls(synthetic):
    _, dls = synthetic
    learn = artist_learner(dls, arch="resnet18", pool="gem", seed=0, progress=False)
    learn.fit(3)
    hist = learn.history.frame()
    print("\n" + hist.to_string())
    assert hist["train_loss"].is_monotonic_decreasing and hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert hist["lr"].tolist() == [cosine_lr(e, 1e-3, 3) for e in range(3)]


def test_fold_training_end_to_end_on_synthetic_data(synthetic, tmp_path):
    _, dls = synthetic
    learn = artist_learner(dls, arch="resnet18", pool="gem", out=tmp_path, fold=0, epochs=2, progress=False, seed=1)
    learn.fit(2)
    folder = tmp_path / "fold0"
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors", "history.csv", "meta.json"]
    hist = pd.read_csv(folder / "history.csv")
    assert list(hist.columns) == list(HISTORY_COLUMNS) and hist["epoch"].tolist() == [0, 1]
    torch_lrs = []
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    for _ in range(2):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert hist["lr"].tolist() == torch_lrs
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] is True and meta["vocab"] == list(dls.vocab) and meta["size"] == 32
    assert meta["mean"] == list(dls.data_meta.mean) and meta["model"]["pool"] == "gem"
    assert meta["score"] == pytest.approx(hist["valid_loss"].min(), rel=1e-12)
    model, _ = load_fold(folder)
    fresh = artist_learner(dls, arch="resnet18", pool="gem", progress=False)
    fresh.model = model
    assert fresh.validate()[0] == pytest.approx(meta["score"], rel=1e-5)


def test_progressive_resize_trains_small_then_full_size(synthetic, tmp_path):
    from fastai.callback.core import Callback

    from artlearn.callbacks import ProgressiveResize
    from artlearn.dls import artist_dls
    df, dls = synthetic
    small = artist_dls(df, fold=0, size=16, bs=16, workers=0, cache=dls.cache)
    sizes = []

    class TrainShapes(Callback):
        def before_batch(self):
            if self.training and self.iter == 0:
                sizes.append(tuple(self.xb[0].shape[-2:]))

    full_train = dls.train
    learn = artist_learner(dls, arch="resnet18", out=tmp_path, fold=0, epochs=3, progress=False, seed=0,
                           cbs=[ProgressiveResize(small.train, 2), TrainShapes()])
    learn.fit(3)
    assert sizes == [(16, 16), (16, 16), (32, 32)]
    assert learn.dls.train is full_train
    assert json.loads((tmp_path / "fold0" / "meta.json").read_text())["size"] == 32
    with pytest.raises(ValueError, match="epochs"):
        ProgressiveResize(small.train, -1)


# ---------------------------------------------------------------- fastai conventions after training


@pytest.mark.parametrize("extra", [{}, {"mixup": 0.4}, {"cutmix": 1.0}])
def test_get_preds_with_loss_and_interpretation_after_training(synthetic, extra):
    from fastai.interpret import ClassificationInterpretation
    _, dls = synthetic
    learn = artist_learner(dls, arch="resnet18", progress=False, seed=0, label_smoothing=0.1, **extra)
    learn.fit(1)
    probs, targets, losses = learn.get_preds(with_loss=True)
    n = len(dls.valid_ds)
    assert probs.shape == (n, len(dls.vocab)) and losses.shape == (n,)  # one loss per item
    expected = F.cross_entropy(probs.log(), targets, reduction="none", label_smoothing=0.1)  # get_preds softmaxes
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-4)
    interp = ClassificationInterpretation.from_learner(learn)
    cm = interp.confusion_matrix()
    assert cm.shape == (len(dls.vocab),) * 2 and cm.sum() == n
    assert isinstance(interp.most_confused(), list)
    top = interp.top_losses(3)
    assert len(top[0]) == 3 and float(top[0][0]) == pytest.approx(float(losses.max()), rel=1e-5)


def test_one_cycle_records_the_lr_it_used(synthetic):
    _, dls = synthetic
    learn = artist_learner(dls, arch="resnet18", progress=False, seed=0)
    learn.fit_one_cycle(2, 2e-3)
    hist, n_batches = learn.history.frame(), len(dls.train)
    assert hist["lr"].tolist() == [learn.recorder.lrs[e * n_batches] for e in range(2)]
    assert hist["lr"].iloc[0] < 2e-3 / 10  # one-cycle starts low: the per-epoch cosine stood aside
    learn.fit(2)  # a plain fit afterwards: the cosine drives again
    assert learn.history.frame()["lr"].tolist() == [cosine_lr(e, 1e-3, 2) for e in range(2)]


def test_export_never_carries_the_image_store_and_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    from artlearn.dls import artist_dls
    from artlearn.synthetic import make_synthetic_artworks
    from artlearn.tables import read_artworks
    root = make_synthetic_artworks(tmp_path / "data", n_artists=4, n_train=80, n_test=4, seed=2)
    df = read_artworks(root / "train.csv")
    sizes = {}
    for n in (20, 80):
        dls = artist_dls(df.iloc[:n], fold=0, n_folds=2, size=32, bs=8)
        learn = artist_learner(dls, arch="resnet18", progress=False, seed=0)
        learn.path = tmp_path
        learn.export(f"export{n}.pkl")
        sizes[n] = (tmp_path / f"export{n}.pkl").stat().st_size
        assert len(dls.cache) == n
    assert abs(sizes[80] - sizes[20]) < 20_000  # 60 more stored images at 37x32x3 would add > 200 kB
    image = str(next((root / "test").iterdir()))
    before = len(dls.cache)
    learn.predict(image)
    assert len(dls.cache) == before  # predicting a new painting does not grow the training store
    code = ("import sys; from fastai.learner import load_learner; "
            f"learn = load_learner({str(tmp_path / 'export80.pkl')!r}); "
            f"print(learn.predict({image!r})[0] in learn.dls.vocab)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("True"), done.stderr[-2000:]


def test_summary_works_without_importing_fastai_vision_all(synthetic):
    _, dls = synthetic
    text = artist_learner(dls, arch="resnet18", progress=False).summary()
    assert "ArtistResNet" in text and "Total params" in text


def test_fold_learner_reproduces_the_recorded_best_valid_loss(synthetic, tmp_path):
    from fastai.interpret import ClassificationInterpretation

    from artlearn.learner import fold_learner
    df, dls = synthetic
    learn = artist_learner(dls, arch="resnet18", out=tmp_path, fold=0, epochs=2, progress=False, seed=3)
    learn.fit(2)
    meta = json.loads((tmp_path / "fold0" / "meta.json").read_text())
    valid = dls.valid_ds.items
    rebuilt = fold_learner(tmp_path / "fold0", items=valid)
    assert rebuilt.validate()[0] == pytest.approx(meta["score"], rel=1e-5)
    assert list(rebuilt.dls.vocab) == meta["vocab"]
    assert ClassificationInterpretation.from_learner(rebuilt).confusion_matrix().sum() == len(valid)
    label, idx, probs = rebuilt.predict(valid["img_path"].iloc[0])
    assert label in meta["vocab"] and probs.shape == (len(meta["vocab"]),)
    with pytest.raises(ValueError, match="pass items="):
        fold_learner(tmp_path / "fold0")  # a fold folder outside a run: no data to build loaders from
    with pytest.raises(ValueError, match="not in this fold's vocabulary"):
        fold_learner(tmp_path / "fold0", items=valid.assign(artist="Nobody"))


# ---------------------------------------------------------------- fastai habits on an artlearn learner


@pytest.fixture(scope="module")
def trained_fold(synthetic, tmp_path_factory):
    """A fold trained 1 epoch into a folder: (fold folder, validation rows)."""
    _, dls = synthetic
    out = tmp_path_factory.mktemp("habits")
    artist_learner(dls, arch="resnet18", out=out, fold=0, epochs=1, progress=False, seed=0).fit(1)
    return out / "fold0", dls.valid_ds.items


def test_predict_takes_what_fastai_vision_learners_take(trained_fold):
    import numpy as np
    from fastai.vision.core import PILImage

    from artlearn.learner import fold_learner
    folder, valid = trained_fold
    learn = fold_learner(folder, items=valid)
    path = valid["img_path"].iloc[0]
    pil = PILImage.create(path)
    array = np.array(pil)
    inputs = {"str": path, "Path": __import__("pathlib").Path(path), "PILImage": pil, "ndarray": array,
              "uint8 tensor": torch.from_numpy(array).permute(2, 0, 1),
              "float tensor": torch.from_numpy(array).permute(2, 0, 1).float() / 255}
    results = {name: learn.predict(item) for name, item in inputs.items()}
    expected = results["str"][2]
    for name, (label, idx, probs) in results.items():
        assert label == learn.dls.vocab[int(idx)] and probs.shape == (len(learn.dls.vocab),), name
        torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-4, msg=name)  # same pixels, same answer
    with pytest.raises(ValueError, match="cannot read ndarray as an image"):
        learn.predict(np.array(["not", "an", "image"]))


def test_learner_load_of_a_fold_checkpoint_points_to_fold_learner(trained_fold):
    from artlearn.learner import fold_learner
    folder, valid = trained_fold
    learn = fold_learner(folder, items=valid)
    with pytest.raises(FileNotFoundError, match=r"artlearn fold checkpoint .*al\.fold_learner\("):
        learn.load(str(folder / "best"))
    with pytest.raises(FileNotFoundError, match="nothing"):  # any other missing file: fastai's own error
        learn.load(str(folder / "nothing"))


@pytest.mark.parametrize("cbs", [[MixUp(0.4)], [MixUp], [CutMix]])
def test_mixup_twice_is_refused_naming_both(synthetic, cbs):
    _, dls = synthetic
    with pytest.raises(ValueError, match=r"mixup=0.4 and cbs=\[(MixUp|CutMix)\(\.\.\.\)\] would mix every batch"):
        artist_learner(dls, arch="resnet18", progress=False, mixup=0.4, cbs=cbs)
    assert artist_learner(dls, arch="resnet18", progress=False, cbs=cbs)  # the callback alone is fine


def test_plot_top_losses_needs_only_import_artlearn(trained_fold):
    import subprocess
    import sys
    folder, valid = trained_fold
    items = folder.parent / "items.csv"
    valid.to_csv(items, index=False)
    code = ("import sys, pandas as pd, artlearn as al\n"
            "from fastai.interpret import ClassificationInterpretation\n"
            f"learn = al.fold_learner({str(folder)!r}, items=pd.read_csv({str(items)!r}, dtype=str))\n"
            "ClassificationInterpretation.from_learner(learn).plot_top_losses(4)\n"
            "import matplotlib.pyplot as plt; print(len(plt.gcf().axes), 'fastai.vision.all' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["4", "False"], done.stdout


def test_the_rare_artist_warning_points_at_the_callers_line(tmp_path):
    """Through train_kfold, the warning names the user's file and line, not artlearn's source (nor echoes it)."""
    import warnings

    import artlearn as al
    root = al.make_synthetic_artworks(tmp_path / "data", n_artists=4, n_train=40, n_test=2, seed=1)
    df = al.read_artworks(root / "train.csv", kind="train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError):
            al.train_kfold(df, root, n_folds=16, arch="resnet18", size=16, epochs=1, bs=2,
                           progress=False)  # folds assigned (warned), then the data folder refused as the run folder
        al.assign_folds(df, 16)
    rare = [w for w in caught if "fewer works than n_folds" in str(w.message)]
    assert len(rare) == 2 and {w.filename for w in rare} == {__file__}
