"""The report's study as one command: grids of runs that change one setting of a base recipe, compared.

    python examples/study.py                                        # CPU demo on the built-in synthetic artworks
    python examples/study.py --data DIR --grids arch,size --folds 0 # fold 0 of each cell, on a competition folder
    python examples/study.py --data DIR --budget-minutes 50         # start no new cell after 50 minutes

Grids (the report's comparisons): arch (resnet34, resnet50, resnet101), size (224, 288, 320), pool (avg, gem),
preset (reference, best). Each grid also holds the base recipe's own value, so every figure shows the base. A cell
is the base recipe with one setting changed; it trains into <out>/<preset>-<arch>-<size>-<pool>/, a normal
train_kfold run directory, so a cell shared by several grids (the base) is trained once, rerunning skips complete
folds, and a run made by run_kfold.py with the same settings and --out is reused. Every cell uses the same folds
(same --seed and --n-folds), and is scored on the folds asked for (--folds) only.

Outputs in --out: <grid>.png (train accuracy, train loss, valid loss, valid accuracy; one line per cell, the mean
over the scored folds with a min..max band), results.csv and results.md (one row per grid and setting).
"""
import argparse
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import artlearn as al
from artlearn.cli import add_recipe_flag, fold_list, read_competition, run_cli, submission_scores, tta_choices
from artlearn.files import atomic_write_csv, atomic_write_text
from artlearn.recipe import PRESET_NAMES

GRIDS = {"arch": ("resnet34", "resnet50", "resnet101"), "size": (224, 288, 320), "pool": ("avg", "gem"),
         "preset": ("reference", "best")}
ARCH_ORDER = ("resnet18", "resnet34", "resnet50", "resnet101")
_REF = al.Recipe.preset("reference")
REPORT_BASE = dict(preset="reference", arch=_REF.arch, size=_REF.size, pool=_REF.pool)  # epochs, bs, lr: the preset's
DEMO_BASE = dict(preset="reference", arch="resnet18", size=64, pool="avg", epochs=8, bs=32, lr=2e-3)  # as run_kfold
PANELS = ("train_acc", "train_loss", "valid_loss", "valid_acc")
COLUMNS = ["cell", "grid", "setting", "status", "folds", "oof_accuracy", "oof_f1_macro", "best_valid_acc",
           "mean_best_valid_acc", "best_epoch", "epochs", "wall_min", "images_per_s", "test_accuracy"]


