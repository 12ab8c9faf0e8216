"""Recipe comparison (issue 16): same data, same folds, same budget, out-of-fold scores only, several seeds.

Protocol. The whole training table of --data (--limit 0), ONE stratified fold assignment (assign_folds, --n-folds 4,
--fold-seed 42) made once and passed, as the table's 'fold' column, to every run: every row and every seed is scored
on the same validation rows, and the seed (--seeds, at least 2) changes model init, sampling and augmentation only.
Each (row, seed) is one train_kfold run directory under --out/<budget>/ (resumable: complete folds are never
retrained), scored on the out-of-fold predictions of --folds (flip-TTA). The test set is never read.

Rows: 'reference' (the report's recipe), 'best', 'plain' (plain_torchvision.py here: no artlearn, same folds),
every option switched on alone on top of reference (OPTIONS below; options the library lacks are skipped and
listed), the ensemble-time options (prior_adjust=tau, tta=multicrop) scored on the reference runs' folds with no
extra training, and --combos: 'min_scale=0.35+warmup=1', 'best+warmup=1', ... (commas between combos). A row is
any such spec: an optional preset, then '+'-joined key=value terms (Recipe settings, prior_adjust, tta).

Output per budget (--budget, default '<arch>-<size>px-<epochs>ep-bs<bs>'): --results-dir/<budget>.jsonl, one JSON
line per (row, seed) appended as it finishes (a (row, seed, folds, data) already there is not run again, so a sweep
can be split across sessions and machines), and <budget>.md, the table (mean and min..max over seeds, paired deltas
vs reference) rebuilt after every run; --report-only rebuilds it alone.

    python examples/benchmarks/compare_recipes.py --dry-run                               # plan of the 64 px budget
    python examples/benchmarks/compare_recipes.py                                         # every row, 64 px, fold 0
    python examples/benchmarks/compare_recipes.py --size 128 --rows reference,best,plain  # the 128 px budget
"""
import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from artlearn.cli import fold_list, int_list, parse_setting, read_competition, run_cli, tta_choices
from artlearn.files import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[1] / "docs" / "results" / "compare"
PLAIN_SCRIPT = HERE / "plain_torchvision.py"
PRESETS = ("reference", "best")
# Options switched on alone on top of reference ('store' is the decode-once store's resolution rule, 'prior_adjust'
# and 'tta' are ensemble-time); a spec the library cannot run (no such setting or value) is skipped and listed.
OPTIONS = (
    "min_scale=0.25", "min_scale=0.35", "min_scale=0.5", "store=crop", "store=presize", "store=full", "lr=0.0005",
    "lr=0.002",
    "warmup=1", "warmup=2", "optimizer=adamw+wd=0.05", "optimizer=sgd+lr=0.05+wd=0.0005", "label_smoothing=0",
    "label_smoothing=0.1", "wd=0.0001", "mixup=0.4", "cutmix=1.0", "sampler=balanced", "sampler=sqrt",
    "logit_adjust=1.0", "ema=0.998", "progressive=0.5", "drop_path=0.1", "zero_init_residual=True",
    "trivial_augment=True",
    "arch=resnet18", "arch=resnet34")
POSTHOC = ("prior_adjust=0.5", "prior_adjust=1.0", "tta=multicrop")
MINUTES_PER_FOLD = 5.0  # CPU minutes here: ResNet-18, 64 px, 12 epochs, one fold of the 5,311 paintings (issue 16)
REAL_IMAGES = 5311
ARCH_COST = {"resnet18": 1.0, "resnet34": 2.0, "resnet50": 3.0}
TERM = re.compile(r"\+(?=[A-Za-z_])")  # '+' between terms, not the one of '1e+3'


class UnknownOption(ValueError):
    """A row term naming no setting the library has."""


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table: what to train (preset + overrides) and how to score it."""
    name: str
    preset: str = "reference"
    overrides: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)  # ensemble() arguments: prior_adjust, tta
    kind: str = "train"  # 'train', 'posthoc' (ensemble-time on the runs of its training part) or 'plain'
    alias: str = ""  # the preset the row was named after ('best'), expanded into overrides and evaluate

    @property
    def train_name(self) -> str:
        """The training part's canonical name (rows differing only at ensemble time share their runs)."""
        terms = [f"{k}={_fmt(v)}" for k, v in sorted(self.overrides.items())]
        return "+".join([self.preset, *terms])

    def training(self) -> "Row":
        """The row of the training part alone (itself for trained and plain rows)."""
        if self.kind != "posthoc":
            return self
        return Row(self.train_name, self.preset, dict(self.overrides))

    @property
    def train_dir(self) -> str:
        return "plain" if self.kind == "plain" else self.train_name.replace("+", "__").replace("=", "-")

    def describe(self) -> str:
        if self.kind == "plain":
            return "examples/benchmarks/plain_torchvision.py (no artlearn; RandomResizedCrop scale 0.35-1)"
        text = self.train_name
        if self.evaluate:
            text = f"ensemble({', '.join(f'{k}={v}' for k, v in self.evaluate.items())}) on {text} runs"
        return f"{self.alias} = {text}" if self.alias else text


