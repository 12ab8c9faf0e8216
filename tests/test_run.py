"""artlearn.run: the run lock, ownership checks, clean-up, text-preserving readers, fingerprints; files' permissions."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import raises_with

from artlearn import run as runmod
from artlearn.files import atomic_write_text, current_umask


def _config(**extra) -> dict:
    return dict(format=runmod.RUN_FORMAT, format_version=runmod.RUN_FORMAT_VERSION, n_folds=2, seed=42, **extra)


def _marked_run(path, **extra):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(_config(**extra)))
    return path


# ---------------------------------------------------------------- the lock


def test_lock_is_reentrant_in_one_process_and_records_the_holder(tmp_path):
    out = tmp_path / "run"
    with runmod.run_lock(out):
        with runmod.run_lock(out):  # finish_run inside train_kfold
            pass
        assert f"pid {os.getpid()} on" in (out / ".lock").read_text()
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom artlearn.run import run_lock\ntry:\n"
                                " with run_lock(sys.argv[1]): print('acquired')\nexcept ValueError as e: print(e)",
                                str(out)], capture_output=True, text=True)
        assert "is in use by another artlearn process" in probe.stdout and f"pid {os.getpid()}" in probe.stdout
    assert not runmod._HELD  # released once the outer block ends


def test_lock_refuses_an_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("x")
    with raises_with("cannot create the run directory"):
        with runmod.run_lock(tmp_path / "file" / "run"):
            pass


# ---------------------------------------------------------------- ownership


def test_check_out_dir(tmp_path):
    assert runmod.check_out_dir(tmp_path / "new") is False and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lock").write_text("pid 1")  # a stale lock file alone: still empty
    assert runmod.check_out_dir(tmp_path / "empty") is False
    assert runmod.check_out_dir(_marked_run(tmp_path / "run")) is True
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with raises_with("is not empty and not an artlearn run directory", "a.txt"):
        runmod.check_out_dir(tmp_path / "notes")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    image = data / "train" / "x.jpg"
    image.write_bytes(b"x")
    for out in (data, data / "train", tmp_path):
        with raises_with("holds the data"):
            runmod.check_out_dir(out, protect=[image])
    assert runmod.check_out_dir(data / "runs" / "r", protect=[image, data]) is False  # a run inside the data folder


def test_clear_run_deletes_only_artlearn_files(tmp_path):
    out = _marked_run(tmp_path / "run")
    for name in ("folds.csv", "summary.json", "oof.csv", "submission.csv", "history.png", ".summary.json.x.tmp",
                 "notes.txt"):
        (out / name).write_text("x")
    for name in ("best.safetensors", "meta.json", "history.csv", "oof.csv", ".meta.json.y.tmp"):
        (out / "fold0" / name).parent.mkdir(exist_ok=True)
        (out / "fold0" / name).write_text("x")
    (out / "fold1").mkdir()
    (out / "fold1" / "meta.json").write_text("{}")
    (out / "fold1" / "mine.txt").write_text("keep")
    kept = runmod.clear_run(out)
    assert sorted(p.name for p in out.rglob("*")) == ["fold1", "mine.txt", "notes.txt"]
    assert sorted(p.name for p in kept) == ["mine.txt", "notes.txt"]
    with raises_with("config.json"):  # no longer marked: never cleared again
        runmod.clear_run(out)


# ---------------------------------------------------------------- reading back as text


def test_readers_keep_text_as_text(tmp_path):
    folds = pd.DataFrame({"id": ["00001", "2"], "img_path": ["/a.jpg", "/b.jpg"], "artist": ["NA", "07"],
                          "fold": [0, 1]})
    folds.to_csv(tmp_path / "folds.csv", index=False)
    back = runmod.read_folds(tmp_path / "folds.csv")
    assert back["id"].tolist() == ["00001", "2"] and back["artist"].tolist() == ["NA", "07"]
    assert back["fold"].tolist() == [0, 1]
    oof = folds.assign(pred=["None", "7"], p_NA=[0.9, 0.2], **{"p_07": [0.1, 0.8]})
    oof.to_csv(tmp_path / "oof.csv", index=False)
    back = runmod.read_oof(tmp_path / "oof.csv")
    assert back["pred"].tolist() == ["None", "7"] and back["p_07"].tolist() == [0.1, 0.8]
    assert runmod.oof_scores(back)["accuracy"] == 0.0  # '7' is not '07', 'None' is not 'NA'
    (tmp_path / "bad.csv").write_text("artist,pred,fold\nA,A,x\n")
    with raises_with("bad.csv: column 'fold' holds 1 value(s) that are not integers ('x')"):
        runmod.read_oof(tmp_path / "bad.csv")


def test_fingerprint_covers_the_content():
    df = pd.DataFrame({"img_path": ["/a", "/b"], "artist": ["x", "y"], "fold": [0, 1]})
    plain = runmod.data_fingerprint(df)
    assert runmod.data_fingerprint(df, ["d1", "d2"]) != runmod.data_fingerprint(df, ["d1", "d3"]) != plain
    assert runmod.data_fingerprint(df.iloc[::-1], ["d2", "d1"]) == runmod.data_fingerprint(df, ["d1", "d2"])


def test_fold_index():
    assert [runmod.fold_index(n) for n in ("fold0", "fold12", "fold01", "fold-1", "foldx", "fold", "fold\u0663")] \
        == [0, 12, None, None, None, None, None]


# ---------------------------------------------------------------- permissions


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        path = atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