@dataclass(frozen=True)
class Cell:
    """One point of a grid: the base recipe with `grid` set to `setting`."""
    grid: str
    setting: object
    recipe: tuple  # sorted (key, value) pairs: preset, arch, size, pool, epochs, bs, lr

    @property
    def settings(self) -> dict:
        """The recipe as a dict."""
        return dict(self.recipe)

    @property
    def name(self) -> str:
        """The run directory's name, from the settings a grid can change."""
        s = self.settings
        return f"{s['preset']}-{s['arch']}-{s['size']}-{s['pool']}"


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with train.csv (+ test.csv), or artist sub-folders; default: "
                   "the built-in synthetic dataset (built once into data/synthetic, CPU-sized base recipe)")
    p.add_argument("--out", type=Path, default=Path("runs") / "study", help="study folder (default: runs/study)")
    p.add_argument("--grids", default=",".join(GRIDS), help=f"comma-separated grids (default: {','.join(GRIDS)})")
    p.add_argument("--preset", choices=PRESET_NAMES, help="base preset (default: reference)")
    add_recipe_flag(p, "arch", help="base architecture (default: resnet50; synthetic data: resnet18)")
    add_recipe_flag(p, "size", help="base resolution (default: 288; synthetic data: 64)")
    add_recipe_flag(p, "pool", help="base pooling (default: avg)")
    add_recipe_flag(p, "epochs", help="epochs per fold (default: the preset's 30; synthetic data: 8)")
    add_recipe_flag(p, "bs", help="batch size (default: the preset's 32)")
    add_recipe_flag(p, "lr", help="learning rate (default: the preset's 1e-3; synthetic data: 2e-3)")
    p.add_argument("--n-folds", type=int, default=4)
    p.add_argument("--folds", help="comma-separated folds to train and score in every cell (default: all)")
    p.add_argument("--seed", type=int, default=42, help="fold assignment and training seed, shared by every cell")
    p.add_argument("--limit", type=int, help="train on a stratified subset of N images")
    p.add_argument("--tta", default="flip", choices=tta_choices(), help="test-time views for OOF and --test")
    p.add_argument("--workers", type=int, help="data-loader workers (default: 0 on CPU, up to 8 on GPU)")
    p.add_argument("--budget-minutes", type=float, help="start no new cell once this many minutes have passed "
                   "(the table and figures are still written for the cells that finished)")
    p.add_argument("--test", action="store_true", help="also ensemble the data folder's test.csv and write each "
                   "cell's submission.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_grids(text: str) -> list:
    """'arch,pool' -> ['arch', 'pool']; an unknown name is a ValueError naming the valid ones."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [n for n in names if n not in GRIDS]
    if not names:
        raise ValueError(f"--grids {text!r}: name at least one grid; valid grids: {', '.join(GRIDS)}")
    if unknown:
        raise ValueError(f"--grids {text!r}: unknown grid(s) {unknown}; valid grids: {', '.join(GRIDS)}")
    return list(dict.fromkeys(names))


def check_budget(minutes) -> None:
    """A negative budget is a ValueError."""
    if minutes is not None and (not math.isfinite(minutes) or minutes < 0):
        raise ValueError(f"--budget-minutes {minutes}: give a number of minutes >= 0")


# ---------------------------------------------------------------- the cells


def base_recipe(args) -> dict:
    """The base recipe: the report's (or the CPU demo's on synthetic data) with the flags applied."""
    base = dict(DEMO_BASE if args.data is None else REPORT_BASE)
    for key in ("preset", "arch", "size", "pool", "epochs", "bs", "lr"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    return {k: base.get(k) for k in ("preset", "arch", "size", "pool", "epochs", "bs", "lr")}


def grid_values(grid: str, base_value) -> list:
    """The grid's settings plus the base's own, in the grid's natural order (depth, pixels, as listed)."""
    values = list(GRIDS[grid])
    if base_value not in values:
        values.insert(0, base_value)
    if grid == "size":
        values.sort()
    elif grid == "arch":
        values.sort(key=lambda a: ARCH_ORDER.index(a) if a in ARCH_ORDER else len(ARCH_ORDER))
    return values


def study_cells(grids: list, base: dict) -> list:
    """Every (grid, setting) cell of the grids asked for."""
    return [Cell(grid, value, tuple(sorted({**base, grid: value}.items())))
            for grid in grids for value in grid_values(grid, base[grid])]


def check_cells(cells: list) -> None:
    """ValueError naming the first setting a cell's recipe cannot train with (e.g. an unknown --pool), before any
    data is read."""
    for cell in cells:
        settings = dict(cell.settings)
        al.Recipe.preset(settings.pop("preset")).replace(**settings).validate()


# ---------------------------------------------------------------- training


class Budget:
    """Wall-clock budget in minutes from the start of the study (None: no limit)."""

    def __init__(self, minutes, started: float | None = None):
        self.minutes = minutes
        self.started = time.time() if started is None else started

    @property
    def elapsed_min(self) -> float:
        """Minutes since the study started."""
        return (time.time() - self.started) / 60

    def spent(self) -> bool:
        """True once the budget's minutes have passed."""
        return self.minutes is not None and self.elapsed_min >= self.minutes


def train_cell(cell: Cell, train, args, folds: list):
    """Train (or resume) one cell's folds into its run directory; returns the KFoldRun."""
    s = cell.settings
    tta = None if args.tta == "none" else args.tta
    return al.train_kfold(train, args.out / cell.name, n_folds=args.n_folds, folds=folds, preset=s["preset"],
                          arch=s["arch"], pool=s["pool"], size=s["size"], epochs=s["epochs"], bs=s["bs"],
                          lr=s["lr"], seed=args.seed, tta=tta, workers=args.workers,
                          progress=not args.no_progress, log=lambda msg: print(f"[{cell.name}] {msg}", flush=True))


