"""More than one process on CPU (gloo): fold-parallel and data-parallel (DDP) K-fold launched by torchrun with
2 local processes, each checked against one process doing the same work.

This file is also the data-parallel worker: `torchrun ... tests/test_distributed.py ddp DATA OUT` runs `_ddp_worker`
on every rank.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import artlearn as al
from artlearn.distributed import (
    DistContext,
    check_global_batch,
    init_distributed,
    shard_batches,
    single_process_view,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_kfold.py"
TINY_ARGS = ["--arch", "resnet18", "--size", "32", "--epochs", "1", "--bs", "8", "--n-folds", "2", "--no-progress"]
TINY = dict(n_folds=2, arch="resnet18", size=32, epochs=1, bs=8, progress=False)
# No augmentation: the crop is the whole (or the centre) square, no flip, no rotation, so that one process and two
# processes load exactly the same pixels.
STILL = dict(fold=0, n_folds=2, size=32, bs=8, seed=42, flip=False, max_rotate=0.0, min_scale=1.0, ratio=(1, 1),
             workers=0)


def _torchrun(args, cwd, timeout=300):
    """`torchrun --standalone --nproc_per_node 2 ARGS` (free port picked by torchrun, one thread per process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    started = time.time()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    done.wall = time.time() - started
    return done


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A tiny competition folder: 42 training images of 4 artists (21 per fold), 8 test images."""
    return al.make_synthetic_artworks(tmp_path_factory.mktemp("dist") / "data", n_artists=4, n_train=42, n_test=8,
                                      seed=5)


# ---------------------------------------------------------------- one process: the pieces


@pytest.mark.parametrize("n,bs,world,drop_last", [(21, 8, 2, True), (21, 8, 2, False), (5, 8, 2, False),
                                                  (1, 8, 2, False), (17, 6, 4, False), (9, 3, 2, False)])
def test_shards_rebuild_every_global_batch(n, bs, world, drop_last):
    shards = [shard_batches(n, bs, world, r, drop_last) for r in range(world)]
    sizes = shards[0][1]
    assert all(s[1] == sizes for s in shards)
    assert sizes == [min(bs, n - b * bs) for b in range(len(sizes))]
    assert len(sizes) == (n // bs if drop_last else -(-n // bs))
    assert len({len(p) for p, _ in shards}) == 1  # every rank loads as many items: collectives stay in step
    start = [0] * world
    for b, m in enumerate(sizes):
        per_rank = -(-m // world)
        gathered = []
        for r in range(world):
            gathered += shards[r][0][start[r]:start[r] + per_rank]
            start[r] += per_rank
        assert gathered[:m] == list(range(b * bs, b * bs + m))  # rank order = batch order, padding at the end
        assert set(gathered) == set(range(b * bs, b * bs + m))


def test_global_batch_must_divide():
    assert check_global_batch(32, 4) == 8
    with pytest.raises(ValueError, match="bs=30 is the global batch.*divisible by 4 .*bs=28 or 32"):
        check_global_batch(30, 4)


def test_one_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed()
    assert ctx == DistContext() and not ctx.enabled and ctx.is_main
    assert not torch.distributed.is_initialized()
    assert ctx.on_main(lambda: 3) == 3 and ctx.everywhere(lambda: 4) == 4 and ctx.main_first(lambda: 5) == 5
    assert ctx.broadcast("x") == "x" and ctx.gather("y") == ["y"]
    ctx.barrier()


def test_single_process_view_restores_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    from fastai.torch_core import num_distrib, rank_distrib
    with single_process_view():
        assert num_distrib() == 1 and rank_distrib() == 0
    assert os.environ["WORLD_SIZE"] == "4" and "RANK" not in os.environ


# ---------------------------------------------------------------- fold-parallel: torchrun examples/run_kfold.py


def _tree(path: Path) -> list:
    """Relative paths of every file under `path`."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def sequential_run(tiny_data, tmp_path_factory):
    """examples/run_kfold.py in this process (one thread, as each torchrun process has)."""
    import importlib.util
    out = tmp_path_factory.mktemp("seq") / "run"
    spec = importlib.util.spec_from_file_location("run_kfold_example", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.time()
        assert script.main(["--data", str(tiny_data), "--out", str(out), *TINY_ARGS]) == 0
        wall = time.time() - started
    finally:
        torch.set_num_threads(threads)
    return out, wall


@pytest.fixture(scope="module")
def parallel_run(tiny_data, tmp_path_factory):
    """The same command under torchrun with 2 processes (fold-parallel: no extra flag)."""
    cwd = tmp_path_factory.mktemp("par")
    done = _torchrun([SCRIPT, "--data", tiny_data, "--out", cwd / "run", *TINY_ARGS], cwd)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return cwd / "run", done


def test_fold_parallel_matches_one_process(sequential_run, parallel_run):
    (seq, seq_wall), (par, done) = sequential_run, parallel_run
    print(f"\nsequential: {seq_wall:.1f} s; torchrun 2 processes: {done.wall:.1f} s (with start-up)")
    assert _tree(par) == _tree(seq)  # same files: folds, OOF, summary, submission, figures
    assert (par / "folds.csv").read_bytes() == (seq / "folds.csv").read_bytes()  # same fold assignment
    assert json.loads((par / "config.json").read_text()) == json.loads((seq / "config.json").read_text())
    for k in (0, 1):  # each fold trained exactly once, by the rank that owns it
        lines = [line for line in done.stdout.splitlines() if f"fold {k}: trained in" in line]
        assert len(lines) == 1 and lines[0].startswith(f"[rank {k}/2]"), done.stdout
        seq_meta, par_meta = (json.loads((d / f"fold{k}" / "meta.json").read_text()) for d in (seq, par))
        for key in ("model", "vocab", "size", "mean", "std", "epoch", "complete", "n_folds", "split_seed"):
            assert par_meta[key] == seq_meta[key], key
        seq_w, par_w = (al.load_fold(d / f"fold{k}")[0].state_dict() for d in (seq, par))
        for name, w in seq_w.items():  # same seed, same data, one thread each: the same weights
            torch.testing.assert_close(par_w[name], w, rtol=1e-4, atol=1e-5, msg=name)
        oof_cols = ["id", "img_path", "fold", "artist"]
        pd.testing.assert_frame_equal(pd.read_csv(par / f"fold{k}" / "oof.csv")[oof_cols],
                                      pd.read_csv(seq / f"fold{k}" / "oof.csv")[oof_cols])
    assert "not retrained" not in done.stdout
    assert done.stdout.count("submission:") == 1  # rank 0 alone did the run-level work
    summary = json.loads((par / "summary.json").read_text())
    assert sorted(summary["folds"]) == ["0", "1"] and summary["oof"]["n"] == 42


def test_fold_parallel_resumes_like_one_process(tiny_data, parallel_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(parallel_run[0], run)
    meta_path = run / "fold1" / "meta.json"  # fold 1 was interrupted: its checkpoint is not complete
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, complete=False)))
    fold0 = (run / "fold0" / "best.safetensors").read_bytes()
    done = _torchrun([SCRIPT, "--data", tiny_data, "--out", run, *TINY_ARGS], tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("fold 1: trained in") == 1 and done.stdout.count("fold 0: complete checkpoint") == 1
    assert "[rank 0/2] fold 1: trained in" in done.stdout  # the fold left to train goes to the first free rank
    assert (run / "fold0" / "best.safetensors").read_bytes() == fold0
    assert json.loads(meta_path.read_text())["complete"] is True


# ---------------------------------------------------------------- data-parallel: DDPTrainer and train_kfold(ddp=True)


def _first_step_and_epoch(df, extra_cbs=()):
    """(first-step loss, first batch, weights after that step, batch size seen), then one whole epoch's
    (recorder values, history row), for fold 0 of `df` without augmentation and with BatchNorm frozen."""
    from fastai.callback.core import Callback, CancelFitException

    class FrozenBN(Callback):
        """BatchNorm in eval mode: per-sample arithmetic, the same whether a batch is split or not (torch has no
        CPU SyncBatchNorm)."""
        order = 0

        def before_train(self):
            for m in self.learn.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    class FirstStep(Callback):
        """Record the first training batch and loss (averaged over the ranks), stop after the first step."""
        order = 90

        def after_loss(self):
            loss = self.learn.loss.detach().clone().reshape(1)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(loss)
                loss /= torch.distributed.get_world_size()
            self.loss, self.x, self.y = float(loss), self.learn.xb[0].detach().clone(), self.learn.yb[0].clone()

        def after_step(self):
            raise CancelFitException()

    first = FirstStep()
    dls = al.artist_dls(df, **STILL)
    learn = al.artist_learner(dls, arch="resnet18", seed=0, progress=False, cbs=[FrozenBN(), first, *extra_cbs])
    learn.fit(1, 1e-3)
    weights = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    dls = al.artist_dls(df, **STILL)
    learn = al.artist_learner(dls, arch="resnet18", seed=0, progress=False, cbs=[FrozenBN(), *extra_cbs])
    learn.fit(1, 1e-3)
    values = dict(zip(learn.recorder.metric_names[1:-1], map(float, learn.recorder.values[-1]), strict=True))
    return dict(loss=first.loss, x=torch.as_tensor(first.x), y=torch.as_tensor(first.y), weights=weights,
                values=values, history=learn.history.frame().iloc[0].to_dict())


def _ddp_worker(data: Path, out: Path) -> int:
    """On every rank: the DDP first step and epoch, then train_kfold(ddp=True); each rank saves what it saw."""
    import logging
    import warnings

    from safetensors.torch import save_file

    from artlearn.distributed import DDPTrainer, shutdown
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # artlearn's log lines
    ctx = init_distributed()
    df = al.read_artworks(data / "train.csv", kind="train")
    res = _first_step_and_epoch(df, [DDPTrainer(sync_bn=False)])
    tensors = {f"w.{k}": v.contiguous() for k, v in res["weights"].items()}
    save_file({**tensors, "x": res["x"].contiguous(), "y": res["y"].contiguous()}, out / f"rank{ctx.rank}.safetensors")
    info = dict(loss=res["loss"], values=res["values"], history=res["history"])
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(info))
    al.train_kfold(df, out / "run", ddp=True, **TINY)
    shutdown()
    return 0


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """The data-parallel worker on 2 processes."""
    out = tmp_path_factory.mktemp("ddp")
    done = _torchrun([Path(__file__), "ddp", tiny_data, out], out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, done


@pytest.fixture(scope="module")
def one_process(tiny_data):
    """The same first step and epoch on one process, with the global batch."""
    return _first_step_and_epoch(al.read_artworks(tiny_data / "train.csv", kind="train"))


def test_ddp_first_step_matches_one_process_with_the_global_batch(ddp_run, one_process):
    from safetensors.torch import load_file
    out, _ = ddp_run
    one = one_process
    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the global batch of 8 is split 4 + 4, in order
    assert one["x"].shape[0] == 8 and all(r["x"].shape[0] == 4 for r in ranks)
    torch.testing.assert_close(torch.cat([r["x"] for r in ranks]), one["x"], rtol=0, atol=0)
    assert torch.equal(torch.cat([r["y"] for r in ranks]), one["y"])
    # the same loss and the same weights after the step
    print(f"\nfirst-step loss: one process {one['loss']:.7f}, 2 processes {infos[0]['loss']:.7f}")
    assert infos[0]["loss"] == pytest.approx(one["loss"], rel=1e-5) and infos[1]["loss"] == infos[0]["loss"]
    # Adam's first update is lr * g / (|g| + eps): for the few weights whose gradient is at the eps = 1e-8 noise
    # floor it amplifies the different summation order of the all-reduce, so allow 1% of one step (lr = 1e-3) there
    # and require the rest to agree to 1e-7
    n_total = n_loose = 0
    for name, w in one["weights"].items():
        for r in ranks:
            torch.testing.assert_close(r[f"w.{name}"], w, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(ranks[0][f"w.{name}"], ranks[1][f"w.{name}"]), name  # DDP keeps the ranks identical
        n_total += w.numel()
        n_loose += int(((ranks[0][f"w.{name}"].double() - w.double()).abs() > 1e-7).sum())
    print(f"weights differing by more than 1e-7: {n_loose} of {n_total}")
    assert n_loose <= 1e-5 * n_total


def test_ddp_epoch_metrics_are_gathered(ddp_run, one_process):
    out, _ = ddp_run
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    def same(h):
        return {k: v for k, v in h.items() if k != "seconds"}

    assert infos[0]["values"] == infos[1]["values"] and same(infos[0]["history"]) == same(infos[1]["history"])
    ddp, ref = infos[0], one_process
    # training loss/accuracy: averaged over the ranks' shards = over the global batches
    for key in ("train_loss", "train_acc", "lr"):
        assert ddp["history"][key] == pytest.approx(ref["history"][key], rel=1e-4), key
    # macro-F1 comes from the gathered predictions (padding cut off): as on one process; the per-batch means
    # (valid loss, accuracy) count the one padded image of the odd last batch (21 = 8 + 8 + 5 -> 6): close
    assert ddp["values"]["f1_macro"] == pytest.approx(ref["values"]["f1_macro"], abs=1e-6)
    assert ddp["values"]["valid_loss"] == pytest.approx(ref["values"]["valid_loss"], rel=0.1)
    assert abs(ddp["values"]["accuracy"] - ref["values"]["accuracy"]) <= 1 / 21 + 1e-6


def test_train_kfold_ddp_writes_the_run_once(ddp_run):
    out, done = ddp_run
    run = al.load_run(out / "run")
    assert run.folds == [0, 1] and run.summary["oof"]["n"] == 42
    for k in (0, 1):
        assert len(run.histories[k]) == 1 and run.metas[k]["complete"] is True
        _, meta = al.load_fold(run.fold_dir(k))  # plain keys: the DDP wrapper never reached the checkpoint
        assert meta["fold"] == k
        assert sum(f"[rank {r}/2] fold {k}: trained in" in done.stdout for r in (0, 1)) == 2  # both ranks trained it
    assert "data-parallel: folds [0, 1]" in done.stdout and "4 per process" in done.stdout
    assert not list((out / "run").rglob("*.tmp*"))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "ddp":
        sys.exit(_ddp_worker(Path(sys.argv[2]), Path(sys.argv[3])))
    sys.exit(f"usage: torchrun --nproc_per_node 2 {sys.argv[0]} ddp DATA OUT")
