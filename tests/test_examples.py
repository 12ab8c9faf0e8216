"""examples/run_kfold.py end to end on tiny settings, as a user runs it; two measuring harnesses of
examples/benchmarks/ (bench.py, bench_procs.py) at tiny settings."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

import artlearn as al

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_kfold.py"
BENCHMARKS = ROOT / "examples" / "benchmarks"


def _run(args, cwd, timeout=300):
    """Run the example script; return the completed process (output kept for the assertion message)."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A tiny competition folder."""
    return al.make_synthetic_artworks(tmp_path_factory.mktemp("ex") / "data", n_artists=4, n_train=48, n_test=10,
                                      seed=1)


def test_run_kfold_on_a_data_folder(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), "--arch", "resnet18", "--size", "32", "--epochs", "1", "--bs", "8",
            "--n-folds", "2", "--limit", "40", "--out", str(tmp_path / "run"), "--no-progress"]
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    sub = pd.read_csv(tmp_path / "run" / "submission.csv")
    test = pd.read_csv(tiny_data / "test.csv")
    assert sub["id"].tolist() == test["id"].tolist()
    assert set(sub["artist"]) <= set(pd.read_csv(tiny_data / "train.csv")["artist"])
    for text in ("out-of-fold", "majority-class baseline", "ensemble folds", "submission:", "--limit 40"):
        assert text in done.stdout, text
    assert (tmp_path / "run" / "history.png").is_file()
    rerun = _run(args, tmp_path)
    assert rerun.returncode == 0 and rerun.stdout.count("not retrained") == 2, rerun.stdout + rerun.stderr


