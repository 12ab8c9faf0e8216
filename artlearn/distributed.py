"""More than one GPU or machine: fold-parallel K-fold and data-parallel (DDP) folds, launched by torchrun.

    torchrun --nproc_per_node 4 examples/run_kfold.py ...          # fold-parallel: each process trains its own folds
    torchrun --nproc_per_node 4 examples/run_kfold.py --ddp ...    # data-parallel: every fold trained by all processes

Built on plain `torch.distributed` (not Hugging Face Accelerate, see docs/distributed.md):

* `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...), initialises the process
  group (NCCL on CUDA, gloo on CPU), selects the GPU `LOCAL_RANK`, and returns a `DistContext`: rank, world size and a
  gloo group with a long timeout used for every wait between ranks (a rank that finished its folds may wait for
  hours for the others, far beyond the 10-30 min default timeouts of NCCL/gloo collectives).
* `train_kfold` (artlearn.kfold) runs the same sequence on one process and under torchrun, through this context:
  rank 0 writes config.json and folds.csv, every rank checks the run directory like a resume, the folds are
  shared out (`DistContext.share`, fold-parallel) or trained together (DDP), and rank 0 writes summary.json.
* `DDPTrainer`: a fastai callback that wraps the model in `DistributedDataParallel` and gives each rank its share of
  every global batch (`ShardedDL`), so `bs` stays the global batch and a run sees the same sequence of batches, the
  same number of steps and the same learning-rate schedule as one process; metrics are gathered across ranks and
  only rank 0 writes checkpoints and history.
"""
import builtins
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import TfmdDL
from fastai.torch_core import apply, to_cpu, to_detach
from fastcore.basics import chunked, noop
from torch.nn.parallel import DistributedDataParallel

from .callbacks import FoldCheckpoint, Reproducible
from .checkpoint import META_NAME
from .run import OOF_NAME, fold_dir, fold_is_complete

logger = logging.getLogger("artlearn")

__all__ = ["DistContext", "init_distributed", "shutdown", "single_process_view", "shard_batches", "ShardedDL",
           "DDPTrainer", "check_global_batch", "WAIT"]

WAIT = timedelta(hours=72)  # how long a rank may wait for the others (a whole fold, at least)
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 seeds its augmentations with seed + r * stride (rank 0 keeps `seed`)


# ---------------------------------------------------------------- the process group


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank, and the gloo group used to wait for the others.

    With one process (no torchrun) every method is a no-op and `enabled` is False.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    group: object = None

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes the run-level files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here (gloo, long timeout: no GPU is kept busy while waiting)."""
        if self.enabled:
            dist.barrier(group=self.group)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (small picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def on_main(self, fn):
        """Run `fn` on rank 0 only, the others waiting; if it fails, every rank raises. Rank 0 gets its result."""
        result, error = _attempt(fn) if self.is_main else (None, None)
        status = self.broadcast(_describe(error))
        if error is not None:
            raise error
        if status is not None:
            raise _remote_error(status, "rank 0")
        return result

    def main_first(self, fn):
        """Run `fn` on rank 0, then on the other ranks (e.g. build a dataset once, then read it everywhere)."""
        result = self.on_main(fn)
        return result if self.is_main else fn()

    def share(self, order: list) -> list:
        """This rank's share of `order`: items r, r + world, ... (everything with one process)."""
        return list(order)[self.rank::self.world_size]

    def check_ddp(self, bs: int, sync_bn) -> None:
        """ValueError unless the global batch divides over the ranks and SyncBatchNorm has CUDA."""
        check_global_batch(bs, self.world_size)
        _check_sync_bn(sync_bn, torch.cuda.is_available())

    @contextmanager
    def tagged_logs(self, logger):
        """Prefix `logger`'s messages with '[rank r/world]' under torchrun (nothing changes with one process)."""
        if not self.enabled:
            yield
            return
        tag = _RankTag(self.rank, self.world_size)
        logger.addFilter(tag)
        try:
            yield
        finally:
            logger.removeFilter(tag)

    def await_files(self, out, folds, timeout: float = 120.0, poll: float = 2.0) -> None:
        """Wait until every fold's files are visible here (a shared filesystem such as NFS may show another
        machine's files a little late); log the ones still missing after `timeout` seconds (no-op alone)."""
        if not self.enabled:
            return
        deadline = time.monotonic() + timeout
        while True:
            missing = [k for k in folds if not _fold_visible(fold_dir(out, k))]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(poll)
        if missing:
            logger.warning(f"folds {missing}: their files are not visible in {out} after {timeout:.0f} s (is the run "
                           "directory on a filesystem every machine shares?); the summary leaves them out")

    def everywhere(self, fn):
        """Run `fn` on every rank; if it fails on any rank, every rank raises (naming the first that failed)."""
        result, error = _attempt(fn)
        errors = self.gather(_describe(error))
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise _remote_error(failed[0][1], f"rank {failed[0][0]}")
        return result


