"""Is leaving folds out worth it? (issue 16) K-fold on most of the training set, scored on a held-out slice of it.

A stratified slice of the training table (--holdout 0.15, --holdout-seed 0; the same slice for every seed) is kept
out as a pseudo-test; train_kfold trains every fold of a stratified K-fold split of the rest (per --seeds: the seed
draws the fold split AND the model init / augmentation, as a user's rerun would). On the pseudo-test, each seed
compares, with the recipe's test-time views (flip-TTA unless it names others, e.g. best's multicrop):
  all        the ensemble of every complete fold
  selected   the ensemble of the folds select_folds keeps (the report's rule: unstable or weak folds left out)
  best fold  the single fold with the best validation accuracy (chosen on validation, not on the pseudo-test)
  mean fold  the mean score of the single folds (what one fold alone is worth)
  oracle     the single fold best on the pseudo-test itself (an upper bound, never a choice)
The real test set is never read. One JSON line per seed goes to --results-dir/fold_selection-<budget>.jsonl as it
finishes (a seed already there is not run again; run directories under --out resume), and the Markdown table
fold_selection-<budget>.md is rebuilt after each seed.

    python examples/benchmarks/fold_selection_study.py --dry-run
    python examples/benchmarks/fold_selection_study.py               # ResNet-18, 64 px, 12 epochs, seeds 42,7,1
    python examples/benchmarks/fold_selection_study.py --recipe best --seeds 42,7
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from artlearn.cli import fold_list, read_competition, run_cli
from artlearn.files import atomic_write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare_recipes as cr  # noqa: E402  (rows, budget names, results files, machine description)

STRATEGIES = ("all", "selected", "best_fold", "mean_fold", "oracle_fold")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/artworks"), help="folder with train.csv")
    p.add_argument("--out", type=Path, default=Path("runs/fold_selection"), help="run directories (resumable)")
    p.add_argument("--results-dir", type=Path, default=cr.RESULTS)
    p.add_argument("--budget", help="name of the budget's files (default <arch>-<size>px-<epochs>ep-bs<bs>)")
    p.add_argument("--recipe", default="reference", help="a row spec of compare_recipes.py: reference, best, "
                   "min_scale=0.35, best+warmup=1, ...")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="stratified subset of the training table first (0: all)")
    p.add_argument("--holdout", type=float, default=0.15, help="fraction held out as the pseudo-test")
    p.add_argument("--holdout-seed", type=int, default=0)
    p.add_argument("--n-folds", type=int, default=4)
    p.add_argument("--seeds", default="42,7,1", help="at least 2: fold split and training seed of each K-fold run")
    p.add_argument("--workers", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--max-minutes", type=float, default=0, help="start no new seed after this long (0: no limit)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the Markdown from the jsonl")
    args = p.parse_args(argv)
    args.seeds = cr.seed_list(args.seeds)
    if not 0 < args.holdout < 0.5:
        raise ValueError(f"--holdout {args.holdout}: need a fraction in (0, 0.5)")
    fold_list(None, "--folds", args.n_folds)  # --n-folds 1 is refused
    for name in ("size", "epochs", "bs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: need a positive number")
    try:
        args.row = cr.parse_row(args.recipe)
        if args.row.kind == "plain":
            raise ValueError("the study trains artlearn runs: use a preset and/or Recipe settings (not plain)")
        cr.check_row(args.row, cr.budget_of(args))
    except ValueError as e:
        raise ValueError(f"--recipe {args.recipe}: {e}") from None
    return args


def split(args):
    """(rest, holdout): the pseudo-test slice (stratified, fixed by --holdout-seed) and what K-fold trains on."""
    import artlearn
    df = read_competition(args.data, test=False, folders=False).train
    if args.limit:
        df = artlearn.stratified_subset(df, args.limit, seed=0)
    holdout = artlearn.stratified_subset(df, max(1, round(args.holdout * len(df))), seed=args.holdout_seed,
                                         min_per_artist=0)
    rest = df[~df["img_path"].isin(set(holdout["img_path"]))].reset_index(drop=True)
    return rest, holdout


def name_of(args) -> str:
    budget = args.budget or f"{args.arch}-{args.size}px-{args.epochs}ep-bs{args.bs}" + (
        f"-n{args.limit}" if args.limit else "")
    recipe = "" if args.row.name == "reference" else "-" + args.row.train_dir
    scoring = "".join(f"__{k}-{v}" for k, v in sorted(args.row.evaluate.items()))
    return f"fold_selection-{budget}{recipe}{scoring}"


def fingerprint(rest, holdout) -> str:
    return cr.data_fingerprint(pd.concat([rest.assign(fold=0), holdout.assign(fold=-1)]))


def run_seed(args, rest, holdout, seed, cache, run_dir) -> dict:
    """Train (or resume) every fold for one seed, then score the strategies on the pseudo-test."""
    import artlearn
    start = time.time()
    df = artlearn.assign_folds(rest, args.n_folds, seed=seed)
    run = artlearn.train_kfold(df, run_dir, n_folds=args.n_folds, preset=args.row.preset, seed=seed, tta="flip",
                               workers=args.workers, progress=False, cache=cache, log=cr._log(f"seed {seed}"),
                               **cr._settings(args.row, cr.budget_of(args)))
    selection = artlearn.select_folds(run, rule="stable")  # the report's rule, against the default 'all complete'
    view = dict(tta=args.row.evaluate.get("tta", "flip"), prior_adjust=args.row.evaluate.get("prior_adjust", 0.0))
    probs = {k: artlearn.ensemble(run, holdout, folds=[k], cache=cache, workers=args.workers, **view)
             for k in run.folds}
    vocab = probs[run.folds[0]][1]
    truth = holdout["artist"].tolist()

    def scores(folds):
        p = np.mean([probs[k][0] for k in folds], axis=0)
        return cr.score(truth, [vocab[i] for i in p.argmax(1)])

    best = run.best
    per_fold = {}
    for k in run.folds:
        per_fold[str(k)] = dict(valid_acc=float(best.loc[k, "valid_acc"]), valid_loss=float(best.loc[k, "valid_loss"]),
                                best_epoch=cr._int(best.loc[k, "epoch"]),
                                volatility=float(selection.table.loc[k, "volatility"]), **scores([k]))
    ranked = sorted(run.folds, key=lambda k: (-per_fold[str(k)]["valid_acc"], per_fold[str(k)]["valid_loss"]))
    single = [per_fold[str(k)] for k in run.folds]
    oracle = max(run.folds, key=lambda k: (per_fold[str(k)]["accuracy"], per_fold[str(k)]["f1_macro"]))
    results = dict(all=scores(run.folds), selected=scores(selection.folds), best_fold=scores([ranked[0]]),
                   mean_fold=dict(accuracy=float(np.mean([s["accuracy"] for s in single])),
                                  f1_macro=float(np.mean([s["f1_macro"] for s in single]))),
                   oracle_fold=scores([oracle]))
    return dict(study="fold_selection", recipe=args.row.name, settings=args.row.describe(), seed=seed,
                n_folds=args.n_folds, folds=run.folds,
                selected=selection.folds, excluded={str(k): v for k, v in selection.excluded.items()},
                rule=selection.rule, best_fold=ranked[0], oracle_fold=oracle, results=results, per_fold=per_fold,
                arch=args.arch, size=args.size, epochs=args.epochs, bs=args.bs, limit=args.limit,
                holdout=args.holdout, holdout_seed=args.holdout_seed, n_train=len(rest), n_holdout=len(holdout),
                n_artists=int(pd.concat([rest, holdout])["artist"].nunique()), data=str(args.data),
                data_fingerprint=fingerprint(rest, holdout), run_dir=cr._short_path(run_dir),
                train_seconds=sum(float(h["seconds"].sum()) for h in run.histories.values()),
                wall_s=time.time() - start, where=cr.where(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                artlearn=artlearn.__version__, git=cr.git_commit())


def _pair(recs, strategy, metric) -> str:
    """Mean over seeds of a strategy's score, and its paired difference from 'all' in points (min..max)."""
    v = np.array([r["results"][strategy][metric] for r in recs])
    if strategy == "all":
        return f"{v.mean():.4f} ({v.min():.4f}..{v.max():.4f})"
    d = 100 * (v - np.array([r["results"]["all"][metric] for r in recs]))
    return f"{v.mean():.4f}, {d.mean():+.1f} pts ({d.min():+.1f}..{d.max():+.1f})"