def test_run_kfold_preset_keeps_its_settings_unless_a_flag_is_given(tiny_data, tmp_path):
    """--preset best without --tta scores and submits with best's multicrop views (an absent flag is not 'none')."""
    from artlearn.recipe import BEST
    base = ["--data", str(tiny_data), "--arch", "resnet18", "--size", "16", "--epochs", "1", "--bs", "8",
            "--n-folds", "2", "--folds", "0", "--limit", "40", "--no-progress", "--preset", "best"]
    done = _run([*base, "--out", str(tmp_path / "best")], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert (config["tta"], config["lr"], config["min_scale"]) == (BEST.tta, BEST.lr, BEST.min_scale) != (
        "none", 1e-3, 0.08)
    assert f"tta={BEST.tta}" in done.stdout
    plain = _run([*base, "--tta", "none", "--lr", "0.002", "--out", str(tmp_path / "flags")], tmp_path)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    config = json.loads((tmp_path / "flags" / "config.json").read_text())
    assert (config["tta"], config["lr"], config["min_scale"]) == ("none", 0.002, BEST.min_scale)


TINY = ["--arch", "resnet18", "--size", "16", "--bs", "8", "--n-folds", "2"]


def test_help_is_quick_grouped_plain_and_shows_what_will_run(tmp_path):
    code = ("import runpy, sys\nsys.argv = ['run_kfold.py', *sys.argv[1:]]\ntry:\n"
            f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('imported:', 'torch' in sys.modules, 'fastai' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"COLUMNS": "100"}

    def helped(*args):
        done = subprocess.run([sys.executable, "-c", code, *args, "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stderr == "", done.stderr  # no warning before the help
        return done.stdout

    demo, best = helped(), helped("--preset", "best", "--data", "somewhere")
    assert demo.rstrip().endswith("imported: False False")  # --help loads neither torch nor fastai
    for group in ("run:", "folds and ensemble:", "data settings:", "model settings:", "optimisation settings:",
                  "extras settings:", "evaluation settings:"):
        assert f"\n{group}\n" in demo, group
    assert max(len(line) for line in demo.splitlines()) <= 100
    for word in ("issue", "v0.1", "report's", "the report"):
        assert word not in demo.lower() and word not in best.lower(), word
    flat = {which: " ".join(text.split()) for which, text in (("demo", demo), ("best", best))}
    assert "--size INT training resolution in pixels [default: 64]" in flat["demo"]  # the demo's size
    assert "[default: 288]" in flat["best"] and "base learning rate [default: 0.0005]" in flat["best"]
    assert "--preset NAME reference:" in flat["demo"] and "best:" in flat["demo"]


def test_one_flag_per_recipe_field_as_the_docs_say():
    from artlearn.recipe import Recipe
    spec = __import__("importlib.util").util.spec_from_file_location("run_kfold_count", SCRIPT)
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser_flags = module.flag_names()
    assert len([f for f in parser_flags if f.replace("-", "_")[2:] in Recipe.names()]) == len(Recipe.names())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "one flag per `al.Recipe` field" in readme  # no count to restate when a setting is added


def test_output_fits_a_log_and_default_outs_do_not_collide(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"MPLBACKEND": "Agg"}
    runs = []
    for epochs in ("1", "2"):
        runs.append(subprocess.run([sys.executable, str(SCRIPT), "--data", str(tiny_data), *TINY, "--folds", "0",
                                    "--epochs", epochs], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stdout + runs[-1].stderr
    first = runs[0]
    assert "\r" not in first.stdout and "\u2588" not in first.stdout  # no bars in a log file
    header = "epoch  train_loss  valid_loss  train_acc  valid_acc  f1_macro        lr  seconds"
    assert header in first.stdout
    assert first.stderr.strip() == "", first.stderr  # no FutureWarning, no echoed library source line
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(name.startswith(f"{tiny_data.name}-reference-") for name in folders)


def test_ctrl_c_is_one_line_and_the_same_command_resumes(tiny_data, tmp_path):
    import signal
    import time
    args = [sys.executable, str(SCRIPT), "--data", str(tiny_data), *TINY, "--epochs", "6", "--out", "run",
            "--no-progress"]
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = tmp_path / "run" / "fold0" / "history.csv"
    deadline = time.time() + 240
    while time.time() < deadline and not (history.is_file() and len(history.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    rows = len(history.read_text().splitlines()) - 1
    assert err.strip().splitlines() == [f"interrupted in fold 0, epoch {rows}; rerun the same command to resume"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(json.loads((tmp_path / "run" / f"fold{k}" / "meta.json").read_text())["complete"] for k in (0, 1))


def test_resume_without_a_run_is_an_error(tiny_data, tmp_path):
    done = _run(["--data", str(tiny_data), "--resume", "--out", str(tmp_path / "none")], tmp_path)
    assert done.returncode == 2 and "no run to resume" in done.stderr


# ---------------------------------------------------------------- refusals in-process, before anything is written


@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    """run_kfold.main in this process (cwd tmp_path): (exit status, stdout, stderr); the root logger is restored."""
    import importlib.util
    import logging
    spec = importlib.util.spec_from_file_location("run_kfold_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def call(*args):
        try:
            status = module.main([*args, "--no-progress"])
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return status, out, err

    return call


BAD_FLAGS = {
    "--folds 0,abc": (["--folds", "0,abc"], "--folds '0,abc': need comma-separated fold numbers"),
    "--select ,": (["--select", ","], "--select ',': need comma-separated fold numbers"),
    "--select 9": (["--select", "9"], "--select '9': with --n-folds 4 use folds 0..3"),
    "--select best": (["--select", "best"], "--select 'best': need comma-separated fold numbers such as 0,2 (or "
                      "'complete' / 'stable')"),
    "--seed -1": (["--seed", "-1"], "--seed -1: need an integer in 0..4294967295"),
    "--limit 0": (["--limit", "0"], "--limit 0: need at least --n-folds (4) images"),
    "--workers -1": (["--workers", "-1"], "--workers -1: need 0 or more"),
    "--prior-adjust nan": (["--prior-adjust", "nan"], "--prior-adjust nan: need a finite number >= 0"),
    "--resume --overwrite": (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    "--n-folds 1": (["--n-folds", "1"], "--n-folds 1: need at least 2 folds"),
    "--data nowhere": (["--data", "nowhere"], "--data nowhere: no such folder or file"),
    "--epochs 0": (["--epochs", "0"], "epochs=0: need an integer >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_end_with_a_message_before_anything_is_built(cli, tmp_path, case):
    args, message = BAD_FLAGS[case]
    status, _, err = cli(*args)
    assert status == 2 and f"error: {message}" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no synthetic data built, no run folder
    from fastprogress import fastprogress
    assert fastprogress.NO_BAR is False and warnings.showwarning is not None  # main() left the process as it was
    assert getattr(warnings.showwarning, "__name__", "") != "show_warning"


def _tree(folder) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(Path(folder).rglob("*"))}


def test_out_is_the_data_folder_with_overwrite(cli, tiny_data):
    before = _tree(tiny_data)
    status, _, err = cli("--data", str(tiny_data), "--out", str(tiny_data), "--overwrite", "--epochs", "1")
    assert status == 2 and "holds the data" in err and _tree(tiny_data) == before, err


def _competition_copy(tiny_data, dst, change_test) -> Path:
    """A copy of the tiny competition folder whose test table or images are changed."""
    import shutil
    shutil.copytree(tiny_data, dst)
    change_test(dst)
    return dst


def _drop_test_ids(root):
    test = pd.read_csv(root / "test.csv")
    test.drop(columns="id").to_csv(root / "test.csv", index=False)


def _truncate_a_test_image(root):
    victim = root / pd.read_csv(root / "test.csv")["img_path"].iloc[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


@pytest.mark.parametrize("case, change, message", [
    ("test.csv without id", _drop_test_ids, "test.csv: no 'id' column"),
    ("a truncated test image", _truncate_a_test_image, "test.csv: 1 unreadable image(s)"),
])
def test_test_table_and_images_are_checked_before_training(cli, tiny_data, tmp_path, case, change, message):
    data = _competition_copy(tiny_data, tmp_path / "data", change)
    status, _, err = cli("--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--size", "32",
                         "--arch", "resnet18")
    assert status == 2 and message in err and not (tmp_path / "run").exists(), err


def test_bench_epochs_prints_the_ratios_side_by_side(tiny_data, tmp_path):
    """benchmarks/bench.py --epochs: every contender timed in one run, the ratios printed from those timings."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    args = ["--data", str(tiny_data), "--images", "40", "--size", "16", "--bs", "8", "--epochs", "1", "--unfused",
            "--prefetch", "--phases", "--compare-precision"]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "store 'crop', shorter side" in out
    ratios = [float(line.rsplit("epoch ratio:", 1)[1]) for line in out.splitlines() if "epoch ratio:" in line]
    assert len(ratios) == 2 and all(0 < r < 5 for r in ratios)  # device and items pipelines
    assert "fastai loop" in out and "the device pipeline" in out and "speed / torchvision" in out
    assert "the fused step artist_learner uses is" in out
    assert re.search(r"prefetch thread *: +\d+\.\d+ s/epoch .* prefetching saves [+-]\d+\.\d+ s per epoch", out)
    phases = {line.split(":")[0].strip(): line for line in out.split("phases:", 1)[1].splitlines()[1:8]}
    assert set(phases) == {"forward", "loss", "backward", "step", "rest of the batch", "between batches", "total"}
    totals = re.search(r"fastai loop +(\d+\.\d+) s, model-only +(\d+\.\d+) s", phases["total"])
    assert totals and all(float(t) > 0 for t in totals.groups())  # fastai loop and model-only, both timed
    assert "peak memory" in out
    speeds = re.search(r"fp32 (\d+\.\d+) images/s, bf16 autocast (\d+\.\d+) images/s \(x(\d+\.\d+)\)", out)
    assert speeds and float(speeds[3]) == pytest.approx(float(speeds[2]) / float(speeds[1]), abs=0.01)


def test_bench_procs_times_both_layouts_side_by_side(tiny_data, tmp_path):
    """examples/benchmarks/bench_procs.py: one process of N threads and N single-thread processes, timed in one run."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    script = str(BENCHMARKS / "bench_procs.py")
    args = ["--data", str(tiny_data), "--size", "16", "--bs", "4", "--batches", "2", "--reps", "1", "--procs", "2"]
    done = subprocess.run([sys.executable, script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rates = {m.group(1): float(m.group(2)) for m in
             re.finditer(r"^(1 process x 2 threads|2 processes x 1 thread) : (\d+\.\d+) \(", done.stdout, re.M)}
    assert set(rates) == {"1 process x 2 threads", "2 processes x 1 thread"} and all(r > 0 for r in rates.values())
    ratio = float(re.search(r"ratio \(processes / threads\): (\d+\.\d+)", done.stdout).group(1))
    assert ratio > 0
    too_many = subprocess.run([sys.executable, script, *args[:6], "--batches", "500"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert too_many.returncode == 2 and "fewer than the 2 warm-up + 500 timed ones" in too_many.stderr
