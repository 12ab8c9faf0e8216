"""examples/benchmarks/: compare_recipes.py, plain_torchvision.py, fold_selection_study.py and budget_table.py at
tiny settings on tiny data."""
import ast
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
TINY = ["--size", "32", "--epochs", "1", "--bs", "16", "--threads", "1"]
ROWS = ["reference", "prior_adjust=1.0", "plain"]
COMBO = "min_scale=0.35+label_smoothing=0.1"


def load(name):
    """An example script as a module (its main(argv) is called in this process)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import artlearn
    return artlearn.make_synthetic_artworks(tmp_path_factory.mktemp("syn") / "data", n_artists=4, n_train=40,
                                            n_test=8, seed=1)


@pytest.fixture(scope="module")
def compared(data, tmp_path_factory):
    """One tiny sweep: 4 rows x 2 seeds (the plain row in this process)."""
    tmp = tmp_path_factory.mktemp("compare")
    argv = ["--data", str(data), "--out", str(tmp / "runs"), "--results-dir", str(tmp / "res"), *TINY,
            "--rows", ",".join(ROWS), "--combos", COMBO, "--seeds", "42,7", "--plain-in-process"]
    records = load("compare_recipes").main(argv)
    budget = "resnet18-32px-1ep-bs16"
    return dict(argv=argv, records=records, tmp=tmp, jsonl=tmp / "res" / f"{budget}.jsonl",
                md=tmp / "res" / f"{budget}.md", root=tmp / "runs" / budget)


def test_jsonl_has_one_line_per_run_with_finite_scores(compared):
    lines = [json.loads(line) for line in compared["jsonl"].read_text().splitlines()]
    assert len(lines) == len(compared["records"]) == 8
    assert {(r["row"], r["seed"]) for r in lines} == {(n, s) for n in ROWS + [COMBO] for s in (42, 7)}
    for r in lines:
        for key in ("row", "kind", "overrides", "seed", "folds", "accuracy", "f1_macro", "per_fold", "wall_s",
                    "where", "data_fingerprint", "n_images"):
            assert key in r, key
        assert r["folds"] == [0] and r["n_images"] == 40
        for score in (r["accuracy"], r["f1_macro"], *(f["accuracy"] for f in r["per_fold"].values())):
            assert math.isfinite(score) and 0 <= score <= 1
        assert r["per_fold"]["0"]["best_epoch"] == 0 and r["wall_s"] > 0
        assert r["where"]["node"] and r["where"]["device"] == "cpu"
    by = {(r["row"], r["seed"]): r for r in lines}
    assert by[(COMBO, 42)]["overrides"] == {"min_scale": 0.35, "label_smoothing": 0.1}
    assert by[("prior_adjust=1.0", 42)]["kind"] == "posthoc" and by[("prior_adjust=1.0", 42)]["trained_folds"] == []
    assert by[("reference", 42)]["trained_folds"] == [0]


def test_markdown_table_has_one_row_per_recipe_with_mean_and_spread(compared):
    text = compared["md"].read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [line.split("|")[1].strip().strip("*") for line in table]
    assert names == [*ROWS, COMBO]
    stat = r"\d\.\d{4} ± \d\.\d{4} \(\d\.\d{4}\.\.\d\.\d{4}\)"
    for line in table:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[2] == "7,42" and re.fullmatch(stat, cells[3]) and re.fullmatch(stat, cells[4]), line
        if cells[0] != "**reference**":
            assert re.fullmatch(r"[+-]\d+\.\d \([+-]\d+\.\d\.\.[+-]\d+\.\d\)", cells[5]), line
    assert "Majority class" in text


def test_every_run_and_the_plain_script_use_the_same_folds(compared):
    root = compared["root"]
    folds = pd.read_csv(root / "folds.csv")
    valid = set(folds.loc[folds["fold"] == 0, "img_path"])
    for seed in (42, 7):
        artlearn_valid = set(pd.read_csv(root / f"reference-s{seed}" / "fold0" / "oof.csv")["img_path"])
        plain_valid = set(pd.read_csv(root / f"plain-s{seed}" / "fold0" / "oof.csv")["img_path"])
        assert artlearn_valid == plain_valid == valid
        written = pd.read_csv(root / f"reference-s{seed}" / "folds.csv").set_index("img_path")["fold"]
        assert written.reindex(folds["img_path"]).tolist() == folds["fold"].tolist()  # the given folds, honoured


def _imports(nodes) -> set:
    """The top-level packages every import statement under `nodes` names."""
    found = {a.name.split(".")[0] for node in nodes for n in ast.walk(node) if isinstance(n, ast.Import)
             for a in n.names}
    return found | {n.module.split(".")[0] for node in nodes for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}


def test_plain_script_imports_no_artlearn_and_is_deterministic(compared, data, tmp_path):
    tree = ast.parse((EXAMPLES / "plain_torchvision.py").read_text())
    guard = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert len(guard) == 1  # the command line: the one-line error exit, artlearn.cli.run_cli, and nothing else
    assert [(n.module, [a.name for a in n.names]) for n in ast.walk(guard[0]) if isinstance(n, ast.ImportFrom)] == [
        ("artlearn.cli", ["run_cli"])] and _imports(guard) == {"artlearn"}
    imported = _imports([n for n in tree.body if n is not guard[0]])  # the training: no artlearn at all
    assert "artlearn" not in imported and {"torch", "torchvision"} <= imported
    plain = load("plain_torchvision")
    argv = ["--train-csv", str(data / "train.csv"), "--folds-csv", str(compared["root"] / "folds.csv"),
            "--size", "32", "--epochs", "1", "--bs", "16", "--seed", "42"]
    plain.main([*argv, "--out", str(tmp_path / "a")])
    first = json.loads((tmp_path / "a" / "result.json").read_text())
    again = json.loads((compared["root"] / "plain-s42" / "fold0" / "result.json").read_text())
    assert first["history"] == again["history"] and first["accuracy"] == again["accuracy"]


def test_rerun_trains_nothing_and_runs_resume_without_the_jsonl(compared, tmp_path, capsys):
    compare = load("compare_recipes")
    before = compared["jsonl"].read_text()
    weights = compared["root"] / "reference-s42" / "fold0" / "best.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert compare.main(compared["argv"]) == []  # every (row, seed) already in the jsonl
    assert compared["jsonl"].read_text() == before
    compared["md"].unlink()
    assert compare.main([*compared["argv"], "--report-only"]) == [] and "| **plain** |" in compared["md"].read_text()
    argv = compared["argv"][:compared["argv"].index("--rows")] + ["--rows", "reference,plain", "--seeds", "42,7",
                                                                   "--plain-in-process"]
    argv[argv.index("--results-dir") + 1] = str(tmp_path / "res")
    records = compare.main(argv)  # no jsonl there: the complete run directories are scored, not retrained
    assert len(records) == 4 and all(r["trained_folds"] == [] for r in records)
    assert weights.stat().st_mtime_ns == mtime
    assert "trained in" not in capsys.readouterr().out


def test_dry_run_plans_every_row_and_trains_nothing(data, tmp_path, capsys):
    out = tmp_path / "runs"
    assert load("compare_recipes").main(["--data", str(data), "--out", str(out), "--results-dir",
                                         str(tmp_path / "res"), *TINY, "--epochs", "3", "--dry-run",
                                         "--combos", "min_scale=0.35+warmup=0"]) == []
    text = capsys.readouterr().out
    for row in ("reference", "best", "plain", "prior_adjust=1.0", "tta=multicrop", "min_scale=0.35", "sampler=sqrt",
                "arch=resnet34", "min_scale=0.35+warmup=0"):
        assert re.search(rf"^\s+{re.escape(row)}\s+seed 42", text, re.M), row
    assert "runs planned" in text and "skipped arch=resnet18: same settings as reference" in text
    assert not out.exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("extra, message", [
    (["--rows", "reference,fancy"], "unknown recipe 'fancy'"),
    (["--combos", "warp=1"], "unknown option 'warp'"),
    (["--combos", "min_scale=abc"], "min_scale=abc: need a float"),
    (["--combos", "optimizer=rmsprop"], "optimizer='rmsprop'"),
    (["--seeds", "42,x"], "--seeds '42,x'"),
    (["--seeds", "42"], "at least 2 seeds"),
    (["--folds", "5"], "--folds '5': with --n-folds 4 use folds 0..3"),
])
def test_bad_arguments_fail_before_training(data, tmp_path, capsys, extra, message):
    out = tmp_path / "runs"
    assert load("compare_recipes").main(["--data", str(data), "--out", str(out), "--results-dir", str(tmp_path),
                                         *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_fold_selection_study(data, tmp_path, capsys):
    study = load("fold_selection_study")
    argv = ["--data", str(data), "--out", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res"), *TINY,
            "--n-folds", "2", "--seeds", "42,7"]
    assert study.main([*argv, "--dry-run"]) == [] and not (tmp_path / "runs").exists()
    assert "4 fold trainings" in capsys.readouterr().out
    assert study.main([*argv, "--recipe", "best", "--dry-run"]) == []  # best's multicrop TTA is scored, not refused
    assert "tta-multicrop" in capsys.readouterr().out
    records = study.main(argv)
    assert [r["seed"] for r in records] == [42, 7]
    for r in records:
        assert r["n_holdout"] + r["n_train"] == 40 and 4 <= r["n_holdout"] <= 8
        assert set(r["selected"]) <= set(r["folds"]) == {0, 1}
        for strategy in study.STRATEGIES:
            assert all(0 <= r["results"][strategy][m] <= 1 for m in ("accuracy", "f1_macro"))
    md = (tmp_path / "res" / "fold_selection-resnet18-32px-1ep-bs16.md").read_text()
    assert md.count("\n| 42 |") == 1 and md.count("\n| 7 |") == 1 and "| selected |" in md
    assert study.main(argv) == []  # resumed: both seeds are in the jsonl
    assert study.main([*argv, "--seeds", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seeds '3'") and "at least 2" in err and err.count("\n") == 1, err


def test_best_row_is_its_settings_and_shares_their_runs():
    from artlearn.recipe import BEST, REFERENCE
    compare = load("compare_recipes")
    best = compare.parse_row("best")
    changed = {k: v for k, v in BEST.as_dict().items() if v != getattr(REFERENCE, k)}
    assert {**best.overrides, **best.evaluate} == changed and best.preset == "reference"
    spelled_out = compare.parse_row("+".join(f"{k}={v}" for k, v in sorted(changed.items())))
    assert best.training().train_dir == spelled_out.training().train_dir  # one training for both rows
    assert best.describe().startswith("best = ")
    assert compare.parse_row("best+tta=flip").evaluate["tta"] == "flip"  # a later term replaces the preset's


def test_a_redefined_row_does_not_reuse_old_records():
    compare = load("compare_recipes")
    rec = dict(row="best", seed=42, folds=[0], data_fingerprint="f", preset="reference",
               overrides={"min_scale": 0.25}, evaluate={})
    now = compare.parse_row("best")
    assert compare.record_key(rec)[-1] != compare.definition(now)
    same = dict(rec, overrides=dict(now.overrides), evaluate=dict(now.evaluate))
    assert compare.record_key(same)[-1] == compare.definition(now)


def test_a_row_with_the_settings_of_a_done_row_reuses_its_scores(compared, capsys):
    argv = list(compared["argv"])
    argv[argv.index("--rows") + 1] = "label_smoothing=0.1+min_scale=0.35"  # COMBO's settings, spelled otherwise
    argv[argv.index("--combos") + 1] = ""
    written = load("compare_recipes").main(argv)
    assert [(r["row"], r["same_as"], r["trained_folds"]) for r in written] == [
        ("label_smoothing=0.1+min_scale=0.35", COMBO, [])] * 2
    by_seed = {r["seed"]: r for r in compared["records"] if r["row"] == COMBO}
    assert all(r["accuracy"] == by_seed[r["seed"]]["accuracy"] for r in written)
    assert "trained in" not in capsys.readouterr().out
    assert load("compare_recipes").main(argv) == []  # now in the jsonl under its own name


def test_plain_script_schedule_is_torchs_cosine_annealing(data, tmp_path):
    """The plain script's per-epoch learning rates equal torch's CosineAnnealingLR (T_max = the epochs)."""
    import torch
    plain = load("plain_torchvision")
    plain.main(["--train-csv", str(data / "train.csv"), "--size", "16", "--epochs", "4", "--bs", "16",
                "--out", str(tmp_path / "p")])
    lrs = [row["lr"] for row in json.loads((tmp_path / "p" / "result.json").read_text())["history"]]
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    oracle = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    expected = []
    for _ in range(4):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        oracle.step()
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_plain_script_with_minutes_plans_its_epochs(data, tmp_path):
    plain = load("plain_torchvision")
    assert plain.epochs_that_fit(seconds_left=100.0, epoch_s=10.0) == 1 + 9  # half an epoch kept for the TTA pass
    assert plain.epochs_that_fit(seconds_left=3.0, epoch_s=10.0) == 1
    plain.main(["--train-csv", str(data / "train.csv"), "--size", "16", "--bs", "16", "--minutes", "0.2",
                "--out", str(tmp_path / "p")])
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    assert result["minutes"] == 0.2 and result["epochs"] == len(result["history"]) >= 1
    assert math.isfinite(result["accuracy"])


def test_budget_table_runs_each_row_with_the_same_minutes(tmp_path):
    """examples/budget_table.py: artlearn's fast row, the plain script and fastai's own baseline, one JSON line each."""
    import artlearn
    data = artlearn.make_synthetic_artworks(tmp_path / "data", n_artists=4, n_train=120, n_test=4, seed=2,
                                            min_size=40, max_size=72)  # fold 0 trains on 2+ batches of 32
    table = load("budget_table")
    assert table.main(["--data", str(data), "--minutes", "0.25", "--rows", "fast,plain,fastai", "--seeds", "3",
                       "--out", str(tmp_path / "b")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in lines) == ["fast", "fastai", "plain"]
    assert all(r["minutes"] == 0.25 and r["epochs"] >= 1 and math.isfinite(r["accuracy"]) for r in lines)
    md = (tmp_path / "b" / "results.md").read_text()
    assert all(f"| {row} | 3 |" in md for row in ("fast", "fastai", "plain"))
    folds = pd.read_csv(tmp_path / "b" / "folds.csv")
    fastai_oof = pd.read_csv(tmp_path / "b" / "fastai-s3" / "oof.csv")
    plain_oof = pd.read_csv(tmp_path / "b" / "plain-s3" / "oof.csv")
    valid = set(folds.loc[folds["fold"] == 0, "img_path"].map(lambda p: str(Path(p).resolve())))
    assert set(fastai_oof["img_path"].map(lambda p: str(Path(p).resolve()))) == valid  # the same fold 0 for all
    assert set(plain_oof["img_path"]) == valid


def test_budget_table_rows_are_specs_checked_before_training(tmp_path):
    """A row is preset[+key=value...] (each candidate alone on a base), the old names still read; a bad spec is a
    ValueError naming it before any run or folder is made."""
    table = load("budget_table")
    assert table.row_settings("fast") == {"preset": "fast"}
    assert table.row_settings("fast+size=48+ema=0.998+lr=1e-3") == dict(preset="fast", size=48, ema=0.998, lr=1e-3)
    assert table.row_settings("fast+sgd") == dict(preset="fast", optimizer="sgd", lr=0.05, wd=0.0005)
    for bad, says in [("quick+size=48", "not a preset"), ("fast+size", "not key=value"),
                      ("fast+sizes=48", "no such setting"), ("fast+arch=resnet7", "arch")]:
        with pytest.raises(ValueError, match=says):
            table.row_settings(bad)
        assert table.main(["--data", str(tmp_path / "nowhere"), "--minutes", "1", "--rows", f"fast,{bad}",
                           "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_budget_table_pairs_each_row_with_the_first_by_seed(tmp_path):
    """results.md's last column: a row's accuracy minus the first row's, seed by seed (mean, min..max)."""
    table = load("budget_table")
    runs = [dict(row=r, seed=s, accuracy=a, f1_macro=0.1, epochs=3, process_wall_s=9.0)
            for r, s, a in [("base", 1, 0.30), ("base", 2, 0.40), ("cand", 1, 0.35), ("cand", 2, 0.41)]]
    table.write_table(tmp_path, runs, base="base")
    md = (tmp_path / "results.md").read_text()
    assert "accuracy vs base, paired" in md
    assert "| cand | 1,2 | 0.3800 (0.3500..0.4100) |" in md and "+0.0300 (+0.0100..+0.0500) |" in md