def write_report(path: Path, fp: str) -> Path:
    """The Markdown table of every seed in the jsonl (of this data), and the means with paired deltas vs 'all'."""
    recs = {}
    for r in cr.read_jsonl(path):
        if r.get("data_fingerprint") == fp:
            recs[int(r["seed"])] = r
    recs = [recs[s] for s in sorted(recs)]
    lines = [f"# Is leaving folds out worth it? {path.stem}", "",
             "Written by `examples/benchmarks/fold_selection_study.py`. A stratified slice of the training set is held "
             "out as a pseudo-test (the real test set is never used); K-fold runs on the rest, one per seed (the "
             "seed draws the fold split and the training). Scores on the pseudo-test, with the recipe's test-time "
             "views. `selected`: the folds "
             "`select_folds` keeps (the report's rule); `best fold`: best validation accuracy; `oracle`: best on "
             "the pseudo-test itself (a bound, not a choice).", ""]
    if not recs:
        return atomic_write_text(path.with_suffix(".md"), "\n".join(lines + ["No seed finished yet.", ""]))
    r0 = recs[0]
    lines += [f"Data `{r0['data']}`: {r0['n_train']} training + {r0['n_holdout']} held-out images "
              f"({r0['holdout']:g}, seed {r0['holdout_seed']}), {r0['n_artists']} artists; recipe `{r0['recipe']}` "
              f"({r0.get('settings', r0['recipe'])}), "
              f"{r0['arch']}, {r0['size']} px, {r0['epochs']} epochs, batch {r0['bs']}, {r0['n_folds']} folds.", "",
              "| seed | folds kept (left out: why) | all: acc / F1 | selected: acc / F1 | best fold: acc / F1 | "
              "mean fold: acc / F1 | oracle fold: acc / F1 |", "|---|---|---|---|---|---|---|"]
    for r in recs:
        res = r["results"]
        why = "; ".join(f"{k}: {v}" for k, v in r["excluded"].items()) or "none left out"
        cells = [f"{res[s]['accuracy']:.4f} / {res[s]['f1_macro']:.4f}" for s in STRATEGIES]
        lines.append(f"| {r['seed']} | {r['selected']} ({why}) | {' | '.join(cells)} |")
    lines += ["", f"Mean over {len(recs)} seeds, and paired difference from `all` (min..max over seeds):", "",
              "| strategy | accuracy | macro-F1 |", "|---|---|---|"]
    for s in STRATEGIES:
        lines.append(f"| {s} | {_pair(recs, s, 'accuracy')} | {_pair(recs, s, 'f1_macro')} |")
    left_out = sum(len(r["folds"]) - len(r["selected"]) for r in recs)
    lines += ["", f"Folds left out by the rule: {left_out} of {sum(len(r['folds']) for r in recs)}; ran on "
              f"{', '.join(sorted({cr._machine(r) for r in recs}))}.", ""]
    return atomic_write_text(path.with_suffix(".md"), "\n".join(lines))


