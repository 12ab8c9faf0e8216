"""Throughput benchmark: is the model, not the input pipeline, the limit?

    python examples/benchmarks/bench.py                                 # synthetic data, ResNet-18, 128 px, CPU
    python examples/benchmarks/bench.py --data ../shared/data/artworks --arch resnet18 --size 128 --bs 32
    python examples/benchmarks/bench.py --data DIR --arch resnet50 --size 288 --bs 64 --precision bf16  # on a GPU
    python examples/benchmarks/bench.py --size 48 --compare-precision --skip torchvision,ensemble,cache  # CPU bf16?

With --epochs N (the headline): N whole training epochs exactly as train_kfold runs them (fold 0 of a 4-fold split:
training + validation, per-epoch start-up included), for each --pipelines entry, against the model-only time for
the same images (forward+backward+step on tensors already on the device for the training batches, forward only
for the validation batches), printed as `epoch ratio: X`; the plain torchvision loop (train + validation epochs,
decoding from disk in a DataLoader) is timed side by side in the same run.

    python examples/benchmarks/bench.py --data ../shared/data/artworks --images 0 --size 64 --epochs 2

Without --epochs it prints, in one process, warm-up excluded, medians over --reps repetitions of --batches batches:
  ceiling     model-only training step on tensors already in memory (images/s)
  artlearn    artist_dls + artist_learner: cached decode, crop, flip/rotate, normalise and the step
  torchvision a plain PyTorch DataLoader (PIL decode, RandomResizedCrop, flip, rotation, Normalize) + the step
  ensemble    ensemble() over k folds x 2 flips against k x 2 bare forward passes on in-memory tensors
and the ratio of each to its ceiling, the presize-cache size for the whole table and peak memory.
"""
import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import artlearn
from artlearn.checkpoint import save_weights
from artlearn.callbacks import ReuseHeap
from artlearn.cli import add_recipe_flag, read_competition, run_cli
from artlearn.device import cpu_has_native_bf16, default_workers, resolve_precision, reused_heap
from artlearn.files import atomic_write_json
from artlearn.learner import fused
from artlearn.recipe import REFERENCE
from artlearn.store import PresizeCache, presize_for, store_presize
from artlearn.models import build_model


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="competition folder with train.csv (default: built-in synthetic)")
    add_recipe_flag(p, "arch", default="resnet18")
    add_recipe_flag(p, "size", default=128)
    add_recipe_flag(p, "bs", default=32)
    p.add_argument("--images", type=int, default=640, help="training images used (stratified subset)")
    p.add_argument("--batches", type=int, default=6, help="batches per repetition")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    p.add_argument("--folds", type=int, default=2, help="folds in the ensemble benchmark")
    p.add_argument("--infer-images", type=int, default=128)
    p.add_argument("--workers", type=int, help="loader workers for both pipelines (default: artlearn's)")
    add_recipe_flag(p, "precision", default=REFERENCE.precision)
    p.add_argument("--skip", default="", help="comma-separated sections to skip: torchvision,ensemble,cache")
    p.add_argument("--epochs", type=int, default=0, help="time N whole epochs (train + valid) per pipeline instead")
    p.add_argument("--pipelines", default="device,items", help="artist_dls pipelines timed by --epochs")
    add_recipe_flag(p, "store", default=REFERENCE.store, help="image store rule (Recipe.store)")
    p.add_argument("--compile", action="store_true", help="also time the model-only ceiling with torch.compile")
    p.add_argument("--compare-precision", action="store_true", help="also time the model-only step in fp32 and in "
                   "bf16 autocast side by side (interleaved repetitions; on the CPU too)")
    p.add_argument("--unfused", action="store_true", help="with --epochs: also time artlearn epochs with torch's "
                   "default (unfused) Adam, to measure what the fused step gives")
    p.add_argument("--default-heap", action="store_true", help="with --epochs: also time artlearn epochs without "
                   "ReuseHeap (glibc's default malloc settings), to measure what reusing freed memory gives")
    p.add_argument("--prefetch", action="store_true", help="with --epochs: also time artlearn epochs with each batch "
                   "built one batch ahead in a background thread (StoreBatchDL prefetch=1)")
    p.add_argument("--phases", action="store_true", help="with --epochs: also split the training batches of the "
                   "fastai loop (ready batches) and of the model-only step into forward/loss/backward/step/rest")
    return p.parse_args(argv)