def _fmt(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _parse_value(key: str, raw: str):
    """A term's value, typed as the setting it sets."""
    from artlearn.recipe import Recipe
    if key == "tta":
        if raw not in tta_choices():
            raise ValueError(f"tta={raw}: use one of {list(tta_choices())}")
        return raw
    if key == "prior_adjust":
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{key}={raw}: need a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{key}={raw}: need a number >= 0")
        return value
    if key not in Recipe.names():
        raise UnknownOption(f"unknown option '{key}'; Recipe settings: {', '.join(Recipe.names())}; "
                         "ensemble-time: prior_adjust, tta")
    return parse_setting(key, raw)


def preset_terms(preset: str) -> tuple[dict, dict]:
    """(Recipe overrides, ensemble-time terms) that turn reference into the preset, so equal trainings share runs."""
    from artlearn.recipe import Recipe
    reference, chosen = Recipe.preset("reference"), Recipe.preset(preset)
    changed = {k: v for k, v in chosen.as_dict().items() if v != getattr(reference, k)}
    tta = changed.pop("tta", None)
    return changed, ({"tta": tta} if tta else {})


def parse_row(spec: str) -> Row:
    """A row from its spec: 'reference', 'best', 'plain', or '[preset+]key=value[+key=value...]'.

    A preset is expanded into its settings on top of reference ('best' = reference + the terms of `preset_terms`),
    so 'best' and the row of its options share their trained runs; later terms replace the preset's."""
    spec = spec.strip()
    parts = [p.strip() for p in TERM.split(spec)] if spec else []
    if not parts or not all(parts):
        raise ValueError(f"row '{spec}': empty name or term")
    if parts == ["plain"]:
        return Row("plain", kind="plain")
    preset = parts.pop(0) if parts[0] in PRESETS else "reference"
    overrides, evaluate = preset_terms(preset)
    row = Row(spec, overrides=overrides, evaluate=evaluate, alias=preset if preset != "reference" else "")
    for term in parts:
        if "=" not in term:
            raise ValueError(f"row '{spec}': unknown recipe '{term}'; a row is reference, best, plain or "
                             "[preset+]key=value[+key=value...]")
        key, raw = (s.strip() for s in term.split("=", 1))
        value = _parse_value(key, raw)
        if key in ("prior_adjust", "tta"):
            row.evaluate[key] = value
        else:
            row.overrides[key] = value
    row.kind = "posthoc" if row.evaluate else "train"
    return row


def definition(rec) -> str:
    """What a row (or a jsonl record) trains and scores, as text: records of a redefined row are superseded."""
    if isinstance(rec, Row):
        rec = dict(preset=rec.preset, overrides=rec.overrides, evaluate=rec.evaluate)
    return json.dumps(dict(preset=rec.get("preset", "reference"), overrides=rec.get("overrides") or {},
                           evaluate=rec.get("evaluate") or {}), sort_keys=True, default=str)


def _settings(row: Row, budget: dict) -> dict:
    return {**budget, **row.overrides}


def check_row(row: Row, budget: dict) -> None:
    """ValueError when the library cannot train or score the row at this budget."""
    from artlearn.recipe import Recipe
    if row.kind == "plain":
        if budget["arch"] not in _plain_module().ARCHS:
            raise ValueError(f"plain_torchvision.py trains {list(_plain_module().ARCHS)}, not {budget['arch']}")
        return
    recipe = Recipe.preset(row.preset).replace(**_settings(row, budget)).validate()
    if (row.name != row.preset and not row.evaluate
            and recipe == Recipe.preset(row.preset).replace(**budget)):
        raise ValueError(f"same settings as {row.preset} at this budget")


def plan_rows(args, budget: dict) -> tuple[list, dict]:
    """(rows to run, {spec: why skipped}); rows named by the user that cannot run are an error."""
    explicit = args.rows != "all"
    specs = [s for s in args.rows.split(",")] if explicit else ["reference", "best", "plain", *POSTHOC, *OPTIONS]
    combos = [s for s in args.combos.split(",") if s.strip()] if args.combos else []
    rows, skipped, seen = [], {}, set()
    for spec, named in [(s, explicit) for s in specs] + [(c, True) for c in combos]:
        try:
            row = parse_row(spec)
            check_row(row, budget)
        except ValueError as e:
            if named:
                raise ValueError(f"--{'combos' if spec in combos else 'rows'}: {e}") from None
            skipped[spec] = (f"the library has no such setting (no Recipe field '{str(e).split(chr(39))[1]}')"
                             if isinstance(e, UnknownOption) else str(e))
            continue
        if row.name not in seen:
            seen.add(row.name)
            rows.append(row)
    return rows, skipped


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/artworks"), help="folder with train.csv")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="run directories (scratch, resumable)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where <budget>.jsonl and .md go")
    p.add_argument("--budget", help="name of the budget's files (default <arch>-<size>px-<epochs>ep-bs<bs>[-n<limit>])")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="stratified subset of the training table (0: all of it)")
    p.add_argument("--n-folds", type=int, default=4)
    p.add_argument("--fold-seed", type=int, default=42, help="seed of the one fold assignment every run shares")
    p.add_argument("--folds", default="0", help="folds trained and scored for every row, e.g. 0 or 0,1")
    p.add_argument("--seeds", default="42,7", help="training seeds, at least 2 (init and augmentation only)")
    p.add_argument("--rows", default="all", help="comma-separated row specs (default: every row, see --dry-run)")
    p.add_argument("--combos", default="", help="extra rows, e.g. 'min_scale=0.35+warmup=1,best+warmup=1'")
    p.add_argument("--workers", type=int, help="loader workers (artlearn and the plain script)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--plain-in-process", action="store_true",
                   help="run plain_torchvision.py's main() in this process, not a subprocess (faster for tiny runs)")
    p.add_argument("--max-minutes", type=float, default=0, help="start no new run after this long (0: no limit)")
    p.add_argument("--dry-run", action="store_true", help="print the planned rows and runs, train nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild <budget>.md from the jsonl, train nothing")
    args = p.parse_args(argv)
    args.seeds = seed_list(args.seeds)
    args.folds = fold_list(args.folds, "--folds", args.n_folds) or list(range(args.n_folds))
    for name in ("size", "epochs", "bs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: need a positive number")
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit}: need 0 (all) or a positive number of images")
    return args