def main(argv=None) -> list | int:
    """Train and score every seed not in the jsonl yet; returns the records written now, or 2 after a bad argument
    or input (one `error:` line on stderr, `run_cli`)."""
    return run_cli(_main, argv)


def _main(argv=None) -> list:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    rest, holdout = split(args)
    fp, name = fingerprint(rest, holdout), name_of(args)
    jsonl = args.results_dir / f"{name}.jsonl"
    root = args.out / name
    done = {int(r["seed"]) for r in cr.read_jsonl(jsonl) if r.get("data_fingerprint") == fp}
    print(f"{name}: {len(rest)} training images in {args.n_folds} folds, {len(holdout)} held out; recipe "
          f"{args.row.name}; seeds {args.seeds} (done: {sorted(done & set(args.seeds)) or 'none'}); runs in {root}; "
          f"results {jsonl}")
    todo = [s for s in args.seeds if s not in done]
    settings = cr._settings(args.row, cr.budget_of(args))
    minutes = len(todo) * args.n_folds * cr.fold_minutes(settings, len(rest))
    print(f"{len(todo)} K-fold runs to do ({len(todo) * args.n_folds} fold trainings): about {minutes:.1f} CPU "
          "minutes on this 2-core machine")
    if args.dry_run:
        return []
    if args.report_only:
        print(f"wrote {write_report(jsonl, fp)}")
        return []
    from artlearn.recipe import Recipe
    from artlearn.store import PresizeCache, store_presize
    recipe = Recipe.preset(args.row.preset).replace(**cr._settings(args.row, cr.budget_of(args)))
    cache = PresizeCache(store_presize(recipe.store, recipe.size, recipe.min_scale, len(rest) + len(holdout)))
    started, written = time.time(), []
    for seed in todo:
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes:g} spent: stopping before seed {seed}; rerun to go on")
            break
        rec = run_seed(args, rest, holdout, seed, cache, root / f"s{seed}")
        cr.append_jsonl(jsonl, rec)
        written.append(rec)
        res = rec["results"]
        print(f"seed {seed}: kept folds {rec['selected']} of {rec['folds']}; pseudo-test accuracy all "
              f"{res['all']['accuracy']:.4f}, selected {res['selected']['accuracy']:.4f}, best fold "
              f"{res['best_fold']['accuracy']:.4f}", flush=True)
        write_report(jsonl, fp)
    print(f"wrote {write_report(jsonl, fp)}")
    return written


if __name__ == "__main__":
    sys.exit(2 if main() == 2 else 0)
