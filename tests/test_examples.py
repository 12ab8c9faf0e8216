"""examples/run_kfold.py end to end on tiny settings, as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import artlearn as al

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_kfold.py"


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


def test_run_kfold_without_data_builds_the_synthetic_set(tmp_path):
    args = ["--epochs", "1", "--n-folds", "2", "--size", "32", "--limit", "60", "--no-progress"]
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "data" / "synthetic" / "train.csv").is_file()
    runs = list((tmp_path / "runs").glob("synthetic-reference-resnet18-32"))
    assert runs and (runs[0] / "submission.csv").is_file()
    assert "synthetic test set" in done.stdout


def test_resume_without_a_run_is_an_error(tiny_data, tmp_path):
    done = _run(["--data", str(tiny_data), "--resume", "--out", str(tmp_path / "none")], tmp_path)
    assert done.returncode == 2 and "no run to resume" in done.stderr