def seed_list(text: str) -> list:
    """--seeds: at least 2 distinct integers >= 0 (the spread over seeds is measured); ValueError otherwise."""
    seeds = int_list(text, "--seeds")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: need at least 2 seeds per row, each once (the spread is measured)")
    return seeds


def budget_of(args) -> dict:
    return dict(arch=args.arch, size=args.size, epochs=args.epochs, bs=args.bs)


def budget_name(args) -> str:
    if args.budget:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", args.budget):
            raise ValueError(f"--budget {args.budget!r}: use letters, digits, '.', '_' and '-'")
        return args.budget
    name = f"{args.arch}-{args.size}px-{args.epochs}ep-bs{args.bs}"
    name += f"-n{args.limit}" if args.limit else ""
    return name + (f"-k{args.n_folds}s{args.fold_seed}" if (args.n_folds, args.fold_seed) != (4, 42) else "")


# ---------------------------------------------------------------- the shared data and folds


def load_table(args) -> pd.DataFrame:
    """The training table (optionally a stratified subset) with the one fold assignment every run shares."""
    import artlearn
    df = read_competition(args.data, test=False, folders=False).train
    if args.limit:
        df = artlearn.stratified_subset(df, args.limit, seed=0)
    return artlearn.assign_folds(df, args.n_folds, seed=args.fold_seed).reset_index(drop=True)


def data_fingerprint(df: pd.DataFrame) -> str:
    """Hash of (file stem, artist, fold): the same on any machine, and for re-encoded copies of the images."""
    import hashlib
    keys = sorted(zip((Path(p).stem for p in df["img_path"]), df["artist"].astype(str), df["fold"].astype(int)))
    return hashlib.sha1(repr(keys).encode()).hexdigest()[:16]