def done_folds(run, folds: list) -> list:
    """The asked folds whose checkpoint is complete (or stopped early by the non-finite-loss guard)."""
    best = run.best
    if best.empty or "status" not in best.columns:
        return []
    done = best.index[best["status"].astype(str).str.match(r"complete|stopped")]
    return [int(k) for k in folds if k in set(int(i) for i in done)]


def config_differences(config: dict, cell: Cell, args, n_images: int) -> list:
    """'key: old != new' for every study setting a run directory's config.json disagrees with."""
    tta = None if args.tta == "none" else args.tta
    wanted = {**{k: v for k, v in cell.settings.items() if v is not None}, "n_folds": args.n_folds, "seed": args.seed,
              "n_images": n_images, "tta": tta}
    return [f"{k}: {config.get(k)!r} there, {v!r} now" for k, v in wanted.items() if config.get(k) != v]


def check_existing_runs(cells: list, args, n_images: int) -> None:
    """Refuse, before anything trains, a study folder whose runs were made with other settings or data size."""
    for name, cell in {c.name: c for c in cells}.items():
        config_path = args.out / name / "config.json"
        if config_path.is_file():
            diffs = config_differences(al.load_run(config_path.parent).config, cell, args, n_images)
            if diffs:
                raise ValueError(f"{config_path.parent} was made with other settings ({'; '.join(diffs)}); use "
                                 "another --out, or delete that folder to start the cell over")


def finished_on_disk(cell: Cell, args, n_images: int, folds: list):
    """The cell's run when every asked fold is already done with the cell's settings, else None."""
    path = args.out / cell.name
    if not (path / "config.json").is_file():
        return None
    run = al.load_run(path)
    if config_differences(run.config, cell, args, n_images):
        return None
    return run if done_folds(run, folds) == folds else None


# ---------------------------------------------------------------- scores and the table


def oof_scores_on(run, folds: list) -> tuple:
    """(accuracy, macro-F1) of the out-of-fold predictions of `folds` only (NaN when there are none)."""
    from sklearn.metrics import f1_score
    oof = run.oof
    oof = oof[oof["fold"].isin(folds)] if oof is not None and len(oof) else None
    if oof is None or oof.empty:
        return math.nan, math.nan
    true, pred = oof["artist"].astype(str), oof["pred"].astype(str)
    return float((true == pred).mean()), float(f1_score(true, pred, average="macro", zero_division=0))


def training_throughput(run, folds: list) -> tuple:
    """(training wall seconds, images seen in training) over `folds`, from history.csv and the OOF rows.

    A fold trains on every image not in its validation fold (n_images minus the fold's OOF rows), once per epoch;
    the seconds are the histories' per-epoch wall times (training plus validation).
    """
    seconds = images = 0.0
    n_images = int(run.config.get("n_images", 0))
    for k in folds:
        history = run.histories.get(k)
        if history is None or not len(history):
            continue
        n_valid = int((run.oof["fold"] == k).sum()) if run.oof is not None else 0
        seconds += float(history["seconds"].sum())
        images += (n_images - n_valid) * len(history)
    return seconds, images


def per_fold(run, folds: list, column: str, show) -> str:
    """'0:0.6250 1:0.5000': one best-epoch value per fold, each formatted by `show`."""
    best = run.best
    if column not in best.columns:
        return ""
    values = [(k, best.loc[k, column]) for k in folds if k in best.index]
    return " ".join(f"{k}:{show(v)}" for k, v in values if v == v)  # v == v: not NaN


