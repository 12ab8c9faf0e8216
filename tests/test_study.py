"""examples/study.py end to end on tiny synthetic data, its table functions, and examples/gpu_run.sh's syntax."""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import artlearn as al

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "study.py"
GPU_SCRIPT = ROOT / "examples" / "gpu_run.sh"
TINY = ["--grids", "pool", "--folds", "0", "--n-folds", "2", "--epochs", "1", "--size", "32", "--bs", "8",
        "--arch", "resnet18", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(args, cwd, timeout=300):
    """Run the study script as a user does; the completed process keeps its output for assertion messages."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _load_study():
    """examples/study.py imported as a module."""
    spec = importlib.util.spec_from_file_location("study_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mtimes(out: Path) -> dict:
    """mtime of every weights and history file under a study folder."""
    files = [*out.glob("*/fold*/best.safetensors"), *out.glob("*/fold*/history.csv")]
    return {str(f): f.stat().st_mtime_ns for f in files}


@pytest.fixture(scope="module")
def study_mod():
    return _load_study()


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One tiny study (pool grid: avg and gem, fold 0 of 2, one epoch, with the test set) and its first table."""
    root = tmp_path_factory.mktemp("study")
    data = al.make_synthetic_artworks(root / "data", n_artists=4, n_train=40, n_test=8, seed=1)
    out = root / "out"
    first = _run(["--data", str(data), "--out", str(out), *TINY, "--test"], root)
    assert first.returncode == 0, first.stdout + first.stderr
    return SimpleNamespace(root=root, data=data, out=out, first=first, table=pd.read_csv(out / "results.csv"),
                           mtimes=_mtimes(out))


def test_one_row_per_cell_with_finite_scores(done):
    t = done.table
    assert len(t) == 2 and set(t["grid"]) == {"pool"} and sorted(t["setting"]) == ["avg", "gem"]
    assert (t["status"] == "trained").all(), t
    for col in ("oof_accuracy", "oof_f1_macro", "mean_best_valid_acc", "test_accuracy"):
        assert t[col].map(math.isfinite).all() and t[col].between(0, 1).all(), (col, t[col])
    assert (t["images_per_s"] > 0).all() and (t["wall_min"] > 0).all()
    assert t["folds"].astype(str).tolist() == ["0", "0"] and t["epochs"].astype(str).tolist() == ["1", "1"]
    md = (done.out / "results.md").read_text().strip().splitlines()
    assert len(md) == 2 + 2 and md[0].startswith("| cell | grid | setting")
    assert "| cell | grid | setting" in done.first.stdout  # the table is printed at the end


def test_each_cell_is_a_run_directory_with_its_pool(done):
    test_ids = pd.read_csv(done.data / "test.csv")["id"].tolist()
    for cell, setting in zip(done.table["cell"], done.table["setting"]):
        run = al.load_run(done.out / cell)
        assert run.config["pool"] == setting and run.config["arch"] == "resnet18" and run.config["size"] == 32
        assert run.config["n_folds"] == 2 and run.config["seed"] == 42 and run.folds == [0]
        assert pd.read_csv(done.out / cell / "submission.csv")["id"].tolist() == test_ids
    folds = [pd.read_csv(done.out / c / "folds.csv")["fold"].tolist() for c in done.table["cell"]]
    assert folds[0] == folds[1]  # every cell uses the same folds


def test_grid_figure_is_a_png(done):
    assert (done.out / "pool.png").read_bytes()[:8] == PNG


def test_table_numbers_come_from_the_run_directory(done, study_mod):
    path = done.out / done.table["cell"][0]
    run = al.load_run(path)
    history = pd.read_csv(path / "fold0" / "history.csv")
    n_train = int((pd.read_csv(path / "folds.csv")["fold"] != 0).sum())
    seconds, images = study_mod.training_throughput(run, [0])
    assert images == n_train * len(history) == 20 and seconds == pytest.approx(history["seconds"].sum())
    cell = study_mod.Cell("pool", "avg", tuple(sorted(dict(run.config, preset="reference").items())))
    row = study_mod.cell_row(cell, run, [0], "trained")
    assert row["images_per_s"] == pytest.approx(images / seconds)
    assert row["wall_min"] == pytest.approx(seconds / 60)
    oof = pd.read_csv(path / "fold0" / "oof.csv")
    assert row["oof_accuracy"] == pytest.approx((oof["artist"] == oof["pred"]).mean())
    assert row["best_valid_acc"] == f"0:{run.best.loc[0, 'valid_acc']:.4f}"
    assert row["oof_accuracy"] == pytest.approx(done.table["oof_accuracy"][0])
    md = study_mod.markdown_table(study_mod.results_table([row, study_mod.empty_row(cell, "skipped: budget")]))
    lines = md.strip().splitlines()
    assert len(lines) == 4 and "skipped: budget" in lines[3] and "nan" not in md


def test_rerun_retrains_nothing(done):
    rerun = _run(["--data", str(done.data), "--out", str(done.out), *TINY], done.root)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count("not retrained") == 2, rerun.stdout
    assert _mtimes(done.out) == done.mtimes and len(done.mtimes) == 4
    again = pd.read_csv(done.out / "results.csv")
    assert (again["status"] == "resumed: nothing retrained").all(), again
    assert again["oof_accuracy"].tolist() == done.table["oof_accuracy"].tolist()


def test_budget_zero_trains_no_cell_and_says_so(done, study_mod, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert study_mod.main(["--data", str(done.data), "--out", str(out), *TINY, "--budget-minutes", "0"]) == 0
    said = capsys.readouterr().out
    assert said.count(": not started") == 2 and "--budget-minutes 0: stopped" in said, said
    assert "2 run(s) not started" in said, said
    assert not list(out.glob("*/config.json"))
    assert (pd.read_csv(out / "results.csv")["status"] == "skipped: budget").all()


def test_budget_zero_still_reports_finished_cells(done, study_mod, capsys):
    before = _mtimes(done.out)
    assert study_mod.main(["--data", str(done.data), "--out", str(done.out), *TINY, "--budget-minutes", "0"]) == 0
    said = capsys.readouterr().out
    assert said.count("already finished on disk") == 2 and "not started" not in said, said
    t = pd.read_csv(done.out / "results.csv")
    assert (t["status"] == "on disk (budget spent)").all() and t["oof_accuracy"].between(0, 1).all()
    assert _mtimes(done.out) == before and (done.out / "pool.png").read_bytes()[:8] == PNG


def _refused(study_mod, capsys, argv, part) -> str:
    """main(argv) exits with status 2 and one line on stderr holding `part` (no traceback)."""
    assert study_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(part, err), err
    return err


def test_bad_flags_are_refused_before_anything_is_written(study_mod, tmp_path, capsys):
    out = tmp_path / "never"
    _refused(study_mod, capsys, ["--grids", "pool,depth", "--out", str(out)], "valid grids: arch, size, pool, preset")
    _refused(study_mod, capsys, ["--grids", "bogus", "--out", str(out)], r"unknown grid\(s\) \['bogus'\]")
    _refused(study_mod, capsys, ["--grids", "", "--out", str(out)], "name at least one grid")
    _refused(study_mod, capsys, ["--folds", "2", "--n-folds", "2", "--out", str(out)], r"use folds 0\.\.1")
    _refused(study_mod, capsys, ["--budget-minutes", "-1", "--out", str(out)], "minutes >= 0")
    assert not out.exists()


def test_a_run_made_with_other_settings_is_refused(done, study_mod, capsys):
    other = [*TINY[:TINY.index("--epochs")], "--epochs", "2", *TINY[TINY.index("--epochs") + 2:]]
    _refused(study_mod, capsys, ["--data", str(done.data), "--out", str(done.out), *other],
             "made with other settings.*epochs: 1 there, 2 now")


def test_grids_hold_the_base_setting_and_share_the_base_run(study_mod):
    assert study_mod.grid_values("arch", "resnet18") == ["resnet18", "resnet34", "resnet50", "resnet101"]
    assert study_mod.grid_values("size", 288) == [224, 288, 320]
    assert study_mod.grid_values("size", 32) == [32, 224, 288, 320]
    base = dict(study_mod.REPORT_BASE, epochs=None, bs=None, lr=None)
    cells = study_mod.study_cells(["arch", "size", "pool", "preset"], base)
    names = [c.name for c in cells]
    assert len(cells) == 10 and len(set(names)) == 7 and names.count("reference-resnet50-288-avg") == 4


def test_gpu_script_is_valid_bash_and_packs_no_weights():
    done = subprocess.run(["bash", "-n", str(GPU_SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = GPU_SCRIPT.read_text()
    assert "results.tar.gz" in text and "--budget-minutes" in text and "timeout" in text
    pack = text[text.index("pack() {"):text.index("\n}\n", text.index("pack() {"))]
    assert "safetensors" not in pack and "-name" in pack
