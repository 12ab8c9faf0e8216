"""Train an artist classifier with stratified K-fold, ensemble the folds, write submission.csv.

  python examples/run_kfold.py                     demo on built-in synthetic paintings
  python examples/run_kfold.py --data DIR          train.csv (+ test.csv), or a folder per artist
  python examples/run_kfold.py --data DIR --preset best

Rerun the same command to resume: finished folds are kept. Everything is checked
before anything is written; a problem ends with `error: ...` (exit status 2).
Defaults shown are those of the chosen --preset (without --data: of the demo).
Several GPUs: torchrun --nproc_per_node N examples/run_kfold.py ... (docs/distributed.md)
"""
import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import artlearn  # light: its modules (torch, fastai) load on first use, after the flags parse
from artlearn.cli import (add_recipe_flags, fold_list, fold_selection, given_settings, read_competition, run_cli,
                          shown, submission_scores)
from artlearn.recipe import PRESET_NAMES, Recipe

STARTED = time.time()  # --budget counts the script's wall time from here (artlearn loads torch lazily, later)

DEMO = dict(arch="resnet18", size=64, epochs=8, bs=32)  # CPU-sized demo on the synthetic data (the preset's lr)
PRESET_HELP = {"reference": "the course project's recipe (ResNet-50, 288 px, 30 epochs: a GPU recipe)",
               "best": "reference with the measured improvements (crop scale, half the lr, multicrop views)",
               "fast": "a CPU recipe (ResNet-18, 64 px); with --budget its epochs fit the time"}
SHORT_HELP = {  # the CLI's shorter text for settings whose Recipe help is long
    "pipeline": "device (batches cut from the image store) or items (fastai's per-item pipeline)",
    "store": "stored image size: crop (the smallest crop still sharp), presize (1.15 x size) or full",
    "zero_init_residual": "ResNets: start every residual block as the identity",
    "drop_path": "stochastic depth: largest per-block drop probability (none: the architecture's own)",
    "compile": "torch.compile the model (the first batches pay the compile time)",
    "tta": "test-time views: flip, multicrop (+ five crops) or none",
}


def effective_defaults(preset: str, demo: bool) -> Recipe:
    """The settings a run gets without flags: the preset's, with the demo's sizes when there is no --data."""
    recipe = Recipe.preset(preset if preset in PRESET_NAMES else "reference")
    return recipe.replace(**DEMO) if demo else recipe


def _formatter(prog):
    """Help with the description as written and the flags' text from column 26."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=26)


def _first_pass(argv) -> argparse.Namespace:
    """--preset and --data alone, so that --help can show the defaults of what will run."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="reference")
    pre.add_argument("--data")
    return pre.parse_known_args(argv)[0]


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags: the run's own, then one per recipe setting, grouped by stage."""
    return build_parser(argv).parse_args(argv)