def cell_row(cell: Cell, run, folds: list, status: str, test_accuracy=math.nan) -> dict:
    """One results row for a trained cell, scored on `folds`."""
    scored = done_folds(run, folds)
    accuracy, f1 = oof_scores_on(run, scored)
    seconds, images = training_throughput(run, scored)
    best = run.best
    best_acc = [float(best.loc[k, "valid_acc"]) for k in scored if "valid_acc" in best.columns]
    epochs = sorted({len(run.histories[k]) for k in scored if k in run.histories})
    return dict(cell=cell.name, grid=cell.grid, setting=str(cell.setting), status=status,
                folds=" ".join(map(str, scored)), oof_accuracy=accuracy, oof_f1_macro=f1,
                best_valid_acc=per_fold(run, scored, "valid_acc", lambda v: f"{v:.4f}"),
                mean_best_valid_acc=sum(best_acc) / len(best_acc) if best_acc else math.nan,
                best_epoch=per_fold(run, scored, "epoch", lambda v: str(int(v))), epochs="/".join(map(str, epochs)),
                wall_min=seconds / 60, images_per_s=images / seconds if seconds > 0 else math.nan,
                test_accuracy=test_accuracy)


def empty_row(cell: Cell, status: str) -> dict:
    """A results row for a cell that was not trained (budget spent, or failed)."""
    return {**{c: math.nan for c in COLUMNS}, **dict(cell=cell.name, grid=cell.grid, setting=str(cell.setting),
                                                       status=status, folds="", best_valid_acc="", best_epoch="",
                                                       epochs="")}


