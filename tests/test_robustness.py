"""The robustness matrix in one place: bad tables, bad images, degenerate splits, interruptions (Ctrl-C, SIGKILL
while saving), numerical faults, safe loading and reproducibility. docs/robustness.md lists every case with the
message recorded here (set ARTLEARN_ROBUSTNESS_MESSAGES=path.json to dump them).

Every run is ResNet-18 at 32 px on ~20 tiny images, 1-2 epochs, with one intra-op thread (2 shared cores).
"""
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_dataset, write_image
from fastai.callback.core import Callback
from PIL import Image

import artlearn as al
import artlearn.kfold as kfold_module
from artlearn.checkpoint import load_fold, load_weights, read_meta
from artlearn.kfold import finish_run, select_folds

TINY = dict(n_folds=2, arch="resnet18", size=32, epochs=1, bs=8, progress=False)
COUNTS = {"Ana": 8, "Bo": 7, "Cy": 6, "Solo": 1}  # Solo: a single work, fewer works than folds
MESSAGES = {}  # case -> the message it produced (for docs/robustness.md)
ODD_MODES = ["L", "PT", "CMYK", "I;16", "RGBA"]  # PT: palette PNG with a transparent colour


@pytest.fixture(autouse=True, scope="module")
def dump_messages():
    """Write the recorded messages to $ARTLEARN_ROBUSTNESS_MESSAGES when set."""
    yield
    target = os.environ.get("ARTLEARN_ROBUSTNESS_MESSAGES")
    if target:
        Path(target).write_text(json.dumps(MESSAGES, indent=1, sort_keys=True))


def note(case: str, message) -> str:
    """Record the message a case produced."""
    MESSAGES[case] = str(message)
    return str(message)


@contextmanager
def refused(case, *parts, exc=ValueError):
    """pytest.raises(exc) whose message contains every part (the problem and the place); records the message."""
    with pytest.raises(exc) as info:
        yield info
    message = note(case, info.value)
    missing = [str(p) for p in parts if str(p) not in message]
    assert not missing, f"{missing} not in the message: {message}"


def train(df, out, **kw):
    """train_kfold on tiny settings: (run, log lines, warning messages)."""
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = al.train_kfold(df, out, log=lines.append, **{**TINY, **kw})
    return run, lines, [str(w.message) for w in caught]


def rng_states():
    """Python's, numpy's and torch's global RNG states."""
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


def same_states(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def snapshot(folder) -> dict:
    """name -> bytes of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def link_or_copy(src, dst) -> Path:
    """A hard link (cheap for 45 MB weights), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)
    return Path(dst)