def where() -> dict:
    """The machine a run ran on: host, CPU and GPU names, torch."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(node=platform.node(), cpu=cpu, cpus=os.cpu_count(), gpu=gpu, device="cuda" if gpu else "cpu",
                torch=torch.__version__, threads=torch.get_num_threads())


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- results files


def read_jsonl(path: Path) -> list:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{i + 1} is not JSON, ignored", file=sys.stderr)
    return out


def read_records(path: Path) -> list:
    """This script's records in a jsonl: a hand-edited line that is not a usable record is named on stderr and left
    out of the plan and the report (never a traceback)."""
    out = []
    for i, rec in enumerate(read_jsonl(path)):
        problem = _record_problem(rec)
        if problem:
            print(f"warning: {path}: record {i + 1} is not usable ({problem}), ignored", file=sys.stderr)
        else:
            out.append(rec)
    return out


_RECORD_TEXT = ("row", "data_fingerprint", "data", "arch")
_RECORD_NUMBERS = ("accuracy", "f1_macro", "wall_s", "size", "epochs", "bs", "n_folds", "fold_seed", "n_images",
                   "n_artists")


def _record_problem(rec) -> str | None:
    """Why a jsonl line is not a record write_report and the plan can use (a missing key, a value of another type)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    bad = [k for k in _RECORD_TEXT if not isinstance(rec.get(k), str)]
    bad += [k for k in _RECORD_NUMBERS if not is_number(rec.get(k))]
    if not isinstance(rec.get("seed"), int) or isinstance(rec.get("seed"), bool):
        bad.append("seed")
    if not isinstance(rec.get("folds"), list) or not all(isinstance(f, int) for f in rec["folds"]):
        bad.append("folds")
    if not isinstance(rec.get("per_fold"), dict) or not all(isinstance(v, dict) for v in rec["per_fold"].values()):
        bad.append("per_fold")
    base = rec.get("majority_baseline")
    if not isinstance(base, dict) or not isinstance(base.get("artist"), str) or not all(
            is_number(base.get(k)) for k in ("accuracy", "f1_macro")):
        bad.append("majority_baseline")
    if rec.get("train_seconds") is not None and not is_number(rec["train_seconds"]):
        bad.append("train_seconds")
    for key in ("overrides", "evaluate"):
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            bad.append(key)
    return f"missing or malformed {', '.join(repr(k) for k in bad)}" if bad else None


def record_key(rec: dict) -> tuple:
    return rec["row"], int(rec["seed"]), tuple(rec["folds"]), rec["data_fingerprint"], definition(rec)


def equivalents(records: list, rows: list, ctx) -> dict:
    """{key: record} for planned (row, seed)s not in the jsonl whose exact settings are, under another row's name
    (e.g. 'best' and the spelled-out options it is made of): a copy of that record, named and marked `same_as`."""
    have = {record_key(r) for r in records}
    by_settings = {(definition(r), int(r["seed"]), tuple(r["folds"]), r["data_fingerprint"]): r for r in records
                   if r.get("kind") != "plain"}
    found = {}
    for row in rows:
        for seed in ctx.args.seeds:
            key = (row.name, seed, tuple(ctx.args.folds), ctx.fingerprint, definition(row))
            twin = by_settings.get((definition(row), seed, tuple(ctx.args.folds), ctx.fingerprint))
            if row.kind != "plain" and key not in have and twin is not None:
                found[key] = dict(twin, row=row.name, settings=row.describe(), same_as=twin["row"],
                                  trained_folds=[], wall_s=0.0)
    return found


