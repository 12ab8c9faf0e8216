"""Stratified K-fold training, fold selection, flip-TTA ensemble and submission.csv, with artlearn's public API.

    python examples/run_kfold.py                                   # CPU demo on the built-in synthetic artworks
    python examples/run_kfold.py --data ../shared/data/artworks    # the reference recipe on a competition folder
    python examples/run_kfold.py --data DIR --preset best --epochs 40 --out runs/best

Rerunning the same command resumes: folds whose checkpoint is complete are not retrained. Every flag, the train and
test tables and every image are checked before anything is written; a problem ends the script with `error: ...` and
exit status 2. `--out` must be a new or empty folder or an artlearn run (never the data folder); `--overwrite`
deletes only the files artlearn wrote there, after those checks.

More than one GPU or machine (torchrun starts one process per GPU; see docs/distributed.md):

    torchrun --nproc_per_node 4 examples/run_kfold.py --data DIR          # fold-parallel: each process its own folds
    torchrun --nproc_per_node 4 examples/run_kfold.py --data DIR --ddp    # data-parallel: each fold on all 4 GPUs
"""
import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import artlearn
import artlearn.budget
import artlearn.distributed
import artlearn.kfold
from artlearn.recipe import PRESET_NAMES, Recipe, field_type
from artlearn.tables import bad_images_message

STARTED = time.time()  # --budget counts the script's wall time from here (artlearn loads torch lazily, later)

SELECT_RULES = {"complete": "complete", "stable": "stable", "auto": "stable"}  # --select names -> select_folds rule
DEMO = dict(arch="resnet18", size=64, epochs=8, bs=32, lr=2e-3)  # CPU-sized demo on the synthetic data
SYNTHETIC_DIR = Path("data") / "synthetic"