def device_setup(precision: str):
    """(device, autocast dtype or None, channels_last?) for this machine, as artist_learner resolves `precision`
    (bf16 autocast on the CPU too when asked for)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = resolve_precision(precision, device.type == "cuda")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode), True  # channels-last everywhere


def sync(device):
    """Wait for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype):
    """Autocast context at `dtype` on the device (CUDA or CPU), a no-op for float32."""
    import contextlib
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_step(model, device, dtype, channels_last):
    """One Adam training step with label-smoothed CE, as the recipe trains (torch Adam, fused as artist_learner's)."""
    opt = fused(torch.optim.Adam)(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step(x, y, mark=None):
        mark = mark or (lambda phase: None)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = model(x)
            mark("forward")
            loss = F.cross_entropy(out, y, label_smoothing=0.05)
        mark("loss")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        mark("backward")
        scaler.step(opt)
        scaler.update()
        mark("step")
    return step


PHASES = ("forward", "loss", "backward", "step", "rest of the batch", "between batches")


class PhaseClock:
    """Wall time per named phase: `start()`, then `clock(name)` adds the time since the last mark to `name`
    (GPU work synced at every mark, so a phase's figure is its own: a diagnostic, slower than a free run)."""

    def __init__(self, device):
        self.device, self.last = device, None
        self.reset()

    def reset(self):
        """Zero every phase's total."""
        self.totals = dict.fromkeys(PHASES, 0.0)

    def start(self):
        """Start timing from now."""
        sync(self.device)
        self.last = time.perf_counter()

    def __call__(self, name: str):
        """Charge the time since the last mark to `name`."""
        sync(self.device)
        now = time.perf_counter()
        self.totals[name] += now - self.last
        self.last = now


def fresh_model(args, n_classes, device, channels_last):
    """A from-scratch model on the device."""
    model = build_model(args.arch, n_classes=n_classes).to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def timed_reps(run_batches, args, device) -> list:
    """images/s of --reps repetitions of --batches batches, after one warm-up repetition."""
    rates = []
    for rep in range(args.reps + 1):
        sync(device)
        start = time.perf_counter()
        n = run_batches()
        sync(device)
        if rep:
            rates.append(n / (time.perf_counter() - start))
    return rates


def bench_ceiling(args, n_classes, device, dtype, channels_last) -> float:
    """Model-only training throughput on tensors already on the device."""
    model = fresh_model(args, n_classes, device, channels_last)
    step = make_step(model, device, dtype, channels_last)
    x = torch.randn(args.bs, 3, args.size, args.size, device=device)
    y = torch.randint(0, n_classes, (args.bs,), device=device)

    def run():
        for _ in range(args.batches):
            step(x, y)
        return args.batches * args.bs
    with flushed():
        return statistics.median(timed_reps(run, args, device))


def bench_compile(args, n_classes, device, dtype, channels_last) -> None:
    """Model-only ceiling eager vs `nn.Module.compile()` (as artist_learner(compile=True)), compile time apart."""
    eager = bench_ceiling(args, n_classes, device, dtype, channels_last)
    model = fresh_model(args, n_classes, device, channels_last)
    model.compile()
    step = make_step(model, device, dtype, channels_last)
    x = torch.randn(args.bs, 3, args.size, args.size, device=device)
    y = torch.randint(0, n_classes, (args.bs,), device=device)
    start = time.perf_counter()
    step(x, y)
    sync(device)
    first = time.perf_counter() - start

    def run():
        for _ in range(args.batches):
            step(x, y)
        return args.batches * args.bs
    compiled = statistics.median(timed_reps(run, args, device))
    print(f"compile      : ceiling eager {eager:.1f} images/s, compiled {compiled:.1f} images/s "
          f"(x{compiled / eager:.2f}); first compiled step {first:.1f} s")


def bench_precision(args, n_classes, device, channels_last) -> None:
    """Model-only training step in float32 and in bf16 autocast, repetitions interleaved (a shared machine's load
    falls on both alike), printed with their ratio."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    steps = {name: make_step(fresh_model(args, n_classes, device, channels_last), device, dtype, channels_last)
             for name, dtype in dtypes.items()}
    x = torch.randn(args.bs, 3, args.size, args.size, device=device)
    y = torch.randint(0, n_classes, (args.bs,), device=device)
    rates = {name: [] for name in dtypes}
    with flushed():
        for rep in range(args.reps + 1):
            for name, step in steps.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(args.batches):
                    step(x, y)
                sync(device)
                if rep:
                    rates[name].append(args.batches * args.bs / (time.perf_counter() - start))
    fp32, bf16 = (statistics.median(rates[name]) for name in dtypes)
    native = f"; native bf16: {cpu_has_native_bf16()}" if device.type == "cpu" else ""
    print(f"precision    : model-only step fp32 {fp32:.1f} images/s, bf16 autocast {bf16:.1f} images/s "
          f"(x{bf16 / fp32:.2f}){native}")


def bench_artlearn(args, df, device, cache) -> float:
    """artist_dls + artist_learner training throughput (decoding done once up front, like train_kfold)."""
    from fastai.callback.core import Callback, CancelTrainException, CancelValidException

    class Timed(Callback):
        """Stops each epoch after --batches training batches, skips validation, times the training part."""
        order = 0

        def before_fit(self):
            self.rates = []

        def before_train(self):
            sync(device)
            self.start, self.seen = time.perf_counter(), 0

        def after_batch(self):
            if self.training:
                self.seen += len(self.yb[0])
                if self.iter + 1 >= args.batches:
                    raise CancelTrainException

        def after_train(self):
            sync(device)
            self.rates.append(self.seen / (time.perf_counter() - self.start))

        def after_cancel_train(self):
            self.after_train()

        def before_validate(self):
            raise CancelValidException

    dls = artlearn.artist_dls(df, fold=0, size=args.size, bs=args.bs, cache=cache, workers=args.workers,
                              n_folds=4)
    learn = artlearn.artist_learner(dls, arch=args.arch, progress=False, precision=args.precision)
    timer = Timed()
    learn.fit(args.reps + 1, 1e-3, cbs=[timer])
    return statistics.median(timer.rates[1:])


def bench_torchvision(args, df, n_classes, device, dtype, channels_last, mean, std) -> float:
    """The plain PyTorch + torchvision pipeline a user would write, same augmentation and step."""
    from torchvision import transforms as T
    vocab = {a: i for i, a in enumerate(sorted(df["artist"].unique()))}
    tfm = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.RandomRotation(15), T.ToTensor(),
                     T.Normalize(mean, std)])

    class Paintings(torch.utils.data.Dataset):
        """Decodes each image from disk on every access."""

        def __len__(self):
            return len(df)

        def __getitem__(self, i):
            with Image.open(df["img_path"].iloc[i]) as img:
                return tfm(img.convert("RGB")), vocab[df["artist"].iloc[i]]

    workers = default_workers() if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(Paintings(), batch_size=args.bs, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    model = fresh_model(args, n_classes, device, channels_last)
    step = make_step(model, device, dtype, channels_last)

    def run():
        n = 0
        for i, (x, y) in enumerate(loader):
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            n += len(y)
            if i + 1 >= args.batches:
                break
        return n
    return statistics.median(timed_reps(run, args, device))


@contextlib.contextmanager
def flushed():
    """Denormals flushed to zero and freed memory reused, as artist_learner trains (FlushDenormals, ReuseHeap), so
    the model-only floor is fair."""
    torch.set_flush_denormal(True)
    try:
        with reused_heap():
            yield
    finally:
        torch.set_flush_denormal(False)


def warm_model_step(args, n_classes, device, dtype, channels_last) -> tuple:
    """(model, its training step, a random batch x, y on the device), the step already run once (warm-up)."""
    model = fresh_model(args, n_classes, device, channels_last)
    step = make_step(model, device, dtype, channels_last)
    x = torch.randn(args.bs, 3, args.size, args.size, device=device)
    y = torch.randint(0, n_classes, (args.bs,), device=device)
    step(x, y)
    return model, step, x, y


def model_only_epoch(args, n_train: int, n_valid: int, n_classes, device, dtype, channels_last):
    """A function timing one epoch's model work alone: n_train images of training steps, n_valid of forwards."""
    model, step, x, y = warm_model_step(args, n_classes, device, dtype, channels_last)

    def epoch() -> float:
        with flushed():
            sync(device)
            start = time.perf_counter()
            model.train()
            for _ in range(n_train // args.bs):
                step(x, y)
            model.eval()
            with torch.inference_mode(), autocast(device, dtype):
                for i in range(0, n_valid, args.bs):
                    model(x[:min(args.bs, n_valid - i)])
            sync(device)
            return time.perf_counter() - start
    return epoch


def artlearn_epochs(args, df, cache, pipeline: str, unfused: bool = False, prefetch: int = 0,
                    default_heap: bool = False):
    """(function timing one epoch of artist_learner.fit on fold 0, training images per epoch, validation images);
    `unfused`: with torch's default (unfused) Adam instead of the fused one artist_learner builds; `prefetch`: the
    device loaders build that many batches ahead in a background thread; `default_heap`: without ReuseHeap."""
    from functools import partial
    from fastai.optimizer import OptimWrapper
    dls = artlearn.artist_dls(df, fold=0, size=args.size, bs=args.bs, cache=cache, workers=args.workers, n_folds=4,
                              pipeline=pipeline)
    if prefetch:
        dls.train.prefetch = dls.valid.prefetch = prefetch
    learn = artlearn.artist_learner(dls, arch=args.arch, progress=False, precision=args.precision)
    if unfused:
        learn.opt_func = partial(OptimWrapper, opt=torch.optim.Adam, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if default_heap:
        learn.remove_cb(ReuseHeap)
    learn.fit(1)  # warm-up epoch (allocator, cuDNN autotuning), not timed

    def epoch() -> float:
        start = time.perf_counter()
        learn.fit(1)  # training + validation, with the fit's own start-up, as every epoch of train_kfold
        return time.perf_counter() - start
    return epoch, len(dls.train) * args.bs, len(dls.valid_ds)


def free_batch_learner(args, df, cache, cbs=None):
    """artist_learner on fold 0 whose loaders hand out one ready batch again and again (no pipeline), warmed up."""
    dls = artlearn.artist_dls(df, fold=0, size=args.size, bs=args.bs, cache=cache, n_folds=4)
    train, valid = dls.train.create_batch(list(range(args.bs))), dls.valid.create_batch(list(range(args.bs)))
    dls.train.create_batch = lambda b: (train[0].clone(), train[1])  # this loader instance only
    dls.valid.create_batch = lambda b: (valid[0][:len(b)].clone(), valid[1][:len(b)])
    learn = artlearn.artist_learner(dls, arch=args.arch, progress=False, precision=args.precision, cbs=cbs)
    learn.fit(1)
    return learn


def free_batch_epochs(args, df, cache):
    """A function timing one epoch of the same learner fed ready batches (no pipeline): the fastai loop's own cost."""
    learn = free_batch_learner(args, df, cache)

    def epoch() -> float:
        start = time.perf_counter()
        learn.fit(1)
        return time.perf_counter() - start
    return epoch


def phase_timer(clock: PhaseClock):
    """A fastai callback charging each part of every training batch to `clock` (first at every event)."""
    from fastai.callback.core import Callback

    class PhaseTimer(Callback):
        """forward: before_batch callbacks + model; loss: after_pred callbacks + loss; backward, step: the
        events' own span; rest: after_loss/after_backward callbacks, zero_grad, after_batch callbacks."""
        order = -100

        def before_train(self):
            self.batched = False

        def before_batch(self):
            if self.training:
                if self.batched:
                    clock("between batches")
                else:
                    clock.start()
                self.batched = True

        def _mark(self, name):
            if self.training:
                clock(name)

    for event, name in (("after_pred", "forward"), ("after_loss", "loss"), ("before_backward", "rest of the batch"),
                        ("after_backward", "backward"), ("before_step", "rest of the batch"),
                        ("after_step", "step"), ("after_batch", "rest of the batch")):
        setattr(PhaseTimer, event, lambda self, name=name: self._mark(name))
    return PhaseTimer()


def bench_phases(args, df, cache, n_classes, device, dtype, channels_last) -> None:
    """Where the fastai loop's extra time goes: the training batches of the ready-batch learner and of the
    model-only step, split into phases, --epochs interleaved epochs, medians per phase."""
    loop_clock, model_clock = PhaseClock(device), PhaseClock(device)
    learn = free_batch_learner(args, df, cache, cbs=[phase_timer(loop_clock)])
    n_batches = len(learn.dls.train)
    _, step, x, y = warm_model_step(args, n_classes, device, dtype, channels_last)
    rounds = {"fastai loop": [], "model-only": []}
    for _ in range(args.epochs):
        loop_clock.reset()
        learn.fit(1)
        rounds["fastai loop"].append(loop_clock.totals)
        model_clock.reset()
        with flushed():
            model_clock.start()
            for _ in range(n_batches):
                step(x, y, mark=model_clock)
        rounds["model-only"].append(model_clock.totals)
    med = {who: {k: statistics.median(r[k] for r in runs) for k in PHASES} for who, runs in rounds.items()}
    print(f"phases: {n_batches} training batches per epoch, medians of {args.epochs} interleaved epochs "
          "(synced at every mark)")
    for k in (*PHASES, "total"):
        loop = sum(med["fastai loop"].values()) if k == "total" else med["fastai loop"][k]
        floor = sum(med["model-only"].values()) if k == "total" else med["model-only"][k]
        print(f"  {k:<18}: fastai loop {loop:6.3f} s, model-only {floor:6.3f} s, difference {loop - floor:+.3f} s")


def torchvision_epochs(args, df, n_classes, device, dtype, channels_last, mean, std) -> float:
    """A function timing one epoch of the plain PyTorch + torchvision loop on the same fold (train + validation)."""
    from torchvision import transforms as T
    folds = artlearn.assign_folds(df, 4, seed=42)
    vocab = {a: i for i, a in enumerate(sorted(df["artist"].unique()))}
    train_tfm = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.RandomRotation(15),
                           T.ToTensor(), T.Normalize(mean, std)])
    valid_tfm = T.Compose([T.Resize(args.size), T.CenterCrop(args.size), T.ToTensor(), T.Normalize(mean, std)])

    class Paintings(torch.utils.data.Dataset):
        """Decodes each image from disk on every access."""

        def __init__(self, table, tfm):
            self.table, self.tfm = table.reset_index(drop=True), tfm

        def __len__(self):
            return len(self.table)

        def __getitem__(self, i):
            with Image.open(self.table["img_path"].iloc[i]) as img:
                return self.tfm(img.convert("RGB")), vocab[self.table["artist"].iloc[i]]

    workers = default_workers() if args.workers is None else args.workers
    kw = dict(batch_size=args.bs, num_workers=workers, pin_memory=device.type == "cuda")
    train = torch.utils.data.DataLoader(Paintings(folds[folds["fold"] != 0], train_tfm), shuffle=True,
                                        drop_last=True, **kw)
    valid = torch.utils.data.DataLoader(Paintings(folds[folds["fold"] == 0], valid_tfm), **kw)
    model = fresh_model(args, n_classes, device, channels_last)
    step = make_step(model, device, dtype, channels_last)

    def epoch() -> float:
        start = time.perf_counter()
        model.train()
        for x, y in train:
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        model.eval()
        with torch.inference_mode(), autocast(device, dtype):
            for x, _ in valid:
                model(x.to(device, non_blocking=True))
        sync(device)
        return time.perf_counter() - start
    epoch()  # warm-up (workers, allocator)
    return epoch


def bench_epochs(args, df, cache, n_classes, device, dtype, channels_last, mean, std) -> None:
    """The headline: whole epochs per pipeline against the model-only time for the same images.

    The timings are interleaved (one epoch of each, --epochs rounds) and medians compared, so load from other
    processes on a shared machine hits every contender alike.
    """
    contenders, floors = {}, {}
    for pipeline in filter(None, args.pipelines.split(",")):
        epoch, n_train, n_valid = artlearn_epochs(args, df, cache, pipeline)
        contenders[f"artlearn {pipeline}"] = epoch
        floors[f"artlearn {pipeline}"] = model_only_epoch(args, n_train, n_valid, n_classes, device, dtype,
                                                          channels_last)
    if "artlearn device" in contenders:
        contenders["fastai loop, free batches"] = free_batch_epochs(args, df, cache)
        if args.unfused:
            contenders["artlearn device, unfused Adam"] = artlearn_epochs(args, df, cache, "device", unfused=True)[0]
        if args.default_heap:
            contenders["artlearn device, default heap"] = artlearn_epochs(args, df, cache, "device",
                                                                          default_heap=True)[0]
        if args.prefetch:
            contenders["artlearn device, prefetch"] = artlearn_epochs(args, df, cache, "device", prefetch=1)[0]
    if "torchvision" not in set(args.skip.split(",")):
        contenders["torchvision"] = torchvision_epochs(args, df, n_classes, device, dtype, channels_last, mean, std)
    times = {name: [] for name in [*contenders, *(f"model-only/{k}" for k in floors)]}
    for _ in range(args.epochs):
        for name, epoch in contenders.items():
            times[name].append(epoch())
            if name in floors:
                times[f"model-only/{name}"].append(floors[name]())
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"epoch: fold 0 of 4 ({n_train} train + {n_valid} valid images), medians of {args.epochs} interleaved "
          "epochs")
    for name in floors:
        paired = [floor / t for floor, t in zip(times[f"model-only/{name}"], times[name])]
        print(f"{name:<16}: {med[name]:7.2f} s/epoch, model-only {med['model-only/' + name]:.2f} s: "
              f"epoch ratio: {med['model-only/' + name] / med[name]:.2f}")
        print(f"{'':<16}  per round (model-only / epoch, each pair timed back to back): "
              + " ".join(f"{r:.3f}" for r in paired) + f"; median {statistics.median(paired):.3f}")
    print("epochs (s)      : " + "; ".join(f"{name} " + " ".join(f"{t:.2f}" for t in v) for name, v in times.items()))
    if "fastai loop, free batches" in med and "artlearn device" in med:
        loop, ours = med["fastai loop, free batches"], med["artlearn device"]
        floor = med["model-only/artlearn device"]
        print(f"{'fastai loop':<16}: {loop:7.2f} s/epoch with ready batches: the loop itself costs "
              f"{loop - floor:+.2f} s, "
              f"the device pipeline {ours - loop:+.2f} s per epoch")
    if "artlearn device, unfused Adam" in med:
        slow = med["artlearn device, unfused Adam"]
        print(f"{'unfused Adam':<16}: {slow:7.2f} s/epoch with torch's default Adam; the fused step artist_learner "
              f"uses is {slow / med['artlearn device']:.2f}x as fast per epoch")
    if "artlearn device, default heap" in med:
        slow = med["artlearn device, default heap"]
        print(f"{'default heap':<16}: {slow:7.2f} s/epoch with glibc's default malloc settings; reusing freed memory "
              f"(ReuseHeap) is {slow / med['artlearn device']:.2f}x as fast per epoch")
    if "artlearn device, prefetch" in med:
        ahead = med["artlearn device, prefetch"]
        print(f"{'prefetch thread':<16}: {ahead:7.2f} s/epoch with each batch built one ahead in a background thread; "
              f"model-only / that {med['model-only/artlearn device'] / ahead:.2f}, prefetching saves "
              f"{med['artlearn device'] - ahead:+.2f} s per epoch")
    if args.phases:
        bench_phases(args, df, cache, n_classes, device, dtype, channels_last)
    if "torchvision" in med:
        print(f"{'torchvision':<16}: {med['torchvision']:7.2f} s/epoch; " + ", ".join(
            f"{name} speed / torchvision {med['torchvision'] / med[name]:.2f}" for name in floors))