def append_jsonl(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- one run


class Context:
    """Everything the runs share: arguments, table and folds, budget, stores, results files."""

    def __init__(self, args, df):
        self.args, self.df, self.budget = args, df, budget_of(args)
        self.name = budget_name(args)
        self.root = args.out / self.name
        self.jsonl = args.results_dir / f"{self.name}.jsonl"
        self.fingerprint = data_fingerprint(df)
        self.caches = {}

    def cache(self, presize: int):
        """One decode-once store per shorter side, shared by every run of this process."""
        from artlearn.store import PresizeCache
        if presize not in self.caches:
            self.caches[presize] = PresizeCache(int(presize))
        return self.caches[presize]

    def presize(self, row: Row) -> int:
        from artlearn.recipe import Recipe
        from artlearn.store import store_presize
        recipe = Recipe.preset(row.preset).replace(**_settings(row, self.budget))
        return store_presize(recipe.store, recipe.size, recipe.min_scale, len(self.df))

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.root / f"{row.train_dir}-s{seed}"

    def pending_folds(self, row: Row, seed: int) -> list:
        """Folds of --folds not yet complete in the run directory of the row's training part."""
        from artlearn.run import fold_dir, fold_is_complete
        d = self.run_dir(row, seed)
        if row.kind == "plain":
            return [k for k in self.args.folds if not (d / f"fold{k}" / "result.json").is_file()]
        return [k for k in self.args.folds if not fold_is_complete(fold_dir(d, k))]


def _log(prefix):
    return lambda msg: print(f"  [{prefix}] {msg}", flush=True)


def train_run(ctx: Context, row: Row, seed: int):
    """train_kfold for the row's training part on the shared folds (resumes); checks the folds were honoured."""
    import artlearn
    base = row.training()
    run_dir = ctx.run_dir(base, seed)
    run = artlearn.train_kfold(ctx.df, run_dir, n_folds=ctx.args.n_folds, folds=ctx.args.folds, preset=row.preset,
                               seed=seed, tta="flip", workers=ctx.args.workers, progress=False,
                               cache=ctx.cache(ctx.presize(row)), log=_log(f"{base.name} s{seed}"),
                               **_settings(row, ctx.budget))
    written = pd.read_csv(run_dir / "folds.csv", dtype={"img_path": str}, keep_default_na=False)
    given = ctx.df.set_index("img_path")["fold"]
    if not (written.set_index("img_path")["fold"].reindex(given.index) == given).all():
        raise RuntimeError(f"{run_dir}/folds.csv differs from the fold assignment passed to train_kfold")
    return run


def score(true, pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    return dict(accuracy=float(accuracy_score(true, pred)),
                f1_macro=float(f1_score(true, pred, average="macro", zero_division=0)), n_oof=int(len(true)))


def score_train(ctx: Context, row: Row, seed: int) -> dict:
    """A trained row: its OOF predictions (flip-TTA, written by train_kfold) on --folds."""
    run = train_run(ctx, row, seed)
    oof = run.oof[run.oof["fold"].isin(ctx.args.folds)]
    best = run.best
    per_fold = {}
    for k in ctx.args.folds:
        part = oof[oof["fold"] == k]
        b = best.loc[k] if k in best.index else {}
        per_fold[str(k)] = dict(best_epoch=_int(b.get("epoch")), status=b.get("status"),
                                valid_loss=_float(b.get("valid_loss")), valid_acc=_float(b.get("valid_acc")),
                                **score(part["artist"], part["pred"]))
    seconds = sum(float(run.histories[k]["seconds"].sum()) for k in ctx.args.folds if k in run.histories)
    return dict(**score(oof["artist"], oof["pred"]), per_fold=per_fold, train_seconds=seconds,
                run_dir=str(run.path))


def score_posthoc(ctx: Context, row: Row, seed: int) -> dict:
    """An ensemble-time row: each fold of the training part's run re-scored on its own validation rows."""
    import artlearn
    run = train_run(ctx, row, seed)
    tta = row.evaluate.get("tta", "flip")
    trues, preds, per_fold = [], [], {}
    for k in ctx.args.folds:
        valid = ctx.df[ctx.df["fold"] == k]
        probs, vocab = artlearn.ensemble(run, valid, folds=[k], tta=tta, cache=ctx.cache(ctx.presize(row)),
                                         prior_adjust=row.evaluate.get("prior_adjust", 0.0), workers=ctx.args.workers)
        pred = [vocab[i] for i in probs.argmax(1)]
        b = run.best.loc[k]
        per_fold[str(k)] = dict(best_epoch=_int(b.get("epoch")), status=b.get("status"),
                                **score(valid["artist"], pred))
        trues += list(valid["artist"])
        preds += pred
    return dict(**score(trues, preds), per_fold=per_fold, train_seconds=0.0, run_dir=str(run.path))


def _plain_module():
    """plain_torchvision.py (beside this file) as a module: its ARCHS, and its main for --plain-in-process."""
    import importlib.util
    if "plain_torchvision" not in sys.modules:
        spec = importlib.util.spec_from_file_location("plain_torchvision", PLAIN_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["plain_torchvision"] = module
    return sys.modules["plain_torchvision"]


def score_plain(ctx: Context, row: Row, seed: int) -> dict:
    """The plain-torchvision row: one subprocess per fold on the same folds.csv; skips folds already done."""
    run_dir = ctx.run_dir(row, seed)
    folds_csv = ctx.root / "folds.csv"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(ctx.args.threads)} if ctx.args.threads else {}))
    oofs, per_fold, seconds = [], {}, 0.0
    for k in ctx.args.folds:
        out = run_dir / f"fold{k}"
        expect = dict(fold=k, arch=ctx.args.arch, size=ctx.args.size, epochs=ctx.args.epochs, bs=ctx.args.bs,
                      seed=seed)
        result = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else None
        if result is None or any(result.get(key) != v for key, v in expect.items()):
            cmd = [sys.executable, str(PLAIN_SCRIPT), "--train-csv", str(ctx.args.data / "train.csv"),
                   "--folds-csv", str(folds_csv), "--fold", str(k), "--arch", ctx.args.arch,
                   "--size", str(ctx.args.size), "--epochs", str(ctx.args.epochs), "--bs", str(ctx.args.bs),
                   "--lr", "0.001", "--seed", str(seed), "--workers", str(ctx.args.workers or 0), "--out", str(out)]
            print(f"  [plain s{seed}] fold {k}: {' '.join(cmd)}", flush=True)
            if ctx.args.plain_in_process:
                _plain_module().main(cmd[2:])
            else:
                subprocess.run(cmd, check=True, env=env)
            result = json.loads((out / "result.json").read_text())
        oof = pd.read_csv(out / "oof.csv", dtype={"img_path": str, "artist": str, "pred": str}, keep_default_na=False)
        oofs.append(oof)
        per_fold[str(k)] = dict(best_epoch=result["best_epoch"], valid_loss=result["best_valid_loss"],
                                **score(oof["artist"], oof["pred"]))
        seconds += result["seconds"]
    oof = pd.concat(oofs, ignore_index=True)
    return dict(**score(oof["artist"], oof["pred"]), per_fold=per_fold, train_seconds=seconds, run_dir=str(run_dir))


