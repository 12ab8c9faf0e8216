"""README.md's code blocks run as written: Python blocks in order on a small synthetic data/synthetic folder, the
command lines checked against the CLI (and run where they need no downloaded data) and against .ci/run."""
import importlib.util
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPT = ROOT / "examples" / "run_kfold.py"
CPU_WHEELS = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def blocks(lang: str) -> list:
    """The text of every fenced block of `lang` in README.md, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands() -> list:
    """Every command of the bash blocks (lines split at '&&'), comments dropped."""
    lines = [line.split("#")[0].strip() for block in blocks("bash") for line in block.splitlines()]
    return [part.strip() for line in lines if line for part in line.split("&&")]


def cli():
    """examples/run_kfold.py as a module."""
    spec = importlib.util.spec_from_file_location("run_kfold_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_kfold_argvs() -> list:
    """The arguments of every `python examples/run_kfold.py ...` command of the README."""
    return [shlex.split(c)[2:] for c in commands() if c.startswith("python examples/run_kfold.py")]


def test_readme_is_a_short_page_with_code():
    assert len(README.read_text().splitlines()) < 200
    assert len(blocks("python")) >= 3 and len(blocks("bash")) >= 3


def test_every_command_is_one_this_test_knows():
    known = ("pip install -e \".[dev]\"", "python -m pytest -q", CPU_WHEELS, "python examples/run_kfold.py")
    unknown = [c for c in commands() if not c.startswith(known)]
    assert not unknown, f"new README commands: teach tests/test_readme.py to run or check them: {unknown}"


def test_the_install_and_test_line_is_what_ci_runs():
    line = 'pip install -e ".[dev]" && python -m pytest -q'
    readme_lines = [ln.strip() for block in blocks("bash") for ln in block.splitlines()]
    assert line in readme_lines
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert line in ci  # .ci/run runs exactly the README's test command
    assert any(ln.startswith('pip install -e ".[dev]" && python examples/run_kfold.py') for ln in readme_lines)
    assert CPU_WHEELS in readme_lines  # not run here (a download); its index URL is PyTorch's CPU wheel index


def test_every_run_kfold_command_parses_and_its_recipe_validates():
    from artlearn.budget import parse_budget
    from artlearn.recipe import Recipe
    module = cli()
    assert any("--budget" in argv for argv in run_kfold_argvs())
    argvs = run_kfold_argvs()
    assert argvs
    for argv in argvs:
        args = module.parse_args(argv)  # a renamed or removed flag ends here (SystemExit)
        Recipe.preset(args.preset).replace(**module.settings_from(args)).validate()
        parse_budget(args.budget)  # a duration train_kfold cannot read is a ValueError


def test_the_quick_start_command_runs(tmp_path):
    """The quick start's command (no --data: the synthetic set is built), with tiny settings appended."""
    argv = [a for a in run_kfold_argvs() if not any(x == "--data" for x in a)]
    assert argv == [[]], argv  # the quick start is the plain command
    tiny = ["--limit", "48", "--epochs", "1", "--size", "16", "--n-folds", "2", "--folds", "0", "--out", "run"]
    done = subprocess.run([sys.executable, str(SCRIPT), *tiny], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, MPLBACKEND="Agg"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "data" / "synthetic" / "train.csv").is_file()
    assert (tmp_path / "run" / "submission.csv").is_file() and "out-of-fold" in done.stdout


@pytest.mark.slow
def test_the_quick_start_command_as_written(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=7200, env=dict(os.environ, MPLBACKEND="Agg"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "demo-reference" / "submission.csv").is_file()


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    """A working folder as after the quick start, but small: data/synthetic with 4 artists, 48 + 10 paintings."""
    import matplotlib
    import artlearn as al
    matplotlib.use("Agg")
    al.make_synthetic_artworks(tmp_path / "data" / "synthetic", n_artists=4, n_train=48, n_test=10, seed=1)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path
    root.handlers[:] = handlers
    root.setLevel(level)
    import matplotlib.pyplot as plt
    plt.close("all")


def test_the_python_blocks_run_in_order(readme_folder):
    import matplotlib.figure
    import pandas as pd
    scope = {}
    for i, block in enumerate(blocks("python")):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), scope)
    run = readme_folder / "runs" / "api-demo"
    sub = pd.read_csv(run / "submission.csv")
    assert len(sub) == 10 and set(sub["artist"]) <= set(scope["vocab"])
    assert all((run / f"fold{k}" / "best.safetensors").is_file() for k in range(4))
    assert (readme_folder / "runs" / "manual" / "fold0" / "history.csv").is_file()
    top5 = scope["top5"]
    assert list(top5.columns[:4]) == ["image", "rank", "artist", "probability"] and len(top5) == 3 * 4
    assert isinstance(scope["fig"], matplotlib.figure.Figure)
    assert scope["artist"] in scope["vocab"] and scope["probs"].shape == (4,)
