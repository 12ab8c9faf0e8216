"""Fold-parallel on a CPU: do P processes of T threads train faster than one process of P x T threads?

    python examples/benchmarks/bench_procs.py                        # synthetic data, the `fast` recipe
    python examples/benchmarks/bench_procs.py --data ../shared/data/artworks --reps 3

Each repetition times, one after the other on the same machine, (a) one process using every core's thread and
(b) one single-thread process per core training at the same time (what `train_kfold(budget=...)` spawns on a
CPU). Every process builds fold 0's loaders and learner exactly as train_kfold does (the preset's recipe), trains
one warm-up batch, then --batches timed batches. Printed: training images per second of the machine for each
layout (median over --reps, min..max) and their ratio. Nothing is written except the store cache.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

import artlearn
from artlearn.budget import BatchTimer, cpu_count
from artlearn.cli import add_recipe_flag, given_settings, read_competition, run_cli
from artlearn.recipe import PRESET_NAMES, Recipe

WARMUP = 2


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="competition folder with train.csv (default: built-in synthetic)")
    p.add_argument("--preset", default="fast", choices=PRESET_NAMES)
    p.add_argument("--batches", type=int, default=20, help="timed training batches per process and repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the (a), (b) pair")
    p.add_argument("--procs", type=int, default=cpu_count(), help="processes in layout (b) (default: the cores)")
    add_recipe_flag(p, "size", help="training size (default: the preset's)")
    add_recipe_flag(p, "bs", help="batch size (default: the preset's)")
    args = p.parse_args(argv)
    for name in ("batches", "reps", "procs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: need at least 1")
    return args


def batch_seconds(df, recipe, threads: int, batches: int, barrier=None) -> float:
    """Median seconds per training batch of fold 0 in this process with `threads` torch threads."""
    torch.set_num_threads(threads)
    dls = artlearn.artist_dls(df, fold=0, recipe=recipe)
    if len(dls.train) < WARMUP + batches:
        raise ValueError(f"fold 0 has {len(dls.train)} training batches of {recipe.bs}, fewer than the {WARMUP} "
                         f"warm-up + {batches} timed ones: give a smaller --batches or --bs")
    learn = artlearn.artist_learner(dls, recipe=recipe, seed=0, progress=False)
    if barrier is not None:
        barrier.wait()  # every process starts its batches together
    timer = BatchTimer(WARMUP + batches)
    learn.fit(1, cbs=[timer])
    gaps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    return statistics.median(gaps[WARMUP:])


def _worker(rank, df, recipe, batches, barrier, results):
    """One single-thread process of layout (b)."""
    results.put(batch_seconds(df, recipe, 1, batches, barrier))


def parallel_images_per_s(df, recipe, procs: int, batches: int) -> float:
    """Training images per second of `procs` single-thread processes training together."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.SimpleQueue()
    mp.start_processes(_worker, args=(df, recipe, batches, barrier, results), nprocs=procs, start_method="spawn")
    return sum(recipe.bs / results.get() for _ in range(procs))


def spread(values) -> str:
    """median (min..max)."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}..{max(values):.1f})"


def main(argv=None) -> int:
    """Run the benchmark; a bad input ends with one `error:` line and exit status 2."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    df = read_competition(args.data, test=False, folders=False).train
    recipe = Recipe.preset(args.preset).replace(**given_settings(args, ("size", "bs"))).validate()
    bs = recipe.bs
    one, many = [], []
    for rep in range(args.reps):
        one.append(bs / batch_seconds(df, recipe, args.procs, args.batches))
        many.append(parallel_images_per_s(df, recipe, args.procs, args.batches))
        print(f"rep {rep}: 1 process x {args.procs} threads {one[-1]:.1f} img/s, "
              f"{args.procs} processes x 1 thread {many[-1]:.1f} img/s")
    print(f"preset {args.preset} ({recipe.arch}, {recipe.size} px), {len(df)} images, fold 0 of 4, bs {bs}, "
          f"{args.batches} timed batches, {cpu_count()} cores")
    print(f"1 process x {args.procs} threads : {spread(one)} training images/s")
    print(f"{args.procs} processes x 1 thread : {spread(many)} training images/s")
    print(f"ratio (processes / threads): {statistics.median(m / o for m, o in zip(many, one)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