class _RankTag(logging.Filter):
    """Prefixes a log record with the process's rank."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.prefix = f"[rank {rank}/{world}] "

    def filter(self, record) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _fold_visible(folder) -> bool:
    """The rank that owned the fold is done with it: meta.json is there, and oof.csv too once it is complete."""
    return (folder / META_NAME).is_file() and (not fold_is_complete(folder) or (folder / OOF_NAME).is_file())


def _attempt(fn) -> tuple:
    """(result, None) or (None, the exception `fn` raised): collected so that every rank can hear of it."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised by the caller and, described, on the other ranks
        return None, e


def _describe(error):
    """None, or (exception type name, message) to send to the other ranks."""
    return None if error is None else (type(error).__name__, str(error))


def _remote_error(status: tuple, where: str) -> Exception:
    """The exception another rank raised, rebuilt here (same builtin type when possible)."""
    name, message = status
    cls = getattr(builtins, name, None)
    cls = cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError
    return cls(f"{where} failed: {message}")


def _env_int(name: str, default=None):
    """An integer environment variable, or `default`."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def init_distributed(wait: timedelta = WAIT) -> DistContext:
    """The DistContext of this process; under torchrun, initialise the process group first (idempotent).

    Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and a one-process context comes back. Under
    torchrun: the default process group uses NCCL when CUDA is available (after `torch.cuda.set_device(LOCAL_RANK)`),
    gloo otherwise; a separate gloo group with timeout `wait` is created for the waits between ranks.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return DistContext()
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                               "(e.g. torchrun --nproc_per_node 2 examples/run_kfold.py ...)")
        rank = _env_int("RANK")
        if torch.cuda.is_available():
            local_rank, n_gpus = _env_int("LOCAL_RANK", 0), torch.cuda.device_count()
            if local_rank >= n_gpus:
                raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {n_gpus} GPU(s): use "
                                   f"--nproc_per_node {n_gpus} (one process per GPU)")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world <= 1:
        return DistContext()
    group = dist.new_group(backend="gloo", timeout=wait)
    return DistContext(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                       local_world_size=_env_int("LOCAL_WORLD_SIZE", world), group=group)


def shutdown() -> None:
    """Destroy the process group (end of a torchrun script); a no-op with one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def single_process_view(enabled: bool = True):
    """Let fastai see one process while this rank trains a fold on its own (fold-parallel mode).

    fastai decides from the environment (`num_distrib()` reads WORLD_SIZE) whether to all-gather every loss and metric
    across processes; in fold-parallel mode the ranks train different folds, so that would mix folds or hang. WORLD_SIZE
    and RANK read 1 and 0 inside the block and are restored after it.
    """
    if not enabled:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE="1", RANK="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _collective_device() -> torch.device:
    """Where tensors for the default group's collectives live: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------- data: each rank's share of every global batch