def flag_names(argv=()) -> list:
    """Every flag of the command line (its first spelling; --help left out)."""
    return [a.option_strings[0] for a in build_parser(list(argv))._actions if a.option_strings and a.dest != "help"]


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser, its recipe defaults those of the --preset (and --data) in `argv`."""
    first = _first_pass(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(usage="%(prog)s [--data DIR] [--preset NAME] [--budget TIME] [options]",
                                description=__doc__, formatter_class=_formatter)
    run = p.add_argument_group("run")
    run.add_argument("--data", type=Path, metavar="DIR", help="train.csv (+ test.csv), or one sub-folder per "
                     "artist [default: synthetic paintings, built once into data/synthetic]")
    run.add_argument("--out", type=Path, metavar="DIR", help="run folder [default: runs/<data>-<preset>, plus "
                     "the settings you changed]")
    presets = "; ".join(f"{name}: {PRESET_HELP.get(name, 'see Recipe.preset')}" for name in PRESET_NAMES)
    run.add_argument("--preset", default="reference", choices=list(PRESET_NAMES), metavar="NAME",
                     help=f"{presets} [default: reference]")
    run.add_argument("--budget", metavar="TIME", help="wall time for the whole run, e.g. 60min or 2h: the epochs "
                     "are planned to fit it")
    run.add_argument("--procs", type=int, metavar="N", help="processes training folds side by side on the CPU "
                     "[default: one per core with --budget, else 1]")
    run.add_argument("--limit", type=int, metavar="N", help="train on a stratified subset of N images")
    run.add_argument("--resume", action="store_true", help="only continue an existing run")
    run.add_argument("--overwrite", action="store_true", help="delete the run in --out first (only artlearn's files)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (the per-epoch table stays)")
    run.add_argument("--workers", type=int, metavar="N", help="data-loader workers [default: 0 on CPU, up to 8 on GPU]")
    folds = p.add_argument_group("folds and ensemble")
    folds.add_argument("--n-folds", type=int, default=4, metavar="K", help="number of folds [default: 4]")
    folds.add_argument("--folds", metavar="LIST", help="folds to train, e.g. 0,2 [default: all]")
    folds.add_argument("--seed", type=int, default=42, help="seed of the folds and the training [default: 42]")
    folds.add_argument("--select", default="complete", metavar="RULE", help="folds to ensemble: complete (every "
                       "finished fold), stable (leave out unstable folds) or a list [default: complete]")
    folds.add_argument("--prior-adjust", type=float, default=0.0, metavar="TAU",
                       help="logit adjustment at prediction, towards rare artists [default: 0, off]")
    add_recipe_flags(p, effective_defaults(first.preset, first.data is None), SHORT_HELP)
    gpus = p.add_argument_group("several GPUs (under torchrun)")
    gpus.add_argument("--ddp", action="store_true", help="train each fold on every GPU (--bs is the global batch) "
                      "[default: each GPU trains its own folds]")
    gpus.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                      help="with --ddp: BatchNorm statistics over the global batch [default: on with CUDA]")
    return p


def check_args(args) -> None:
    """ValueError naming the first flag that cannot work, before any data is read or built."""
    fold_list(args.folds, "--folds", args.n_folds)
    fold_selection(args.select, args.n_folds)
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


def settings_from(args) -> dict:
    """Recipe overrides from the flags given (an absent flag keeps the preset's value, e.g. best's multicrop tta;
    the synthetic demo has its own sizes)."""
    return {**(DEMO if args.data is None else {}), **given_settings(args)}  # train_kfold reads tta=None as "no TTA"


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


def default_out(args, data_name: str) -> Path:
    """runs/<data>-<preset>, plus every setting given on the command line: other settings, another folder."""
    given = list(given_settings(args).items())
    given += [(flag, getattr(args, flag)) for flag, default in (("n_folds", 4), ("seed", 42), ("limit", None))
              if getattr(args, flag) != default]
    parts = [data_name if args.data is not None else "demo", args.preset]
    parts += [f"{name.replace('_', '-')}{shown(value)}" for name, value in given]
    return Path("runs") / "-".join(str(part).replace("/", "_") for part in parts)


def next_free(out: Path) -> Path:
    """`out`, or the first of out-2, out-3, ... that does not exist yet."""
    n = 2
    while (out.parent / f"{out.name}-{n}").exists():
        n += 1
    return out.parent / f"{out.name}-{n}"


def interrupted_at(out: Path) -> str:
    """Where a run stopped, from its files: 'in fold 2, epoch 5' (epochs count from 0, as in the table and
    history.csv: the partial fold's finished rows)."""
    partial = []
    for folder in out.glob("fold[0-9]*"):
        meta = folder / "meta.json"
        try:
            done = meta.is_file() and json.loads(meta.read_text()).get("complete")
        except (OSError, ValueError):
            done = False
        if not done and folder.name[4:].isdigit():
            history = folder / "history.csv"
            rows = max(0, len(history.read_text().splitlines()) - 1) if history.is_file() else 0
            partial.append((folder.stat().st_mtime, int(folder.name[4:]), rows))
    if not partial:
        return "before a fold started training" if not (out / "summary.json").is_file() else "after training"
    _, fold, rows = max(partial)
    return f"in fold {fold}, epoch {rows}"


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, `warning: ...` (Python's default also prints the library's source line)."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    """Run the whole workflow and print where every output went (under torchrun: on every process)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    from fastprogress import fastprogress
    saved = warnings.showwarning, fastprogress.NO_BAR
    warnings.showwarning = show_warning
    fastprogress.NO_BAR = saved[1] or args.no_progress  # no bars; the learner still prints its per-epoch table
    try:
        return _run(args)
    finally:  # main() called in a process that goes on (tests, notebooks) leaves these as they were
        warnings.showwarning, fastprogress.NO_BAR = saved


def _run(args) -> int:
    """The checks and the workflow; a refusal is one `error:` line (2, `run_cli`), Ctrl-C one `interrupted` line
    (130)."""
    try:
        return run_cli(_checked_run, args)  # every refusal names the problem and the fix: no traceback
    except KeyboardInterrupt:
        where = interrupted_at(RUN_DIR[0]) if RUN_DIR else "before training"
        print(f"interrupted {where}; rerun the same command to resume", file=sys.stderr)
        return 130


def _checked_run(args) -> int:
    """check_args, then the workflow in the distributed context (torchrun: joins the others; one process: nothing)."""
    check_args(args)
    dist = artlearn.distributed.init_distributed()
    try:
        return _main(args, dist)
    finally:
        artlearn.distributed.shutdown()


RUN_DIR = []  # the run folder once known, for the Ctrl-C message


def _main(args, dist) -> int:
    """The workflow; rank 0 prints, reads and checks the data and does everything after training."""
    started = time.time()
    say = print if dist.is_main else (lambda *a, **k: None)
    chosen = settings_from(args)
    recipe = Recipe.preset(args.preset).replace(**chosen).validate()
    train, test, solution, data_name, _ = dist.main_first(
        lambda: read_competition(args.data, decode=dist.is_main, say=say))
    if args.limit:
        train = artlearn.stratified_subset(train, args.limit, seed=args.seed)
        say(f"--limit {args.limit}: stratified subset of {len(train)} images, {train['artist'].nunique()} artists")
    out = args.out or default_out(args, data_name)
    RUN_DIR[:] = [out]
    if args.resume and not (out / "config.json").is_file():
        raise ValueError(f"--resume: {out} has no run to resume")
    shown = recipe.as_dict()
    if args.budget and recipe.size_by_budget:  # train_kfold times the sizes and logs its choice
        shown["size"] = "(chosen by the budget)"
    settings = " ".join(f"{k}={v}" for k, v in shown.items())
    say(f"run directory: {out}\nrecipe: preset={args.preset} {settings}")
    if dist.enabled:
        mode = "data-parallel (--ddp)" if args.ddp else "fold-parallel"
        say(f"torchrun: {dist.world_size} processes, {mode}")
    elif args.ddp:
        say("--ddp: not launched by torchrun (WORLD_SIZE unset), so one process trains every fold")
    protect = [p for p in (args.data, solution) if p is not None] + (list(test["img_path"]) if test is not None else [])
    try:
        run = artlearn.train_kfold(train, out, n_folds=args.n_folds, folds=fold_list(args.folds),
                                   preset=args.preset, seed=args.seed, workers=args.workers, ddp=args.ddp,
                                   sync_bn=args.sync_bn, overwrite=args.overwrite, protect=protect,
                                   budget=_budget_left(args.budget), procs=args.procs,
                                   predict_after=len(test) if test is not None else 0, **chosen)
    except ValueError as e:
        if args.out is None and "different configuration" in str(e):
            raise ValueError(f"{e}; or pass --out {next_free(out)} (a free folder)") from None
        raise
    if not dist.is_main:
        return 0  # rank 0 selects the folds, ensembles, writes the submission and the figures
    rule, hand_picked = fold_selection(args.select)
    if hand_picked is not None or rule != "complete":  # summary.json holds the default rule; record this choice
        run = artlearn.kfold.finish_run(out, select=hand_picked if hand_picked is not None else rule)
    selection = artlearn.select_folds(run, folds=hand_picked, rule=rule)
    print_table(run, selection, run.summary["majority_baseline"])
    if test is not None:
        probs, vocab = artlearn.ensemble(run, test, folds=selection.folds, tta=recipe.tta,
                                         workers=args.workers, prior_adjust=args.prior_adjust)
        sub = artlearn.write_submission(test["id"], probs, vocab, out / "submission.csv")
        print(f"submission: {sub} ({len(test)} ids, folds {selection.folds}, tta={recipe.tta})")
        if solution is not None:  # the synthetic set's labels are known
            s = submission_scores(sub, solution)
            print(f"synthetic test set ({s['n']} images, labels known): accuracy {s['accuracy']:.4f}, "
                  f"macro-F1 {s['f1_macro']:.4f}")
    for fig in artlearn.plots.save_run_figures(out):
        print(f"figure: {fig}")
    artlearn.kfold.record_wall_time(out, time.time() - started)
    print(f"summary: {out / 'summary.json'}\nwall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