def fold_copy(fold_dir, dst, meta_change=None, weights=True) -> Path:
    """A new fold folder with fold_dir's meta.json (changed by meta_change) and, optionally, its weights."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    meta = json.loads((Path(fold_dir) / "meta.json").read_text())
    if meta_change:
        meta_change(meta)
    (dst / "meta.json").write_text(json.dumps(meta))
    if weights:
        link_or_copy(Path(fold_dir) / "best.safetensors", dst / "best.safetensors")
    return dst


# ---------------------------------------------------------------- shared data and runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny competition folder: train.csv (22 rows, 4 artists, one with a single work) and test.csv (6 rows)."""
    csv = make_dataset(tmp_path_factory.mktemp("robust") / "data", COUNTS, size=(36, 36), test=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_df = al.read_artworks(csv, kind="train")
        test_df = al.read_artworks(csv.parent / "test.csv", kind="test")
    return SimpleNamespace(csv=csv, root=csv.parent, train=train_df, test=test_df)


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """One finished 2-fold x 1-epoch run (seed 42), with the global RNG states before and after it."""
    import fastai.vision.all  # noqa: F401 - importing fastai draws from the global RNGs: not train_kfold's doing
    before = rng_states()
    run, lines, caught = train(data.train, tmp_path_factory.mktemp("base") / "run")
    return SimpleNamespace(run=run, lines=lines, warnings=caught, rng_before=before, rng_after=rng_states())


# ---------------------------------------------------------------- 1. bad tables


def _write_csv(root, name, rows, columns=("id", "img_path", "artist")) -> Path:
    path = Path(root) / name
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def _rows(data, n=5):
    return [tuple(r) for r in pd.read_csv(data.csv).head(n).itertuples(index=False)]


BAD_TABLES = {
    # case: (rows -> rows, columns, read_artworks kind, parts of the message)
    "missing img_path column": (lambda r: r, ("id", "path", "artist"), "train", ["missing column 'img_path'"]),
    "missing artist column": (lambda r: [x[:2] for x in r], ("id", "img_path"), "train",
                              ["missing column 'artist'", "a training table needs id,img_path,artist"]),
    "header only": (lambda r: [], ("id", "img_path", "artist"), "train", ["the table has a header but no rows"]),
    "NaN artist": (lambda r: [x if i != 3 else (*x[:2], None) for i, x in enumerate(r)], None, "train",
                   ["column 'artist' is empty or NaN in 1 row(s): row 3 (line 5)"]),
    "blank artist": (lambda r: [x if i != 1 else (*x[:2], "   ") for i, x in enumerate(r)], None, "train",
                     ["column 'artist' is empty or NaN in 1 row(s): row 1 (line 3)"]),
    "duplicate id": (lambda r: [x if i != 4 else (r[0][0], *x[1:]) for i, x in enumerate(r)], None, "train",
                     ["column 'id' has 1 duplicated id(s): 'TRAIN_0000' in rows [0, 4]"]),
    "duplicate id in test.csv": (lambda r: [(x[0] if i != 2 else r[0][0], x[1]) for i, x in enumerate(r)],
                                 ("id", "img_path"), "test", ["column 'id' has 1 duplicated id(s)", "rows [0, 2]"]),
    "path escapes the data folder": (lambda r: [x if i != 2 else (x[0], "../../etc/passwd", x[2])
                                                for i, x in enumerate(r)], None, "train",
                                     ["column 'img_path'", "escape the data folder", "row 2 (../../etc/passwd)"]),
    "image file does not exist": (lambda r: [x if i != 0 else (x[0], "./train/missing.jpg", x[2])
                                             for i, x in enumerate(r)], None, "train",
                                  ["1 of 5 image file(s) in 'img_path' do not exist", "train/missing.jpg"]),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_table_is_refused_naming_file_column_and_row(data, case):
    change, columns, kind, parts = BAD_TABLES[case]
    name = re.sub(r"\W+", "_", case) + ".csv"
    csv = _write_csv(data.root, name, change(_rows(data)), columns or ("id", "img_path", "artist"))
    with refused(f"table: {case}", name, *parts):
        al.read_artworks(csv, kind=kind)


def test_empty_csv_file(data):
    empty = data.root / "empty.csv"
    empty.write_bytes(b"")
    with refused("table: empty CSV (0 bytes)", "empty.csv", "the CSV is empty"):
        al.read_artworks(empty)


def test_test_csv_with_artist_is_ignored_with_a_note_and_extra_columns_are_kept(data):
    rows = [(*r, 1900 + i) for i, r in enumerate(_rows(data))]
    csv = _write_csv(data.root, "test_with_artist.csv", rows, ("id", "img_path", "artist", "year"))
    with pytest.warns(UserWarning, match="a test table with an 'artist' column; the column is ignored") as rec:
        test = al.read_artworks(csv, kind="test")
    note("table: test CSV with an artist column", rec[0].message)
    assert "artist" not in test.columns and test["year"].tolist() == [str(1900 + i) for i in range(5)]
    train = al.read_artworks(csv, kind="train")
    assert list(train.columns) == ["id", "img_path", "artist", "year"]  # extra columns are kept


@pytest.mark.parametrize("case", ["NaN artist", "duplicate id", "missing file", "missing artist column",
                                  "more folds than rows"])
def test_train_kfold_refuses_a_bad_table_before_writing_anything(data, tmp_path, case):
    df = data.train.copy()
    kw, parts = {}, []
    if case == "NaN artist":
        df.loc[5, "artist"] = np.nan
        parts = ["training table: column 'artist' is empty or NaN in 1 row(s): row 5"]
    elif case == "duplicate id":
        df.loc[3, "id"] = df.loc[0, "id"]
        parts = ["training table: column 'id' has 1 duplicated id(s): 'TRAIN_0000' in rows [0, 3]"]
    elif case == "missing file":
        df.loc[2, "img_path"] = str(data.root / "train" / "gone.jpg")
        parts = ["training table: 1 of 22 image file(s) in 'img_path' do not exist", "gone.jpg"]
    elif case == "missing artist column":
        df = df.drop(columns="artist")
        parts = ["training table: missing column(s) ['artist']"]
    else:
        kw, parts = dict(n_folds=len(df) + 1), ["n_folds=23 is larger than the table (22 rows)"]
    with refused(f"train_kfold: {case}", *parts):
        train(df, tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists()  # no config.json, no fold folder: the fixed table can reuse the folder


# ---------------------------------------------------------------- 2. bad images


def write_odd(path, mode, seed=0) -> Path:
    """A 40x36 image in an odd-but-valid mode (PT = palette with transparency, I;16 = 16-bit grayscale)."""
    path = Path(path)
    if mode == "I;16":
        rng = np.random.default_rng(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 65536, (36, 40)).astype(np.uint16)).save(path)
        return path
    if mode == "PT":
        write_image(path, (40, 36), seed=seed, mode="P")
        with Image.open(path) as img:
            img.load()
        img.save(path, transparency=0)
        return path
    return write_image(path, (40, 36), seed=seed, mode=mode)


def write_broken(folder, bomb_side=120) -> dict:
    """kind -> path: zero-byte, truncated JPEG, a text file named .jpg, and a large image (a bomb when the limit is
    lowered)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = write_image(folder / "full.jpg", (64, 48), seed=1).read_bytes()
    paths = {k: folder / f"{k}.jpg" for k in ("zero_byte", "truncated", "text")}
    paths["zero_byte"].write_bytes(b"")
    paths["truncated"].write_bytes(full[: len(full) // 2])
    paths["text"].write_text("id,img_path\nthis is not an image\n")
    paths["bomb"] = write_image(folder / "bomb.png", (bomb_side, bomb_side), seed=2)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def broken_table(data, tmp_path, monkeypatch):
    """The training table plus four broken images (the bomb limit lowered to 5000 pixels: 120x120 is over 2x it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    broken = write_broken(tmp_path / "broken")
    extra = pd.DataFrame({"id": [f"BAD_{k}" for k in broken], "img_path": list(broken.values()),
                          "artist": ["Ana", "Bo", "Cy", "Ana"]})
    csv = tmp_path / "train_with_broken.csv"
    pd.concat([pd.read_csv(data.csv).assign(img_path=data.train["img_path"]), extra]).to_csv(csv, index=False)
    return csv, broken


REASONS = {"zero_byte": "empty file (0 bytes)", "truncated": "truncated image file",
           "text": "not an image (cannot identify the file format)",
           "bomb": "larger than Pillow's decompression-bomb limit (5000 pixels)"}


def test_check_images_names_every_broken_file(broken_table):
    _, broken = broken_table
    report = al.check_images(pd.DataFrame({"img_path": list(broken.values())})).set_index("img_path")
    for kind, path in broken.items():
        assert not report.loc[path, "ok"] and REASONS[kind] in report.loc[path, "problem"], kind
        note(f"image: {kind.replace('_', '-')} (check_images problem)", report.loc[path, "problem"])


def test_read_artworks_raises_or_drops_broken_images(broken_table):
    csv, broken = broken_table
    assert len(al.read_artworks(csv, kind="train")) == 26  # no decode check unless asked
    with refused("image: read_artworks(on_bad='raise')", "train_with_broken.csv: 4 unreadable image(s)",
                 *[f"{p} ({REASONS[k]}" for k, p in broken.items()], "on_bad='drop'"):
        al.read_artworks(csv, kind="train", on_bad="raise")
    with pytest.warns(UserWarning, match="4 unreadable image") as rec:
        df = al.read_artworks(csv, kind="train", on_bad="drop")
    message = note("image: read_artworks(on_bad='drop')", rec[0].message)
    assert all(p in message for p in broken.values()) and "dropped 4 row(s)" in message
    assert len(df) == 22 and not set(broken.values()) & set(df["img_path"])


def test_train_kfold_refuses_broken_images_before_any_fold(broken_table, tmp_path):
    csv, broken = broken_table
    df = al.read_artworks(csv, kind="train")
    with refused("image: train_kfold on a table with broken images", "training table: 4 unreadable image(s)",
                 *broken.values(), "truncated image file", "decompression-bomb"):
        train(df, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_image_corrupted_after_the_check_is_a_listed_error_not_a_pil_traceback(data, tmp_path):
    folder = tmp_path / "imgs"
    df = pd.DataFrame({"img_path": [str(write_image(folder / f"{i}.jpg", (40, 36), seed=i)) for i in range(8)],
                       "artist": ["a", "b"] * 4})
    dls = al.artist_dls(df, fold=0, n_folds=2, size=32, bs=4)  # every image decoded into the cache up front
    victim = Path(dls.train_ds.items["img_path"].iloc[0])
    victim.write_bytes(victim.read_bytes()[:-100])  # the file changes while training runs
    with refused("image: a file corrupted between epochs", str(victim), "truncated image file"):
        for _ in dls.train:
            pass


def test_odd_modes_convert_and_train(tmp_path):
    rows = [(str(write_odd(tmp_path / "odd" / f"{a}_{m.replace(';', '')}.{'jpg' if m == 'CMYK' else 'png'}", m,
                           seed=i)), a) for i, (a, m) in enumerate((a, m) for a in ("Gray", "Pal") for m in ODD_MODES)]
    df = pd.DataFrame(rows, columns=["img_path", "artist"])
    report = al.check_images(df)
    assert report["ok"].all() and sorted(set(report["mode"])) == ["CMYK", "I;16", "L", "P", "RGBA"]
    assert (report["odd"].str.contains("converted to RGB")).all()
    note("image: odd modes (check_images odd column)", "; ".join(sorted(set(report["odd"]))))
    for p in df["img_path"]:
        arr = np.asarray(al.load_rgb(p))
        assert arr.dtype == np.uint8 and arr.shape == (36, 40, 3)
    run, _, _ = train(df, tmp_path / "run", bs=4)
    assert run.folds == [0, 1]
    for h in run.histories.values():
        assert np.isfinite(h[["train_loss", "valid_loss"]].to_numpy()).all()


# ---------------------------------------------------------------- 3. degenerate splits


def test_fewer_works_than_folds_warns_and_single_work_artist_trains(base_run, data):
    with pytest.warns(UserWarning, match=r"1 artist\(s\) have fewer works than n_folds=2: Solo") as rec:
        folds = al.assign_folds(data.train, 2)
    note("split: an artist with fewer works than folds", rec[0].message)
    assert any("fewer works than n_folds=2: Solo" in w for w in base_run.warnings)  # train_kfold says it too
    run = base_run.run
    assert run.folds == [0, 1] and all(run.metas[k]["vocab"] == sorted(COUNTS) for k in (0, 1))
    solo_fold = int(folds.loc[folds["artist"] == "Solo", "fold"].iloc[0])
    assert (run.oof["artist"] == "Solo").sum() == 1
    assert int(run.oof.loc[run.oof["artist"] == "Solo", "fold"].iloc[0]) == solo_fold


def test_more_folds_than_rows_is_an_error(data):
    with refused("split: n_folds larger than the table", "n_folds=23 is larger than the table (22 rows)",
                 "use at most 22 folds"):
        al.assign_folds(data.train, 23)


def test_training_split_smaller_than_a_batch_still_trains(data, tmp_path):
    df = data.train[data.train["artist"] != "Solo"].reset_index(drop=True)
    with pytest.warns(UserWarning, match="fewer than bs=16") as rec:
        dls = al.artist_dls(df, fold=0, n_folds=2, size=32, bs=16)
    note("split: a training split smaller than one batch", rec[0].message)
    assert len(dls.train) == 1 and len(next(iter(dls.train))[1]) == len(dls.train_ds) < 16


def test_folds_with_different_vocabularies_are_refused_by_ensemble(base_run, data, tmp_path):
    run = base_run.run
    other = fold_copy(run.fold_dir(0), tmp_path / "other_run_fold0",
                      lambda m: m.update(vocab=["Ana", "Bo", "Cy", "Zed"]))
    with refused("split: folds with different vocabularies in one ensemble", "different vocabs",
                 "artists not in every fold: ['Solo', 'Zed']", "one run"):
        al.ensemble([run.fold_dir(0), other], data.test)


# ---------------------------------------------------------------- 4. interruptions


class InterruptAt(Callback):
    """Ctrl-C in the middle of an epoch: KeyboardInterrupt after training batch `batch` of epoch `epoch`."""

    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def after_batch(self):
        if self.training and (self.epoch, self.iter) == self.at:
            raise KeyboardInterrupt


def record_fits(monkeypatch, extra_cbs=None):
    """Record which folds are fitted; add callbacks to the learner of the folds named in extra_cbs."""
    trained, real_fit = [], kfold_module._fit_fold

    def fit(learn, epochs, fold):
        trained.append(fold)
        if extra_cbs and fold in extra_cbs:
            learn.add_cbs(extra_cbs[fold])
        real_fit(learn, epochs, fold)

    monkeypatch.setattr(kfold_module, "_fit_fold", fit)
    return trained


def test_ctrl_c_in_fold_2_of_3_keeps_folds_0_1_and_rerun_trains_only_fold_2(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trained = record_fits(monkeypatch, {2: [InterruptAt(epoch=1, batch=0)]})
    with pytest.raises(KeyboardInterrupt):
        train(data.train, out, n_folds=3, epochs=2)
    assert trained == [0, 1, 2]
    for k in (0, 1):
        assert read_meta(out / f"fold{k}")["complete"] is True and (out / f"fold{k}" / "oof.csv").is_file()
    meta2 = read_meta(out / "fold2")  # its best epoch so far is on disk, but the fold is not complete
    assert meta2["complete"] is False and meta2["epoch"] == 0
    kept = {k: snapshot(out / f"fold{k}") for k in (0, 1)}
    partial = al.load_run(out)
    assert partial.folds == [0, 1]
    probs, _ = al.ensemble(partial, data.test)  # the finished folds are usable before the rerun
    assert np.isfinite(probs).all()
    monkeypatch.undo()
    trained = record_fits(monkeypatch)
    run, lines, _ = train(data.train, out, n_folds=3, epochs=2)
    assert trained == [2]
    assert sum("not retrained" in line for line in lines) == 2
    note("interrupt: rerun after Ctrl-C (log line)", next(line for line in lines if "not retrained" in line))
    assert run.folds == [0, 1, 2] and read_meta(out / "fold2")["epochs_run"] == 2
    assert {k: snapshot(out / f"fold{k}") for k in (0, 1)} == kept


WRITER = r"""
import sys
from safetensors.torch import load_file
from artlearn.checkpoint import save_weights
template, target, generation = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = load_file(template)
print("ready", flush=True)
while True:
    for v in state.values():
        v.fill_(generation)
    save_weights(target, state)
    print(generation, flush=True)
    generation += 1
"""


def _generation(state: dict) -> int:
    """The single value every tensor of a writer's checkpoint holds."""
    values = {float(v.flatten()[0]) for v in state.values()} | {float(v.min()) for v in state.values()}
    values |= {float(v.max()) for v in state.values()}
    assert len(values) == 1, f"a mixed checkpoint: {sorted(values)[:5]}"
    return int(values.pop())


def test_sigkill_while_saving_leaves_the_previous_complete_checkpoint_or_none(base_run, tmp_path):
    """kill -9 a process that rewrites best.safetensors in a loop; every kill leaves a complete file."""
    source = base_run.run.fold_dir(0)
    folder = fold_copy(source, tmp_path / "fold0", weights=False)
    target = folder / "best.safetensors"
    rng, last, mid_write = random.Random(0), None, 0
    for attempt in range(4):
        start = 1 if last is None else last + 1
        strays = set(folder.glob(".best.safetensors.*.tmp"))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(source / "best.safetensors"), str(target),
                                 str(start)], stdout=subprocess.PIPE, text=True)
        done = []
        try:
            assert proc.stdout.readline().strip() == "ready"
            if attempt % 2 == 0:  # kill while a temp file is being written (the first attempt: the first write)
                deadline = time.monotonic() + 60
                while not set(folder.glob(".best.safetensors.*.tmp")) - strays and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.02))
            else:  # kill at a random moment after a completed save
                done.append(int(proc.stdout.readline()))
                time.sleep(rng.uniform(0.0, 0.3))
            mid_write += bool(set(folder.glob(".best.safetensors.*.tmp")) - strays)
        finally:
            proc.kill()
            proc.wait()
        done += [int(x) for x in proc.stdout.read().split()]
        finished = done[-1] if done else start - 1  # the last generation the writer reported as saved
        if not target.exists():  # killed during the very first save: no file at all, never a partial one
            assert last is None and not done
            with refused("interrupt: SIGKILL during the very first save", "best.safetensors: no such weights file",
                         exc=FileNotFoundError):
                load_fold(folder)
            continue
        model, _ = load_fold(folder)  # never a truncated file: load_fold reads best.safetensors only
        generation = _generation(load_weights(target))
        assert generation in (finished, finished + 1)  # the previous complete file, or the one just completed
        assert _generation(model.state_dict()) == generation
        last = generation
    assert last is not None and mid_write >= 1
    strays = len(list(folder.glob(".best.safetensors.*.tmp")))  # leftovers of killed writes: never loaded
    note("interrupt: SIGKILL while saving", f"{mid_write} of 4 kills landed mid-write ({strays} temp file(s) left); "
         f"every time best.safetensors was the previous or the new complete file (last generation {last})")


def test_truncated_weights_are_a_clear_error(base_run, tmp_path):
    folder = fold_copy(base_run.run.fold_dir(0), tmp_path / "fold0", weights=False)
    full = (base_run.run.fold_dir(0) / "best.safetensors").read_bytes()
    (folder / "best.safetensors").write_bytes(full[: len(full) // 3])
    with refused("interrupt: truncated best.safetensors", "best.safetensors is truncated or not a safetensors file",
                 "retrain this fold or delete its folder"):
        load_fold(folder)


def test_run_directory_with_another_configuration_is_refused(base_run, data):
    run = base_run.run
    before = snapshot(run.path)
    with refused("interrupt: rerun with another configuration", "was made with a different configuration",
                 "epochs: 1 in the run dir, 2 now", "use another --out folder"):
        train(data.train, run.path, epochs=2)
    with refused("interrupt: rerun on other data", "data: "):
        train(data.train.iloc[:-2], run.path)
    assert snapshot(run.path) == before


def test_summary_and_submission_are_replaced_atomically(base_run, tmp_path, monkeypatch):
    run, real_replace, calls = base_run.run, os.replace, []

    def recording(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    finish_run(run.path)
    assert calls and all(src.startswith(".summary.json.") and src.endswith(".tmp") for src, dst in calls
                         if dst == "summary.json")
    summary = run.path / "summary.json"
    before = summary.read_bytes()
    sub = al.write_submission(["t1", "t0"], np.eye(2), ["A", "B"], tmp_path / "submission.csv")
    sub_before = sub.read_bytes()

    def failing(src, dst):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="simulated"):
        finish_run(run.path)
    with pytest.raises(OSError, match="simulated"):
        al.write_submission(["t1", "t0"], np.eye(2)[::-1], ["A", "B"], sub)
    assert summary.read_bytes() == before and sub.read_bytes() == sub_before
    assert not list(run.path.glob(".*.tmp")) and [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


# ---------------------------------------------------------------- 5. numerical faults


@pytest.fixture(scope="module")
def nan_run(data, tmp_path_factory, poison_batch):
    """A 2-fold x 2-epoch run whose fold 0 gets a NaN loss in its second epoch (epoch 1); fold 1 trains after it."""
    with pytest.MonkeyPatch.context() as mp:
        trained = record_fits(mp, {0: [poison_batch(epoch=1, batch=0)]})
        run, lines, _ = train(data.train, tmp_path_factory.mktemp("nan") / "run", epochs=2)
    return run, lines, trained


def test_nan_loss_stops_the_fold_keeps_its_best_epoch_and_the_run_goes_on(nan_run):
    run, lines, trained = nan_run
    assert trained == [0, 1]
    nan_line = next(line for line in lines if "non-finite" in line or "nan" in line)
    message = note("numeric: NaN loss (log line)", nan_line)
    for part in ("fold 0", "epoch 1, batch 0", "Lower the learning rate", "best checkpoint so far is kept"):
        assert part in message, part
    assert not message.startswith("fold 0: fold 0:")
    meta = read_meta(run.fold_dir(0))
    assert meta["stopped"] == "non-finite loss at epoch 1" and meta["complete"] is False and meta["epoch"] == 0
    model, _ = load_fold(run.fold_dir(0))
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
    assert len(run.histories[0]) == 1  # the poisoned epoch is not recorded as trained
    assert read_meta(run.fold_dir(1))["complete"] is True and run.folds == [1]


def test_nan_fold_is_left_out_of_the_ensemble_with_a_reason(nan_run, data):
    run, _, _ = nan_run
    selection = select_folds(run)
    assert selection.folds == [1]
    reason = note("numeric: NaN fold in select_folds", selection.excluded[0])
    assert reason == "fold is stopped: non-finite loss at epoch 1"
    assert run.summary["selection"]["excluded"]["0"] == reason
    probs, _ = al.ensemble(run, data.test)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    with_stopped, _ = al.ensemble([run.fold_dir(0), run.fold_dir(1)], data.test)  # its epoch-0 weights are finite
    assert np.isfinite(with_stopped).all()


# ---------------------------------------------------------------- 6. safe loading


class Payload:
    """Unpickling this creates `marker`: the kind of code a .pth file can run when torch.load-ed."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_malicious_pickle_is_never_executed(base_run, data, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()  # the payload works when something unpickles it...
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"fc.weight": Payload(marker)})
    folder = fold_copy(base_run.run.fold_dir(0), tmp_path / "evil_fold", weights=False)
    (folder / "model.pth").write_bytes(payload)
    with refused("safe: a folder holding only model.pth", "model.pth: refusing to load '.pth' weights",
                 "can execute arbitrary code"):
        load_fold(folder)
    with refused("safe: load_fold on a .pth file", "model.pth: refusing"):
        load_fold(folder / "model.pth")
    with refused("safe: load_weights on a .pth file", "refusing"):
        load_weights(folder / "model.pth")
    with refused("safe: ensemble on a fold folder holding a .pth", "refusing"):
        al.ensemble([folder], data.test)
    with refused("safe: ensemble on a .pth file", "refusing"):
        al.ensemble([folder / "model.pth"], data.test)
    run_dir = tmp_path / "evil_run"  # a downloaded run whose fold holds the pickle
    run_dir.mkdir()
    shutil.copy(base_run.run.path / "config.json", run_dir)
    shutil.copytree(folder, run_dir / "fold0")
    with refused("safe: ensemble on a run directory holding a .pth", "refusing"):
        al.ensemble(run_dir, data.test)
    (folder / "best.safetensors").write_bytes(payload)  # the pickle renamed best.safetensors
    with refused("safe: a pickle renamed best.safetensors", "best.safetensors is truncated or not a safetensors file"):
        load_fold(folder)
    torch.save({"fc.weight": Payload(marker)}, folder / "best.safetensors")  # torch.save's zip format
    with refused("safe: a torch.save file renamed best.safetensors", "not a safetensors file"):
        load_fold(folder)
    assert not marker.exists()  # ...but artlearn never unpickled it


def test_library_never_unpickles():
    source = "\n".join(p.read_text() for p in Path(al.__file__).parent.glob("*.py"))
    for pattern in (r"torch\.load\(", r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False",
                    r"joblib\.load\("):
        assert not re.search(pattern, source), pattern


@pytest.mark.parametrize("case", ["wrong shapes", "unknown arch", "not JSON", "no model entry"])
def test_tampered_meta_is_a_clear_error_naming_the_file(base_run, tmp_path, case):
    changes = {"wrong shapes": lambda m: m["model"].update(n_classes=7),
               "unknown arch": lambda m: m["model"].update(arch="resnet9000"),
               "no model entry": lambda m: m.pop("model")}
    folder = fold_copy(base_run.run.fold_dir(0), tmp_path / "fold0", changes.get(case))
    if case == "not JSON":
        (folder / "meta.json").write_text('{"model": {"arch": "resnet18", ')
    parts = {"wrong shapes": ["best.safetensors: tensor", "but the model in meta.json expects"],
             "unknown arch": ["meta.json: unknown architecture 'resnet9000'"],
             "not JSON": ["meta.json is not valid JSON", "retrain this fold or delete its folder"],
             "no model entry": ["meta.json has no 'model' entry"]}[case]
    with refused(f"safe: tampered meta.json ({case})", str(folder), *parts):
        load_fold(folder)


def test_damaged_run_files_are_errors_naming_the_file(base_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(base_run.run.path / "config.json", run_dir)
    fold_copy(base_run.run.fold_dir(0), run_dir / "fold0")
    (run_dir / "fold0" / "meta.json").write_text("not json at all")
    with refused("safe: a run whose meta.json is not JSON", "fold0/meta.json: not valid JSON"):
        al.load_run(run_dir)


# ---------------------------------------------------------------- 7. reproducibility


def test_train_kfold_leaves_the_global_rng_state_alone(base_run):
    assert same_states(base_run.rng_before, base_run.rng_after)


def test_same_seed_same_folds_and_first_epoch_losses(base_run, data, tmp_path):
    first = base_run.run.path
    twin, _, _ = train(data.train, tmp_path / "twin")
    other, _, _ = train(data.train, tmp_path / "other", seed=7)
    assert (first / "folds.csv").read_bytes() == (twin.path / "folds.csv").read_bytes()
    assert (first / "folds.csv").read_bytes() != (other.path / "folds.csv").read_bytes()
    for k in (0, 1):
        a, b, c = (pd.read_csv(r / f"fold{k}" / "history.csv").iloc[0] for r in (first, twin.path, other.path))
        assert (a["train_loss"], a["valid_loss"]) == (b["train_loss"], b["valid_loss"])  # bit-identical on CPU
        assert a["train_loss"] != c["train_loss"]
