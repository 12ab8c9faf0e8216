"""Recipes at equal wall time: every row gets the same minutes for fold 0 of the same folds, one thread each.

    python examples/benchmarks/budget_table.py --data ../shared/data/artworks --minutes 7 --seeds 7,42 \
        --out runs/budget7

Each row is trained by `train_kfold(..., folds=[0], budget=...)` (the epochs planned to fit the minutes on this
machine) in its own process with one torch thread, `--parallel` rows at a time (as a 2-core machine runs two
folds side by side). `plain` is plain_torchvision.py (here) given the same minutes (`--minutes`), `fastai` is
fastai's own `vision_learner(xresnet18)` + `fit_one_cycle` (fastai_baseline.py, here). One JSON line per run in
<out>/results.jsonl (reruns skip the runs already there); the table (mean, min..max over seeds, and each row's
accuracy minus the first row's, seed by seed) in results.md. A row is `plain`, `fastai` or a spec
'preset[+key=value...]' (Recipe settings on top of a preset), so every candidate can be run alone on one base:

    python examples/benchmarks/budget_table.py --data ../shared/data/artworks --minutes 7 --seeds 7,42 \
        --rows fast+size=48,fast+size=48+ema=0.998,fast+size=48+arch=xresnet18 --out runs/cand7
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from artlearn.cli import int_list, parse_setting, read_competition, run_cli
from artlearn.files import atomic_write_csv, atomic_write_json, atomic_write_text

HERE = Path(__file__).resolve().parent
# Rows are specs, 'preset[+key=value...]' (a Recipe preset, then Recipe settings: each candidate alone on top of
# a preset, or a combination); these names are kept for the tables already committed (docs/results/budget7).
ALIASES = {"fast+sgd": "fast+optimizer=sgd+lr=0.05+wd=0.0005", "reference@64px": "reference+arch=resnet18+size=64"}
TERM = re.compile(r"\+(?=[A-Za-z_])")  # '+' between terms, not the one of '1e+3'
SCRIPTS = {"plain": "plain_torchvision.py", "fastai": "fastai_baseline.py"}


def row_settings(row: str) -> dict:
    """train_kfold's preset and overrides of a row spec 'preset[+key=value...]'; ValueError naming the bad term."""
    from artlearn import Recipe
    from artlearn.recipe import PRESETS
    spec = ALIASES.get(row, row)
    preset, *terms = [t.strip() for t in TERM.split(spec)]
    if preset not in PRESETS:
        raise ValueError(f"row {row!r}: starts with {preset!r}, not a preset; a row is plain, fastai or "
                         f"preset[+key=value...] with a preset of {list(PRESETS)}")
    settings = {}
    for term in terms:
        key, eq, raw = term.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"row {row!r}: term {term!r} is not key=value")
        settings[key.strip()] = parse_setting(key.strip(), raw.strip())
    Recipe.preset(preset).replace(**settings).validate()
    return dict(preset=preset, **settings)


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="competition folder with train.csv")
    p.add_argument("--minutes", type=float, required=True, help="wall minutes each row gets for fold 0")
    p.add_argument("--rows", default="fast,plain,fastai",
                   help=f"comma-separated: {', '.join(SCRIPTS)} or preset[+key=value...] (e.g. fast+ema=0.998)")
    p.add_argument("--seeds", default="7,42")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def fold_table(data: Path, out: Path) -> Path:
    """folds.csv of the shared 4-fold split (seed 42), written once: every row and seed trains the same fold 0."""
    path = out / "folds.csv"
    if not path.is_file():
        import artlearn as al
        df = al.assign_folds(read_competition(data, test=False, folders=False).train, 4, 42)
        atomic_write_csv(path, df[["img_path", "artist", "fold"]])
    return path


def command(row: str, seed: int, args, folds_csv: Path) -> list:
    """The command line of one run."""
    run_dir = args.out / f"{row}-s{seed}"
    if row in SCRIPTS:
        return [sys.executable, str(HERE / SCRIPTS[row]), "--train-csv", str(args.data / "train.csv"),
                "--folds-csv", str(folds_csv), "--fold", "0", "--minutes", str(args.minutes), "--seed", str(seed),
                "--out", str(run_dir)]
    return [sys.executable, str(Path(__file__).resolve()), "--one", row, str(seed), str(args.minutes),
            str(folds_csv), str(run_dir)]