def results_table(rows: list):
    """The rows as a DataFrame in COLUMNS order."""
    import pandas as pd
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown_table(table) -> str:
    """The results as a Markdown table (floats to 4 places, minutes to 1, images/s to 0)."""
    digits = dict(wall_min=1, images_per_s=0)

    def show(col, v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits.get(col, 4)}f}"
        return str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(show(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(rows: list, out: Path):
    """Write results.csv and results.md into `out`; returns the table."""
    table = results_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "results.csv", table)
    atomic_write_text(out / "results.md", markdown_table(table))
    return table


# ---------------------------------------------------------------- figures and the test set


def grid_figure(grid: str, cells: list, runs: dict, folds: list, base: dict, out: Path):
    """<out>/<grid>.png: the four panels, one line per trained cell of the grid; None when no cell trained."""
    drawn = [(c, runs[c.name]) for c in cells if c.grid == grid and c.name in runs]
    drawn = [(c, {k: run.histories[k] for k in done_folds(run, folds) if k in run.histories}) for c, run in drawn]
    drawn = [(c, h) for c, h in drawn if h]
    if not drawn:
        return None
    labels = [f"{c.setting} (base)" if c.setting == base[grid] else str(c.setting) for c, _ in drawn]
    title = (f"{grid}: base {'-'.join(str(base[k]) for k in ('preset', 'arch', 'size', 'pool'))}, "
             f"fold{'s' if len(folds) > 1 else ''} {' '.join(map(str, folds))}"
             + (" (mean; shaded: min..max over folds)" if len(folds) > 1 else ""))
    fig = al.compare_runs([h for _, h in drawn], labels=labels, metrics=PANELS, title=title)
    return al.save_figure(fig, out / f"{grid}.png")


def predict_test(run, test, folds: list, tta, solution=None) -> float:
    """Ensemble the cell's folds on the test set into <run>/submission.csv; accuracy when labels are known."""
    complete = done_folds(run, folds)
    selection = al.select_folds(run) if complete == run.folds else al.select_folds(run, folds=complete)
    probs, vocab = al.ensemble(run, test, folds=selection.folds, tta=tta)
    sub = al.write_submission(test["id"], probs, vocab, run.path / "submission.csv")
    if solution is None:
        return math.nan
    return submission_scores(sub, solution)["accuracy"]


# ---------------------------------------------------------------- the study


def run_study(args, cells: list, folds: list, train, test=None, solution=None, budget: Budget | None = None) -> tuple:
    """Train every cell in order (each distinct run once), writing the table and figures as cells finish.

    Returns (rows, runs by cell name, names of the unfinished runs the budget left unstarted).
    """
    base, budget = base_recipe(args), budget or Budget(None)
    rows, runs, statuses, test_scores, left_out = [], {}, {}, {}, []
    for cell in cells:
        if cell.name not in statuses:
            statuses[cell.name] = train_or_reuse(cell, args, train, folds, budget, runs, left_out)
        run = runs.get(cell.name)
        if run is None:
            rows.append(empty_row(cell, statuses[cell.name]))
            continue
        if test is not None and cell.name not in test_scores:
            test_scores[cell.name] = predict_test(run, test, folds, None if args.tta == "none" else args.tta,
                                                  solution)
        rows.append(cell_row(cell, run, folds, statuses[cell.name], test_scores.get(cell.name, math.nan)))
        write_table(rows, args.out)
        grid_figure(cell.grid, cells, runs, folds, base, args.out)
    return rows, runs, left_out


def train_or_reuse(cell: Cell, args, train, folds: list, budget: Budget, runs: dict, left_out: list) -> str:
    """Train the cell unless the budget is spent (then report it only if finished on disk); returns its status."""
    if budget.spent():
        run = finished_on_disk(cell, args, len(train), folds)
        if run is None:
            left_out.append(cell.name)
            print(f"[{cell.name}] budget of {budget.minutes:g} min spent after {budget.elapsed_min:.1f} min: "
                  "not started", flush=True)
            return "skipped: budget"
        runs[cell.name] = run
        print(f"[{cell.name}] budget spent; folds {folds} already finished on disk, reported as they are")
        return "on disk (budget spent)"
    print(f"\n=== cell {cell.name} ({cell.grid}={cell.setting}) after {budget.elapsed_min:.1f} min", flush=True)
    started, finished = time.time(), finished_on_disk(cell, args, len(train), folds) is not None
    try:
        runs[cell.name] = train_cell(cell, train, args, folds)  # checks the settings and data, skips done folds
    except Exception as e:  # e.g. CUDA out of memory in one cell: logged, the other cells still run
        traceback.print_exc()
        print(f"[{cell.name}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return f"failed: {type(e).__name__}"
    print(f"[{cell.name}] done in {(time.time() - started) / 60:.1f} min", flush=True)
    return "resumed: nothing retrained" if finished else "trained"


def main(argv=None) -> int:
    """Check the flags, run the study, print the table and where everything went; a bad flag or input is one line on
    stderr and exit status 2 (`artlearn.checks.run_cli`)."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    budget = Budget(args.budget_minutes)
    grids = parse_grids(args.grids)
    folds = fold_list(args.folds, "--folds", args.n_folds) or list(range(args.n_folds))
    check_budget(args.budget_minutes)
    base = base_recipe(args)
    cells = study_cells(grids, base)
    check_cells(cells)
    train, test, solution, _, _ = read_competition(args.data, test=args.test, say=print)
    if args.limit:
        train = al.stratified_subset(train, args.limit, seed=args.seed)
        print(f"--limit {args.limit}: stratified subset of {len(train)} images, {train['artist'].nunique()} artists")
    check_existing_runs(cells, args, len(train))
    distinct = list(dict.fromkeys(c.name for c in cells))
    print(f"study: {len(cells)} cells ({len(distinct)} distinct runs) in {args.out}; grids {', '.join(grids)}; "
          f"base " + " ".join(f"{k}={v}" for k, v in base.items() if v is not None) +
          f"; folds {folds} of {args.n_folds}, seed {args.seed}", flush=True)
    rows, runs, left_out = run_study(args, cells, folds, train, test, solution, budget)
    table = write_table(rows, args.out)
    figures = [f for g in grids if (f := grid_figure(g, cells, runs, folds, base, args.out)) is not None]
    if left_out:
        print(f"\n--budget-minutes {args.budget_minutes:g}: stopped after {budget.elapsed_min:.1f} min; "
              f"{len(left_out)} run(s) not started: {', '.join(left_out)}")
    print("\n" + markdown_table(table))
    for f in figures:
        print(f"figure: {f}")
    print(f"table: {args.out / 'results.csv'} and {args.out / 'results.md'}\n"
          f"wall time: {budget.elapsed_min:.1f} min")
    return 1 if any(str(s).startswith("failed") for s in table["status"]) else 0


if __name__ == "__main__":
    sys.exit(main())