def _short_path(path) -> str:
    """A path relative to the working directory when it lies below it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _int(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else int(v)


def _float(v):
    return None if v is None else float(v)


def run_one(ctx: Context, row: Row, seed: int) -> dict:
    """Train (or resume) and score one (row, seed); the JSON record appended to the jsonl."""
    import artlearn
    from artlearn.run import majority_baseline
    start, trained = time.time(), ctx.pending_folds(row.training(), seed)
    scorer = {"train": score_train, "posthoc": score_posthoc, "plain": score_plain}[row.kind]
    result = scorer(ctx, row, seed)
    rec = dict(budget=ctx.name, row=row.name, kind=row.kind, settings=row.describe(), preset=row.preset,
               overrides=row.overrides, evaluate=row.evaluate, seed=seed, folds=ctx.args.folds,
               n_folds=ctx.args.n_folds, fold_seed=ctx.args.fold_seed, **ctx.budget, limit=ctx.args.limit,
               data=str(ctx.args.data), data_fingerprint=ctx.fingerprint, n_images=len(ctx.df),
               n_artists=int(ctx.df["artist"].nunique()), **result,
               trained_folds=trained, wall_s=time.time() - start,
               majority_baseline=majority_baseline(ctx.df), where=where(),
               finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), artlearn=artlearn.__version__, git=git_commit())
    rec["run_dir"] = _short_path(rec["run_dir"])
    return rec


# ---------------------------------------------------------------- the table


def _stats(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {(v.max() - v.min()) / 2:.4f} ({v.min():.4f}..{v.max():.4f})"


def _delta(rows: dict, ref: dict, metric: str) -> str:
    """Paired (same seed) difference in points: mean (min..max); unpaired mean when no seed is shared."""
    common = sorted(set(rows) & set(ref))
    if common:
        d = np.array([rows[s][metric] - ref[s][metric] for s in common]) * 100
        return f"{d.mean():+.1f} ({d.min():+.1f}..{d.max():+.1f})"
    d = 100 * (np.mean([r[metric] for r in rows.values()]) - np.mean([r[metric] for r in ref.values()]))
    return f"{d:+.1f} (unpaired)"


def _machine(rec: dict) -> str:
    w = rec.get("where") or {}
    return w.get("gpu") or f"CPU {w.get('cpu', '?')} x{w.get('cpus', '?')} ({w.get('node', '?')})"


def criterion(groups: dict, key_of) -> list:
    """Issue 16's done-when check for best vs reference and best vs plain, from mean over seeds."""
    lines = []
    best, ref, plain = (groups.get(key_of(n)) for n in ("best", "reference", "plain"))
    for other, name, need in ((ref, "reference", (3, 5)), (plain, "plain", (0, 0))):
        if not best or not other:
            continue
        parts = []
        for metric, label, margin in (("accuracy", "accuracy", need[0]), ("f1_macro", "macro-F1", need[1])):
            d = 100 * (np.mean([r[metric] for r in best.values()]) - np.mean([r[metric] for r in other.values()]))
            spread = 100 * max(max(r[metric] for r in g.values()) - min(r[metric] for r in g.values())
                               for g in (best, other))
            ok = d >= margin and d > spread
            parts.append(f"{label} {d:+.1f} pts (need >= +{margin} and > seed spread {spread:.1f}: "
                         f"{'yes' if ok else 'no'})")
        lines.append(f"- best vs {name}: " + "; ".join(parts))
    return lines