def _optional(kind):
    """An argparse type accepting 'none' for a setting that may be None."""
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Recipe field (`--min-scale` for `min_scale`), typed and documented from it; default: preset."""
    group = p.add_argument_group("recipe (default: the preset's value)")
    for f in dataclasses.fields(Recipe):
        kind, optional = field_type(f.name)
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} [{f.metadata['stage']}; reference: {f.default}]"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        choices = f.metadata["choices"]
        kind = _optional(kind) if optional else kind
        group.add_argument(flag, dest=f.name, type=kind, default=None, help=text, choices=choices)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags: the run's own, then one per recipe setting."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with train.csv (+ test.csv), or artist sub-folders; "
                   "default: the built-in synthetic dataset (built once into data/synthetic)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<data>-<preset>-<arch>-<size>)")
    p.add_argument("--preset", default="reference", choices=list(PRESET_NAMES))
    p.add_argument("--n-folds", type=int, default=4)
    p.add_argument("--folds", help="comma-separated folds to train (default: all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--select", default="complete", help="folds to ensemble: 'complete' (every complete fold; it won "
                   "issue 16's held-out study), 'stable' (the report's stability rule; 'auto' is its old name) or "
                   "comma-separated folds")
    p.add_argument("--prior-adjust", type=float, default=0.0,
                   help="post-hoc logit adjustment tau at prediction (0: off)")
    p.add_argument("--workers", type=int, help="data-loader workers (default: 0 on CPU, up to 8 on GPU)")
    p.add_argument("--limit", type=int, help="train on a stratified subset of N images (smoke runs)")
    p.add_argument("--resume", action="store_true", help="require an existing run directory and continue it")
    p.add_argument("--budget", help="wall time for the whole run, e.g. 15min, 60min, 2h: the epochs are planned "
                   "to fit it on this machine (training, ensemble and submission)")
    p.add_argument("--procs", type=int, help="processes training folds side by side on the CPU (default: one per "
                   "core with --budget, else 1)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing artlearn run in --out first (only "
                   "the files artlearn wrote; after every check passed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--ddp", action="store_true", help="under torchrun: train each fold with every process "
                   "(DistributedDataParallel; --bs is the global batch); default under torchrun: each process "
                   "trains its own folds")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="with --ddp: SyncBatchNorm, statistics over the global batch (default: on with CUDA, "
                   "off on CPU)")
    add_recipe_flags(p)
    return p.parse_args(argv)


def _csv_list(text, flag: str = "--folds"):
    """'0,1,2' -> [0, 1, 2]; None or 'auto' -> None; anything else is a ValueError naming the flag."""
    if text in (None, "auto"):
        return None
    parts = [t.strip() for t in text.split(",")]
    if not [t for t in parts if t] or not all(t.isdigit() for t in parts if t):
        rules = " (or 'complete' / 'stable')" if flag == "--select" else ""
        raise ValueError(f"{flag} {text!r}: need comma-separated fold numbers such as 0,2{rules}")
    return sorted({int(t) for t in parts if t})


def check_args(args) -> None:
    """ValueError naming the first flag that cannot work, before any data is read or built."""
    if args.n_folds < 2:
        raise ValueError(f"--n-folds {args.n_folds}: need at least 2 folds")
    for flag, text in (("--folds", args.folds), ("--select", args.select)):
        chosen = [] if flag == "--select" and text in SELECT_RULES else _csv_list(text, flag) or []
        if any(k >= args.n_folds for k in chosen):
            raise ValueError(f"{flag} {text!r}: with --n-folds {args.n_folds} use folds 0..{args.n_folds - 1}")
    if not 0 <= args.seed < 2 ** 32:
        raise ValueError(f"--seed {args.seed}: need an integer in 0..{2 ** 32 - 1}")
    if args.limit is not None and args.limit < args.n_folds:
        raise ValueError(f"--limit {args.limit}: need at least --n-folds ({args.n_folds}) images")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: need 0 or more")
    if not (math.isfinite(args.prior_adjust) and args.prior_adjust >= 0):
        raise ValueError(f"--prior-adjust {args.prior_adjust}: need a finite number >= 0 (0: off)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    artlearn.budget.parse_budget(args.budget)  # ValueError for a duration it cannot read
    if args.procs is not None and args.procs < 1:
        raise ValueError(f"--procs {args.procs}: need 1 or more")
    if args.data is not None and not args.data.exists():
        raise ValueError(f"--data {args.data}: no such folder or file")


def load_test(base: Path, decode: bool = True):
    """The test table next to train.csv (None when there is none): ids required, every image decoded once."""
    if not (base / "test.csv").is_file():
        return None
    test = artlearn.read_artworks(base / "test.csv", kind="test")
    if "id" not in test.columns:
        raise ValueError(f"{base / 'test.csv'}: no 'id' column (columns are {list(test.columns)}); the submission "
                         "needs id,img_path")
    if not decode:
        return test
    report = artlearn.check_images(test)
    bad = report[~report["ok"]]
    if len(bad):
        raise ValueError(bad_images_message(bad, base / "test.csv") + "; fix or remove them before "
                         "training (the submission needs every test image)")
    return test


def load_data(args, say=print, decode: bool = True):
    """(train table, test table or None, test solution or None, data name); `decode`: check the test images."""
    if args.data is None:
        root = artlearn.make_synthetic_artworks(SYNTHETIC_DIR)
        say(f"data: built-in synthetic artworks in {root}")
    else:
        root = args.data
    if root.is_dir() and not (root / "train.csv").is_file():
        return artlearn.read_artworks(root), None, None, root.name
    train = artlearn.read_artworks(root / "train.csv" if root.is_dir() else root, kind="train")
    base = root if root.is_dir() else root.parent
    solution = base / "test_solution.csv"
    return train, load_test(base, decode), (solution if solution.is_file() else None), base.name


def settings_from(args) -> dict:
    """Recipe overrides from the flags given (an absent flag keeps the preset's value, e.g. best's multicrop tta;
    the synthetic demo has its own sizes)."""
    chosen = {name: getattr(args, name) for name in Recipe.names()}
    if args.data is None:
        chosen = {k: (v if v is not None else DEMO.get(k)) for k, v in chosen.items()}
    return {k: v for k, v in chosen.items() if v is not None}  # train_kfold reads tta=None as "no TTA"


def print_table(run, selection, baseline) -> None:
    """Per-fold best scores, OOF scores, the selection and why."""
    best = run.best
    print("\nfold  best_epoch  valid_loss  valid_acc  f1_macro  status")
    nan = float("nan")
    for k, r in best.iterrows():
        print(f"{k:>4}  {r['epoch']:>10}  {r.get('valid_loss', nan):>10.4f}  {r.get('valid_acc', nan):>9.4f}"
              f"  {r.get('f1_macro', nan):>8.4f}  {r['status']}")
    oof = run.oof_scores
    if oof:
        print(f"out-of-fold ({oof['n']} images, folds {oof['folds']}): accuracy {oof['accuracy']:.4f}, "
              f"macro-F1 {oof['f1_macro']:.4f}")
    print(f"majority-class baseline ({baseline['artist']}): accuracy {baseline['accuracy']:.4f}, "
          f"macro-F1 {baseline['f1_macro']:.4f}")
    print(f"ensemble folds: {selection.folds}  ({selection.rule})")
    for k, why in selection.excluded.items():
        print(f"  fold {k} left out: {why}")


def _budget_left(budget):
    """The seconds of --budget still left for train_kfold (the script's own start-up already spent), or None."""
    seconds = artlearn.budget.parse_budget(budget)
    return None if seconds is None else max(1.0, seconds - (time.time() - STARTED))


def score_submission(sub_path, solution_path) -> None:
    """Accuracy/macro-F1 of a submission against known labels (synthetic data only)."""
    import pandas as pd
    from sklearn.metrics import accuracy_score, f1_score
    sub, sol = (pd.read_csv(p, dtype=str, keep_default_na=False) for p in (sub_path, solution_path))
    merged = sol.merge(sub, on="id", suffixes=("_true", "_pred"))
    acc = accuracy_score(merged["artist_true"], merged["artist_pred"])
    f1 = f1_score(merged["artist_true"], merged["artist_pred"], average="macro", zero_division=0)
    print(f"synthetic test set ({len(merged)} images, labels known): accuracy {acc:.4f}, macro-F1 {f1:.4f}")


def main(argv=None) -> int:
    """Run the whole workflow and print where every output went (under torchrun: on every process)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        check_args(args)
        dist = artlearn.distributed.init_distributed()  # torchrun: joins the other processes; one process: nothing
        try:
            return _main(args, dist)
        finally:
            artlearn.distributed.shutdown()
    except (ValueError, FileNotFoundError) as e:  # every refusal names the problem and the fix: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args, dist) -> int:
    """The workflow; rank 0 prints, reads and checks the data and does everything after training."""
    started = time.time()
    say = print if dist.is_main else (lambda *a, **k: None)
    chosen = settings_from(args)
    recipe = Recipe.preset(args.preset).replace(**chosen).validate()
    train, test, solution, data_name = dist.main_first(lambda: load_data(args, say, decode=dist.is_main))
    if args.limit:
        train = artlearn.stratified_subset(train, args.limit, seed=args.seed)
        say(f"--limit {args.limit}: stratified subset of {len(train)} images, {train['artist'].nunique()} artists")
    out = args.out or Path("runs") / f"{data_name}-{args.preset}-{recipe.arch}-{recipe.size}"
    if args.resume and not (out / "config.json").is_file():
        print(f"--resume: {out} has no run to resume", file=sys.stderr)
        return 2
    settings = " ".join(f"{k}={v}" for k, v in recipe.as_dict().items())
    say(f"run directory: {out}\nrecipe: preset={args.preset} {settings}")
    if dist.enabled:
        mode = "data-parallel (--ddp)" if args.ddp else "fold-parallel"
        say(f"torchrun: {dist.world_size} processes, {mode}")
    elif args.ddp:
        say("--ddp: not launched by torchrun (WORLD_SIZE unset), so one process trains every fold")
    protect = [p for p in (args.data, solution) if p is not None] + (list(test["img_path"]) if test is not None else [])
    run = artlearn.train_kfold(train, out, n_folds=args.n_folds, folds=_csv_list(args.folds), preset=args.preset,
                               seed=args.seed, workers=args.workers, progress=not args.no_progress,
                               ddp=args.ddp, sync_bn=args.sync_bn, overwrite=args.overwrite, protect=protect,
                               budget=_budget_left(args.budget), predict_after=len(test) if test is not None else 0,
                               procs=args.procs, **chosen)
    if not dist.is_main:
        return 0  # rank 0 selects the folds, ensembles, writes the submission and the figures
    rule = SELECT_RULES.get(args.select, "complete")
    hand_picked = None if args.select in SELECT_RULES else _csv_list(args.select, "--select")
    if hand_picked is not None or rule != "complete":  # summary.json holds the default rule; record this choice
        run = artlearn.kfold.finish_run(out, select=hand_picked if hand_picked is not None else rule)
    selection = artlearn.select_folds(run, folds=hand_picked, rule=rule)
    print_table(run, selection, run.summary["majority_baseline"])
    if test is not None:
        probs, vocab = artlearn.ensemble(run, test, folds=selection.folds, tta=recipe.tta,
                                         workers=args.workers, prior_adjust=args.prior_adjust)
        sub = artlearn.write_submission(test["id"], probs, vocab, out / "submission.csv")
        print(f"submission: {sub} ({len(test)} ids, folds {selection.folds}, tta={recipe.tta})")
        if solution is not None:
            score_submission(sub, solution)
    for fig in artlearn.plots.save_run_figures(out):
        print(f"figure: {fig}")
    artlearn.kfold.record_wall_time(out, time.time() - started)
    print(f"summary: {out / 'summary.json'}\nwall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