def train_one(row: str, seed: int, minutes: float, folds_csv: str, run_dir: str) -> None:
    """One artlearn row: fold 0 trained with the row's recipe, within `minutes`; result.json in run_dir."""
    import logging

    import pandas as pd
    import torch

    import artlearn as al
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    df = pd.read_csv(folds_csv, dtype={"img_path": str, "artist": str}, keep_default_na=False)
    started = time.time()
    run = al.train_kfold(df, run_dir, folds=[0], seed=seed, budget=minutes * 60, progress=False, procs=1,
                         **row_settings(row))
    oof = run.oof_scores
    timing = run.summary["timing"]
    result = dict(row=row, seed=seed, minutes=minutes, accuracy=oof["accuracy"], f1_macro=oof["f1_macro"],
                  epochs=timing["folds"]["0"]["epochs"], planned_s=timing["folds"]["0"]["planned_s"],
                  wall_s=round(time.time() - started, 1), settings=row_settings(row))
    atomic_write_json(Path(run_dir, "result.json"), result)


def run_one(row: str, seed: int, args, folds_csv: Path) -> dict:
    """Run one row and seed in its own process (one thread); its result line."""
    run_dir = args.out / f"{row}-s{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.time()
    with open(args.out / f"{row}-s{seed}.log", "w") as log:
        subprocess.run(command(row, seed, args, folds_csv), env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    result = json.loads((run_dir / "result.json").read_text())
    result.update(row=row, seed=seed, minutes=args.minutes, process_wall_s=round(time.time() - started, 1),
                  load_avg=round(os.getloadavg()[0], 2))
    return result


def paired_delta(rs: list, base: list) -> str:
    """Mean and min..max over the shared seeds of a row's accuracy minus the base row's ('' without shared seeds)."""
    base_acc = {r["seed"]: r["accuracy"] for r in base}
    deltas = [r["accuracy"] - base_acc[r["seed"]] for r in rs if r["seed"] in base_acc]
    if not deltas:
        return ""
    return f"{statistics.mean(deltas):+.4f} ({min(deltas):+.4f}..{max(deltas):+.4f})"


def write_table(out: Path, results: list, base: str | None = None) -> None:
    """results.md: one line per row, mean and min..max over seeds, and the paired difference to the `base` row."""
    rows = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    base = base if base in rows else None
    lines = ["| row | seeds | OOF accuracy | OOF macro-F1 | epochs | wall s per run |"
             + (f" accuracy vs {base}, paired |" if base else ""),
             "|---|---|---|---|---|---|" + ("---|" if base else "")]
    for row, rs in sorted(rows.items(), key=lambda kv: -statistics.mean(r["accuracy"] for r in kv[1])):
        rs = sorted(rs, key=lambda r: r["seed"])
        acc, f1 = [r["accuracy"] for r in rs], [r["f1_macro"] for r in rs]
        lines.append(f"| {row} | {','.join(str(r['seed']) for r in rs)} | {statistics.mean(acc):.4f} "
                     f"({min(acc):.4f}..{max(acc):.4f}) | {statistics.mean(f1):.4f} ({min(f1):.4f}..{max(f1):.4f}) | "
                     f"{', '.join(str(r.get('epochs')) for r in rs)} | "
                     f"{', '.join(str(r.get('process_wall_s')) for r in rs)} |"
                     + (f" {paired_delta(rs, rows[base]) if row != base else ''} |" if base else ""))
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    """The table (or, with --one, one row's run in this process); a bad argument or input ends with one `error:`
    line and exit status 2."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    """main's work (errors reported by run_cli)."""
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--one":
        row, seed, minutes, folds_csv, run_dir = sys.argv[2:7]
        train_one(row, int(seed), float(minutes), folds_csv, run_dir)
        return 0
    args = parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    for row in rows:  # every spec checked before anything is trained
        if row not in SCRIPTS:
            row_settings(row)
    seeds = int_list(args.seeds, "--seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    folds_csv = fold_table(args.data, args.out)
    jsonl = args.out / "results.jsonl"
    done = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    seen = {(r["row"], r["seed"]) for r in done}
    todo = [(row, s) for row in rows for s in seeds if (row, s) not in seen]  # a row's seeds side by side
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda job: run_one(*job, args, folds_csv), todo):
            done.append(result)
            with open(jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")
            write_table(args.out, done, rows[0])
            print(f"{result['row']} seed {result['seed']}: accuracy {result['accuracy']:.4f}, "
                  f"macro-F1 {result['f1_macro']:.4f} ({result.get('epochs')} epochs)", flush=True)
    write_table(args.out, done, rows[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