def _table(groups: dict, order: list, key_of) -> list:
    """Markdown lines of one table: a row per recipe with its seeds, mean ± spread (min..max) and deltas."""
    ref = groups.get(key_of("reference"), {})
    lines = ["| row | settings | seeds | OOF accuracy | OOF macro-F1 | Δ accuracy vs reference | "
             "Δ macro-F1 vs reference | best epoch per fold | min/run | ran on |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        g = groups.get(key_of(name))
        if not g:
            continue
        rs = [g[s] for s in sorted(g)]
        epochs = "; ".join(",".join(str(pf.get("best_epoch")) for pf in r["per_fold"].values()) for r in rs)
        minutes = np.mean([(r["train_seconds"] or r["wall_s"]) / 60 for r in rs])
        deltas = [_delta(g, ref, m) if ref and name != "reference" else "" for m in ("accuracy", "f1_macro")]
        label = f"**{name}**" if name in ("reference", "best", "plain") else name
        same = f" (the runs of row `{rs[0]['same_as']}`)" if rs[0].get("same_as") else ""
        lines.append(f"| {label} | {rs[0]['settings']}{same} | {','.join(map(str, sorted(g)))} | "
                     f"{_stats([r['accuracy'] for r in rs])} | {_stats([r['f1_macro'] for r in rs])} | "
                     f"{deltas[0]} | {deltas[1]} | {epochs} | {minutes:.1f} | "
                     f"{', '.join(sorted({_machine(r) for r in rs}))} |")
    return lines


def write_report(ctx: Context, rows: list, skipped: dict) -> Path:
    """<budget>.md from every line of <budget>.jsonl (the last line of a (row, seed, folds, data) wins)."""
    groups, order = {}, [r.name for r in rows]
    current = {r.name: definition(r) for r in rows}
    records = [r for r in read_records(ctx.jsonl) if current.get(r["row"], definition(r)) == definition(r)]
    for rec in {record_key(r): r for r in records}.values():
        groups.setdefault((rec["row"], tuple(rec["folds"]), rec["data_fingerprint"]), {})[int(rec["seed"])] = rec
        if rec["row"] not in order:
            order.append(rec["row"])
    lines = [f"# Recipe comparison: {ctx.name}", "",
             f"Written by `examples/benchmarks/compare_recipes.py` from `{ctx.jsonl.name}` (one line per run). "
             "Out-of-fold scores only (flip-TTA unless the row names other test-time views; the test set is never "
             "used), one fold assignment shared by every row and seed "
             "(stratified, `assign_folds`), the seed changing model init and augmentation only. Spread: half the "
             "min..max range over seeds. Deltas: paired by seed, in points, mean (min..max).", ""]
    for fp in sorted({k[2] for k in groups}):
        sample = next(r for k, g in groups.items() if k[2] == fp for r in g.values())
        base = sample["majority_baseline"]
        lines += [f"Data `{sample['data']}`: {sample['n_images']} images, {sample['n_artists']} artists "
                  f"(fingerprint {fp}); {sample['arch']}, {sample['size']} px, {sample['epochs']} epochs, "
                  f"batch {sample['bs']}; folds of a {sample['n_folds']}-fold split (seed {sample['fold_seed']}).", ""]
        for folds in sorted({k[1] for k in groups if k[2] == fp}):
            def key_of(name, folds=folds, fp=fp):
                return name, folds, fp

            check = criterion(groups, key_of)
            lines += [f"## folds {', '.join(map(str, folds))}", "", *_table(groups, order, key_of), "",
                      f"Majority class (always {base['artist']}): accuracy {base['accuracy']:.4f}, macro-F1 "
                      f"{base['f1_macro']:.4f} (whole table).", ""]
            lines += ["Issue 16's criterion (mean over seeds):", *check, ""] if check else []
    if skipped:
        lines += ["## Options not run, and why", ""] + [f"- `{s}`: {why}" for s, why in skipped.items()] + [""]
    return atomic_write_text(ctx.jsonl.with_suffix(".md"), "\n".join(lines))


# ---------------------------------------------------------------- plan and main


def fold_minutes(settings: dict, n_images: int) -> float:
    """Rough CPU minutes here for one fold training of `n_images` at these settings (issue 16's 5 min per 64 px
    ResNet-18 12-epoch fold of the real paintings)."""
    return (MINUTES_PER_FOLD * (settings["size"] / 64) ** 2 * settings["epochs"] / 12 * n_images / REAL_IMAGES
            * ARCH_COST.get(settings["arch"], 3.0))


def estimate_minutes(ctx: Context, row: Row, n_folds: int) -> float:
    """Rough CPU minutes here for n_folds fold trainings of a row."""
    return n_folds * fold_minutes(_settings(row, ctx.budget) if row.kind != "plain" else ctx.budget, len(ctx.df))


def plan(ctx: Context, rows: list, done: set) -> list:
    """[(row, seed, status, fold trainings needed)] in run order; prints the plan."""
    tasks, counted = [], set()
    for row in rows:
        for seed in ctx.args.seeds:
            key = (row.name, seed, tuple(ctx.args.folds), ctx.fingerprint, definition(row))
            base = row.training()
            pending = ctx.pending_folds(base, seed)
            if key in done:
                status, n = "done (in the jsonl)", 0
            elif row.kind == "posthoc":
                n = 0 if (base.train_name, seed) in counted else len(pending)
                status = "ensemble-time" + (f", trains {base.train_name} folds {pending} first" if n else "")
            else:
                n = len(pending)
                status = f"train folds {pending}" if pending else "folds complete, score only"
            if key not in done:
                counted.add((base.train_name, seed))
            tasks.append((row, seed, status, n))
    return tasks


def print_plan(ctx: Context, tasks: list, skipped: dict) -> None:
    a = ctx.args
    print(f"budget {ctx.name}: {len(ctx.df)} images, {ctx.df['artist'].nunique()} artists, {a.arch}, {a.size} px, "
          f"{a.epochs} epochs, batch {a.bs}; folds {a.folds} of a {a.n_folds}-fold split (seed {a.fold_seed}, "
          f"fingerprint {ctx.fingerprint}); seeds {a.seeds}")
    print(f"runs in {ctx.root}; results {ctx.jsonl} and {ctx.jsonl.with_suffix('.md')}")
    for row, seed, status, _ in tasks:
        print(f"  {row.name:<34} seed {seed:<4} {row.kind:<8} {status}")
    todo = [t for t in tasks if not t[2].startswith("done")]
    trainings = sum(t[3] for t in tasks)
    minutes = sum(estimate_minutes(ctx, t[0], t[3]) for t in tasks)
    print(f"{len(tasks)} runs planned, {len(todo)} to do, {trainings} fold trainings: about {minutes:.1f} CPU minutes "
          f"on this 2-core machine (from {MINUTES_PER_FOLD:g} min per 64 px ResNet-18 12-epoch fold of "
          f"{REAL_IMAGES} images; far less on a GPU)")
    for spec, why in skipped.items():
        print(f"  skipped {spec}: {why}")


def main(argv=None) -> list | int:
    """Plan, then train and score every (row, seed) not in the jsonl yet; returns the records written now, or 2 after
    a bad argument or input (one `error:` line on stderr, `run_cli`)."""
    return run_cli(_main, argv)


def _main(argv=None) -> list:
    """main's work (errors reported by run_cli)."""
    args = parse_args(argv)
    budget = budget_of(args)
    rows, skipped = plan_rows(args, budget)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    ctx = Context(args, load_table(args))
    records = read_records(ctx.jsonl)
    done = {record_key(r) for r in records} | set(equivalents(records, rows, ctx))
    tasks = plan(ctx, rows, done)
    print_plan(ctx, tasks, skipped)
    if args.dry_run:
        return []
    if args.report_only:
        print(f"wrote {write_report(ctx, rows, skipped)}")
        return []
    ctx.root.mkdir(parents=True, exist_ok=True)
    folds = ctx.df[[c for c in ("id", "img_path", "artist", "fold") if c in ctx.df.columns]]
    folds.to_csv(ctx.root / "folds.csv", index=False)
    started, written = time.time(), []
    for rec in equivalents(records, rows, ctx).values():
        append_jsonl(ctx.jsonl, rec)
        written.append(rec)
        print(f"{rec['row']} seed {rec['seed']}: same settings as row {rec['same_as']} (in the jsonl), its scores "
              "recorded, nothing trained")
    for row, seed, status, _ in tasks:
        if status.startswith("done"):
            continue
        if args.max_minutes and time.time() - started > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes:g} spent: stopping before {row.name} seed {seed}; rerun to go on")
            break
        print(f"{row.name} seed {seed}: {status}", flush=True)
        rec = run_one(ctx, row, seed)
        append_jsonl(ctx.jsonl, rec)
        written.append(rec)
        print(f"{row.name} seed {seed}: OOF accuracy {rec['accuracy']:.4f}  macro-F1 {rec['f1_macro']:.4f}  "
              f"({rec['wall_s'] / 60:.1f} min)", flush=True)
        write_report(ctx, rows, skipped)
    print(f"wrote {write_report(ctx, rows, skipped)}")
    return written


if __name__ == "__main__":
    sys.exit(2 if main() == 2 else 0)