def _check_sync_bn(sync_bn, cuda: bool) -> None:
    """ValueError for SyncBatchNorm without CUDA."""
    if sync_bn and not cuda:
        raise ValueError("sync_bn=True needs CUDA: torch's SyncBatchNorm has no CPU implementation; use "
                         "sync_bn=False (each process normalises its own share of the batch)")


def check_global_batch(bs: int, world_size: int) -> int:
    """The per-process batch `bs / world_size`; ValueError unless `bs` (the global batch) divides evenly."""
    if bs % world_size:
        near = sorted({world_size * max(1, bs // world_size), world_size * (bs // world_size + 1)})
        raise ValueError(f"bs={bs} is the global batch, split across {world_size} processes: it must be divisible "
                         f"by {world_size} (e.g. bs={' or '.join(map(str, near))})")
    return bs // world_size


def shard_batches(n_items: int, bs: int, world_size: int, rank: int, drop_last: bool = False) -> tuple[list, list]:
    """Rank `rank`'s share of every global batch of an epoch of `n_items` positions batched by `bs`.

    Returns (positions, sizes): the positions (into the epoch's index list) this rank loads, global batch after
    global batch, and the real size of each global batch. Global batch b is `[b*bs, (b+1)*bs)`; it is cut into
    `world_size` equal consecutive slices, rank r taking slice r, so that concatenating the ranks' slices in rank
    order gives the global batch back. A batch whose size does not divide evenly (the last one, or any with an odd
    `bs`) is padded by repeating its first items; gathered results are cut back to `sizes[b]`.
    """
    n_batches = n_items // bs if drop_last else -(-n_items // bs)
    positions, sizes = [], []
    for b in range(n_batches):
        batch = list(range(b * bs, min((b + 1) * bs, n_items)))
        per_rank = -(-len(batch) // world_size)
        padded = (batch * world_size)[:per_rank * world_size]
        positions += padded[rank * per_rank:(rank + 1) * per_rank]
        sizes.append(len(batch))
    return positions, sizes


class ShardedDL(TfmdDL):
    """Wraps a fastai DataLoader so that this rank loads its slice of each of the loader's (global) batches.

    Modelled on fastai's `DistributedDL`, with three differences: the loader's `bs` stays the global batch and every
    global batch is split across the ranks (fastai gives each rank a contiguous part of the epoch batched by the full
    `bs`), the epoch's order is broadcast from rank 0 on the process group's own device (fastai's needs CUDA, so it
    cannot run with gloo on a CPU), and it does not need Hugging Face Accelerate. `to_detach` gathers predictions
    and targets from every rank and cuts the padding off, so fastai's metrics see the whole batch.
    """

    def __init__(self, dl, rank: int, world_size: int):
        self.dl, self.rank, self.world_size = dl, rank, world_size
        self.global_bs = dl.bs
        self.bs = -(-dl.bs // world_size)
        self.drop_last, self.dataset, self.n = dl.drop_last, dl.dataset, dl.n
        self.num_workers, self.offs, self.pin_memory = dl.num_workers, dl.offs, dl.pin_memory
        self.device = dl.device
        fake = dl.fake_l  # fastai's loader proxy, rebuilt around this loader through its public attribute
        self.fake_l = type(fake)(self, fake.pin_memory, fake.num_workers, fake.timeout,
                                 persistent_workers=fake.persistent_workers, pin_memory_device=fake.pin_memory_device)
        self.sizes, self._next, self._current = [], 0, 0

    @property
    def rng(self):
        """The wrapped loader's shuffling RNG (so `Reproducible` seeds the order rank 0 broadcasts)."""
        return self.dl.rng

    @rng.setter
    def rng(self, value):
        self.dl.rng = value

    def __len__(self) -> int:
        return len(self.dl)

    def randomize(self):
        self.dl.randomize()

    def get_idxs(self):
        """Rank 0's epoch order, then this rank's slice of every global batch."""
        idxs = list(self.dl.get_idxs())
        t = torch.tensor(idxs, dtype=torch.long, device=_collective_device())
        dist.broadcast(t, 0)
        idxs = t.cpu().tolist()
        positions, self.sizes = shard_batches(len(idxs), self.global_bs, self.world_size, self.rank, self.drop_last)
        return [idxs[p] for p in positions]

    def before_iter(self):
        self._next = 0
        self.dl.before_iter()

    def after_batch(self, b):
        self._current, self._next = self._next, self._next + 1
        return self.dl.after_batch(b)

    def after_iter(self):
        self.dl.after_iter()

    def create_batches(self, samps):
        """The wrapped loader's items and collation, chunked by the per-rank batch."""
        dl = self.dl
        if dl.dataset is not None:
            dl.it = iter(dl.dataset)
        items = filter(lambda o: o is not None, map(dl.do_item, samps))
        yield from map(dl.do_batch, chunked(items, self.bs))

    def decode(self, b):
        return self.dl.decode(b)

    def decode_batch(self, b, max_n: int = 9, full: bool = True):
        return self.dl.decode_batch(b, max_n, full)

    def _gather(self, x):
        """All ranks' `x`: per-sample tensors concatenated in batch order without the padding; scalars averaged."""
        if not isinstance(x, torch.Tensor):
            return x
        if x.ndim == 0:
            parts = [torch.empty_like(x[None]) for _ in range(self.world_size)]
            dist.all_gather(parts, x[None].contiguous())
            full = torch.cat(parts)
            return (full if full.is_floating_point() else full.float()).mean()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        full = torch.cat(parts)
        return full[:self.sizes[self._current]] if self._current < len(self.sizes) else full

    def to_detach(self, b, cpu=True, gather=True):
        """fastai's hook for metrics and predictions: detach, gather across ranks, move to the CPU."""
        b = to_detach(b, cpu=False, gather=False)
        if gather:
            b = apply(self._gather, b)
        return to_cpu(b) if cpu else b


# ---------------------------------------------------------------- model: DistributedDataParallel


class _ModelDDP(DistributedDataParallel):
    """DistributedDataParallel that looks like the model it wraps to checkpointing code.

    `state_dict`/`load_state_dict` are the wrapped model's (no 'module.' prefix) and unknown attributes (`config`,
    `forward_features`, ...) come from it, so FoldCheckpoint, EMA and meta.json work unchanged during a DDP fit.
    """

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def _on_cuda(learn) -> bool:
    """True when the learner trains on a GPU."""
    device = getattr(learn.dls, "device", None)
    return torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")


class DDPTrainer(Callback):
    """Data-parallel training of one Learner by every process of a torchrun launch (a no-op with one process).

    - The model is wrapped in `DistributedDataParallel` (gradients averaged across ranks at every step) once every
      other callback has prepared it (device, channels-last, ...), and unwrapped at the end of the fit.
    - Each loader becomes a `ShardedDL`: the loader's `bs` is the global batch, each rank loads `bs / world` of it
      (ValueError unless divisible). Same batches, same number of steps per epoch, same LR schedule as one process.
    - Validation is sharded too; losses, accuracy and the predictions behind macro-F1 are gathered across ranks, and
      the training loss/accuracy of `History` are averaged over ranks, so every rank records the same history.
    - Only rank 0 writes: `FoldCheckpoint` and the progress bar/logger are switched off on the other ranks.
    - A non-finite loss on any rank stops the fit on every rank (`NonFiniteGuard` sees it everywhere).
    - `sync_bn`: convert BatchNorm to `SyncBatchNorm` (statistics over the global batch, as one process computes
      them). Default: on with CUDA; off on CPU, where torch has no SyncBatchNorm (each rank then normalises with its
      own `bs / world` images).
    - Augmentation randomness: rank r > 0 seeds `Reproducible` with `seed + r * 1000003`, so ranks do not draw the
      same crops and flips; rank 0 keeps `seed`, and its shuffling decides the order for everyone.
    """
    order = -30  # before Reproducible (-20) and FoldCheckpoint (-8): their before_fit must see the changes made here

    def __init__(self, sync_bn: bool | None = None):
        self.sync_bn = sync_bn
        self._saved = None

    def before_fit(self):
        """Shard the loaders, switch off rank-0-only callbacks elsewhere, convert BatchNorm if asked."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            self.run = False
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_global_batch(self.dls.train.bs, self.world)
        cuda = _on_cuda(self.learn)
        sync_bn = cuda if self.sync_bn is None else bool(self.sync_bn)
        _check_sync_bn(sync_bn, cuda)
        saved = dict(loaders=list(self.dls.loaders), logger=self.learn.logger, disabled=[], seeds=[], accum=[])
        if self.rank:
            saved["disabled"] = [cb for cb in self.learn.cbs if isinstance(cb, (FoldCheckpoint, ProgressCallback))]
            for cb in saved["disabled"]:
                cb.run = False
            self.learn.logger = noop
            for cb in self.learn.cbs:
                if isinstance(cb, Reproducible):
                    saved["seeds"].append((cb, cb.seed))
                    cb.seed = cb.seed + self.rank * RANK_SEED_STRIDE
        for cb in self.learn.cbs:
            if isinstance(cb, GradientAccumulation):  # it counts samples, and a rank sees 1/world of them
                saved["accum"].append((cb, cb.n_acc))
                cb.n_acc = max(1, cb.n_acc // self.world)
        if sync_bn:
            self.learn.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.learn.model)
        self.learn.dls.loaders = [self._shard(dl) for dl in self.dls.loaders]
        self._saved = saved

    def _shard(self, dl):
        return dl if isinstance(dl, ShardedDL) else ShardedDL(dl, self.rank, self.world)

    def _wrap(self):
        """Wrap the model (after every before_fit: device, channels-last) and the current loader."""
        if not isinstance(self.learn.model, DistributedDataParallel):
            on_gpu = next(self.learn.model.parameters()).is_cuda
            self.learn.model = _ModelDDP(self.learn.model,
                                         device_ids=[torch.cuda.current_device()] if on_gpu else None)
        if getattr(self.learn, "dl", None) is not None:
            self.learn.dl = self._shard(self.learn.dl)

    def before_train(self):
        self._wrap()

    def before_validate(self):
        self._wrap()

    def after_loss(self):
        """Make a non-finite loss on one rank visible on every rank, so that all of them stop together."""
        if not self.training:
            return
        loss = self.learn.loss.detach()
        ok = torch.isfinite(loss).all().to(torch.float32).reshape(1).to(_collective_device())
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1 and bool(torch.isfinite(loss).all()):
            self.learn.loss = torch.full_like(self.learn.loss, float("nan"))

    def after_train(self):
        """Average History's training loss and pool its training accuracy over the ranks."""
        h = getattr(self.learn, "history", None)
        totals = h.epoch_totals() if h is not None else None
        if totals is None:
            return
        t = torch.tensor(totals, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        h.set_epoch_totals(float(t[0]) / self.world, float(t[1]), int(t[2]))

    def after_fit(self):
        """Unwrap the model and put the loaders back (before FoldCheckpoint reloads the best weights)."""
        self._restore(reenable=False)

    def release(self):
        """Undo everything when an exception escapes the fit (called by `ArtistLearner.fit`); idempotent."""
        self._restore(reenable=True)

    def _restore(self, reenable: bool):
        if self._saved is None:
            return
        saved, self._saved = self._saved, None
        if isinstance(self.learn.model, DistributedDataParallel):
            self.learn.model = self.learn.model.module
        self.learn.dls.loaders = saved["loaders"]
        self.learn.logger = saved["logger"]
        for cb, seed in saved["seeds"]:
            cb.seed = seed
        for cb, n_acc in saved["accum"]:
            cb.n_acc = n_acc
        if reenable:  # after a normal fit fastai itself resets `run` once each callback's after_fit was skipped
            for cb in saved["disabled"]:
                cb.run = True
