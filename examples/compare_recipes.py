"""Honest recipe comparison: same data, same folds, same epoch budget, out-of-fold scores only.

Protocol (CPU, 2 cores, about an hour): ../shared/data/artworks, a stratified subset (--limit), ResNet-18 at
128 px, the same --epochs for every recipe, the folds listed in --folds of a stratified 4-fold split (seed 42).
Every recipe is trained with train_kfold into its own run directory under --out (rerunning resumes), and scored on
the out-of-fold predictions of the folds it trained (flip-TTA, as the ensemble predicts). The test set is never
used. Rows: 'reference' (the report's recipe), 'best', and 'reference + one option of best' for each option, so each
option's contribution shows on its own.

    python examples/compare_recipes.py --data ../shared/data/artworks --limit 1500 --epochs 12 --folds 0,1
    python examples/compare_recipes.py --data DIR --arch resnet50 --size 288 --epochs 30 --folds 0,1,2,3  # GPU
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

import artlearn
from artlearn.recipe import BEST, REFERENCE

# Options of 'best' that are switched on one at a time on top of 'reference' (keys changed together).
OPTION_GROUPS = {
    "adamw": ("optimizer", "wd"),
    "warmup": ("warmup",),
    "label_smoothing": ("label_smoothing",),
    "min_scale": ("min_scale",),
    "sampler": ("sampler",),
    "logit_adjust": ("logit_adjust",),
    "ema": ("ema",),
    "mixup": ("mixup",),
    "cutmix": ("cutmix",),
}


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/artworks"))
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--limit", type=int, default=1500, help="stratified subset of the training table (0: all)")
    p.add_argument("--folds", default="0,1", help="folds of the 4-fold split to train for every recipe")
    p.add_argument("--recipes", default="all", help="comma-separated: reference,best,+adamw,... (default: all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int)
    return p.parse_args(argv)


# Options tried on top of 'reference' that 'best' does not use (their rows show why).
CANDIDATES = {"+sqrt_sampler": {"sampler": "sqrt"}, "+ema": {"ema": 0.998}, "+mixup": {"mixup": 0.4}}


def recipes() -> dict:
    """name -> (preset, overrides): reference, best, reference plus each option group of best, candidates."""
    out = {"reference": ("reference", {}), "best": ("best", {})}
    for name, keys in OPTION_GROUPS.items():
        if any(getattr(BEST, k) != getattr(REFERENCE, k) for k in keys):
            out[f"+{name}"] = ("reference", {k: getattr(BEST, k) for k in keys})
    out.update({name: ("reference", overrides) for name, overrides in CANDIDATES.items()})
    return out


def run_recipe(name, preset, overrides, df, args) -> dict:
    """Train one recipe on the shared folds; its OOF scores and per-fold macro-F1."""
    start = time.time()
    run = artlearn.train_kfold(df, args.out / name.replace("+", "plus_"), n_folds=4,
                               folds=[int(f) for f in args.folds.split(",")], preset=preset, arch=args.arch,
                               size=args.size, epochs=args.epochs, bs=args.bs, seed=args.seed, workers=args.workers,
                               progress=False, log=lambda *a: None, **overrides)
    per_fold = []
    for k in run.folds:
        fold = run.oof[run.oof["fold"] == k]
        per_fold.append(artlearn.run.oof_scores(fold)["f1_macro"])
    return dict(recipe=name, **{k: v for k, v in run.oof_scores.items() if k in ("accuracy", "f1_macro", "n")},
                f1_folds=per_fold, minutes=(time.time() - start) / 60,
                changes=", ".join(f"{k}={v}" for k, v in overrides.items()) or preset)


def print_table(rows, baseline) -> None:
    """Markdown table: OOF accuracy, OOF macro-F1, per-fold macro-F1 mean and spread, change vs reference."""
    ref = next((r for r in rows if r["recipe"] == "reference"), None)
    print("\n| recipe | settings | OOF accuracy | OOF macro-F1 | fold macro-F1 mean ± std | Δ macro-F1 vs reference |"
          " minutes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        delta = f"{100 * (r['f1_macro'] - ref['f1_macro']):+.1f} pts" if ref else ""
        folds = np.array(r["f1_folds"])
        print(f"| {r['recipe']} | {r['changes']} | {r['accuracy']:.4f} | {r['f1_macro']:.4f} | "
              f"{folds.mean():.4f} ± {folds.std():.4f} | {delta} | {r['minutes']:.1f} |")
    print(f"| majority class | always {baseline['artist']} | {baseline['accuracy']:.4f} | "
          f"{baseline['f1_macro']:.4f} | | | |")


def main(argv=None):
    """Train every recipe and print the comparison table."""
    args = parse_args(argv)
    df = artlearn.read_artworks(args.data / "train.csv", kind="train")
    if args.limit:
        df = artlearn.stratified_subset(df, args.limit, seed=0)
    chosen = recipes()
    if args.recipes != "all":
        names = args.recipes.split(",")
        unknown = [n for n in names if n not in chosen]
        if unknown:
            raise SystemExit(f"unknown recipe(s) {unknown}; choose from {list(chosen)}")
        chosen = {n: chosen[n] for n in names}
    print(f"protocol: {len(df)} images, {df['artist'].nunique()} artists, {args.arch} at {args.size} px, "
          f"{args.epochs} epochs, batch {args.bs}, folds {args.folds} of 4 (seed {args.seed}), OOF scores, flip-TTA")
    rows = []
    for name, (preset, overrides) in chosen.items():
        rows.append(run_recipe(name, preset, overrides, df, args))
        r = rows[-1]
        print(f"{name:>16}: OOF accuracy {r['accuracy']:.4f}  macro-F1 {r['f1_macro']:.4f}  ({r['minutes']:.1f} min)",
              flush=True)
    baseline = artlearn.run.majority_baseline(df)
    print_table(rows, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(dict(rows=rows, baseline=baseline, args=vars(args)),
                                                         default=str, indent=1))


if __name__ == "__main__":
    main()