def write_random_folds(args, n_classes, vocab, mean, std, root: Path) -> list:
    """k fold folders holding from-scratch weights, as train_kfold writes them."""
    dirs = []
    for k in range(args.folds):
        model = build_model(args.arch, n_classes=n_classes)
        d = root / f"fold{k}"
        d.mkdir(parents=True)
        save_weights(d / "best.safetensors", model)
        atomic_write_json(d / "meta.json", dict(model=model.config, arch=args.arch, n_classes=n_classes,
                                                vocab=vocab, size=args.size, mean=mean, std=std, fold=k,
                                                complete=True))
        dirs.append(d)
    return dirs


def bench_ensemble(args, items, n_classes, vocab, mean, std, device, dtype, channels_last) -> tuple:
    """(ensemble cold images/s, ensemble warm-cache images/s, bare k x 2 forward images/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_random_folds(args, n_classes, vocab, mean, std, Path(tmp))
        warm_cache = PresizeCache(presize_for(args.size))

        def cold():
            artlearn.ensemble(dirs, items, bs=args.bs, precision=args.precision)
            return len(items)

        def warm():
            artlearn.ensemble(dirs, items, bs=args.bs, precision=args.precision, cache=warm_cache)
            return len(items)
        cold_rate = statistics.median(timed_reps(cold, args, device))
        warm_rate = statistics.median(timed_reps(warm, args, device))
    models = [fresh_model(args, n_classes, device, channels_last).eval() for _ in range(args.folds)]
    x = torch.randn(len(items), 3, args.size, args.size, device=device)

    def bare():
        with torch.inference_mode(), autocast(device, dtype):
            for start in range(0, len(x), args.bs):
                xb = x[start:start + args.bs]
                xb = xb.contiguous(memory_format=torch.channels_last) if channels_last else xb
                for m in models:
                    m(xb).float().softmax(1)
                    m(xb.flip(3)).float().softmax(1)
        return len(x)
    return cold_rate, warm_rate, statistics.median(timed_reps(bare, args, device))


def load_table(args):
    """(training table subset, full training table, test items: test.csv's, else the training subset)."""
    full, test, _, _, _ = read_competition(args.data, folders=False)
    df = artlearn.stratified_subset(full, args.images, seed=0) if args.images else full
    items = test if test is not None else df
    return df, full, items.iloc[:args.infer_images].reset_index(drop=True)


def filled_store(args, table) -> tuple:
    """(the --store image store of `table`'s images, filled: each decoded once, seconds that took)."""
    cache = PresizeCache(store_presize(args.store, args.size, REFERENCE.min_scale, len(table)))
    start = time.perf_counter()
    cache.fill(table["img_path"])
    return cache, time.perf_counter() - start


def peak_rss_gb() -> float:
    """Peak resident memory of this process (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def gpu_memory(device) -> str:
    """', GPU max allocated X GiB' on CUDA, else ''."""
    return f", GPU max allocated {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device.type == "cuda" else ""


def main(argv=None) -> int:
    """Run every section and print the figures; a bad input ends with one `error:` line and exit status 2."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    device, dtype, channels_last = device_setup(args.precision)
    torch.manual_seed(0)
    df, full, items = load_table(args)
    vocab = sorted(df["artist"].unique())
    n_classes = len(vocab)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), precision {dtype or 'fp32'}, channels_last {channels_last}; "
          f"{args.arch} at {args.size} px, batch {args.bs}, "
          f"{len(df)} training images, {n_classes} artists; medians of {args.reps} reps x {args.batches} batches")
    cache, seconds = filled_store(args, df)
    print(f"decode once  : {len(df)} images in {seconds:.1f} s "
          f"({cache.n_decodes} decodes, {cache.nbytes / 2 ** 20:.0f} MiB cached; store '{args.store}', shorter "
          f"side {cache.presize} px)")
    if args.compile:
        bench_compile(args, n_classes, device, dtype, channels_last)
    if args.compare_precision:
        bench_precision(args, n_classes, device, channels_last)
    mean, std = cache.channel_stats(df["img_path"])
    if args.epochs:
        bench_epochs(args, df, cache, n_classes, device, dtype, channels_last, mean, std)
        print(f"peak memory  : RSS {peak_rss_gb():.2f} GiB{gpu_memory(device)}")
        return 0
    ceiling = bench_ceiling(args, n_classes, device, dtype, channels_last)
    print(f"ceiling      : {ceiling:8.1f} images/s  (model-only training step)")
    ours = bench_artlearn(args, df, device, cache)
    print(f"artlearn     : {ours:8.1f} images/s  ratio to ceiling {ours / ceiling:.2f}")
    if "torchvision" not in skip:
        plain = bench_torchvision(args, df, n_classes, device, dtype, channels_last, mean, std)
        print(f"torchvision  : {plain:8.1f} images/s  ratio to ceiling {plain / ceiling:.2f}; "
              f"artlearn / torchvision {ours / plain:.2f}")
    if "ensemble" not in skip:
        cold, warm, bare = bench_ensemble(args, items, n_classes, vocab, mean, std, device, dtype, channels_last)
        print(f"ensemble     : {cold:8.1f} images/s cold (decode included), {warm:.1f} warm cache; bare "
              f"{args.folds} folds x 2 flips {bare:.1f} images/s; ratio cold {cold / bare:.2f}, warm {warm / bare:.2f}")
    if "cache" not in skip:
        whole, seconds = filled_store(args, full)
        print(f"cache        : whole table {len(full)} images at presize {whole.presize} px -> "
              f"{whole.nbytes / 2 ** 30:.2f} GiB in {whole.mode if whole.mode != 'auto' else 'memory/auto'} "
              f"({seconds:.1f} s)")
    print(f"peak memory  : RSS {peak_rss_gb():.2f} GiB{gpu_memory(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
