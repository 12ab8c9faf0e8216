"""The robustness matrix in one place: bad tables, bad images, degenerate splits, interruptions (Ctrl-C, SIGKILL
while saving), numerical faults, safe loading, reproducibility, then ownership of run directories, the run lock,
checks before anything is written, content fingerprints and identical images, text that stays text, folder layouts,
run-directory consistency, and a red-team pass. docs/robustness.md lists every case with the message recorded here
(set ARTLEARN_ROBUSTNESS_MESSAGES=path.json to dump them).

Every run is ResNet-18 at 32 px on ~20 tiny images, 1-2 epochs, with one intra-op thread (2 shared cores); most
refusals happen before training (`dry`: train_kfold with its fold training replaced by a no-op).
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
        run = al.train_kfold(df, out, **{"log": lines.append, **TINY, **kw})
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
    source = base_run.run.fold_dir(0)  # the writer's weights are not the ones meta.json records: no digest kept
    folder = fold_copy(source, tmp_path / "fold0", meta_change=lambda m: m.pop("weights_sha256"), weights=False)
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
    with pytest.raises(al.checks.ArtlearnError, match="no space left on the device .*simulated"):
        finish_run(run.path)
    with pytest.raises(al.checks.ArtlearnError, match="no space left on the device .*simulated"):
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


def forbid_real_models(monkeypatch):
    """Fail the test when a model is built anywhere but on the 'meta' device (which allocates nothing)."""
    import artlearn.models
    real = artlearn.models.build_model

    def build(**kw):
        if torch.empty(0).device.type != "meta":
            pytest.fail("a model was allocated")
        return real(**kw)

    monkeypatch.setattr(artlearn.models, "build_model", build)


def _seven_classes(meta):
    """A consistent meta.json for 7 artists (so only the weights disagree)."""
    meta["model"].update(n_classes=7)
    meta.update(n_classes=7, vocab=[f"A{i}" for i in range(7)], class_counts=[1] * 7)


TAMPERED = {  # case: (change to meta.json, parts of the message)
    "wrong shapes": (_seven_classes, ["best.safetensors: tensor", "but the model in meta.json expects"]),
    "unknown arch": (lambda m: m["model"].update(arch="resnet9000"), ["meta.json: unknown architecture 'resnet9000'"]),
    "not JSON": (None, ["meta.json is not valid JSON", "retrain this fold or delete its folder"]),
    "no model entry": (lambda m: m.pop("model"), ["meta.json has no 'model' entry"]),
    "vocab length != n_classes": (lambda m: m.update(vocab=m["vocab"][:3]),
                                  ["'vocab' has 3 artist(s)", "the model has 4 classes", "edited or damaged"]),
    "size 20000": (lambda m: m.update(size=20000), ["'size' is 20000", "8..4096"]),
    "n_classes 1e8": (lambda m: (m["model"].update(n_classes=10 ** 8), m.update(n_classes=10 ** 8)),
                      ["'model.n_classes' is 100000000", "1..100000"]),
    "n_classes a float": (lambda m: m["model"].update(n_classes=4.0), ["'model.n_classes' is 4.0"]),
    "vocab with a duplicate": (lambda m: m.update(vocab=["Ana", "Ana", "Bo", "Cy"]),
                               ["'vocab' lists 1 artist(s) twice"]),
    "std 0 / NaN mean": (lambda m: m.update(std=[0.2, 0.0, 0.2]), ["'std' must be positive"]),
    "mean not numbers": (lambda m: m.update(mean=["a", 0.5, 0.5]), ["'mean' must be 3 finite numbers"]),
    "meta.json is a list": (lambda m: None, ["meta.json has no 'model' entry"]),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_meta_is_a_clear_error_naming_the_file(base_run, tmp_path, case, monkeypatch):
    change, parts = TAMPERED[case]
    folder = fold_copy(base_run.run.fold_dir(0), tmp_path / "fold0", change)
    if case == "not JSON":
        (folder / "meta.json").write_text('{"model": {"arch": "resnet18", ')
    if case == "meta.json is a list":
        (folder / "meta.json").write_text("[1, 2]")
    if case != "wrong shapes":  # refused before any model is allocated
        forbid_real_models(monkeypatch)
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


# ---------------------------------------------------------------- 8. ownership, the lock, checks first (issue #14)


def tree(*folders) -> dict:
    """Everything under the folders: files (bytes and mode), folders and symlinks (their targets); a run's lock file
    (which records its last holder) is left out."""
    state = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.name == ".lock":
                continue
            if p.is_symlink():
                state[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                state[str(p)] = ("dir",)
            else:
                state[str(p)] = (p.read_bytes(), p.stat().st_mode)
    return state


@contextmanager
def unchanged(*folders):
    """Assert that nothing under the folders changed during the block."""
    before = tree(*folders)
    yield
    assert tree(*folders) == before, "files outside the run directory changed"


@pytest.fixture
def dry(monkeypatch):
    """train_kfold without training: every check, config.json, folds.csv and summary.json, but no fold is fitted."""
    fitted = []
    monkeypatch.setattr(kfold_module, "_train_fold", lambda job, k, **kw: fitted.append(k))
    return fitted


def refused_run(case, df, out, *parts, watch=(), **kw):
    """train_kfold refused before anything is written: out not created (or unchanged) and `watch` unchanged."""
    existed = Path(out).exists()
    with unchanged(*watch, *([out] if existed else [])), refused(case, *parts):
        train(df, out, **kw)
    assert existed or not Path(out).exists()


def test_overwrite_never_deletes_the_data_folder_or_a_folder_of_runs(base_run, data, tmp_path):
    with unchanged(data.root):
        refused_run("own: --overwrite with --out = the data folder", data.train, data.root, "holds the data",
                    "never writes into or deletes the data folder", overwrite=True)
        refused_run("own: --out = a folder containing the data folder", data.train, data.root.parent,
                    "holds the data", overwrite=True)
    runs = tmp_path / "runs"  # several runs and the user's notes
    for name in ("a", "b"):
        shutil.copytree(base_run.run.path, runs / name, ignore=shutil.ignore_patterns("*.safetensors"))
    (runs / "notes.txt").write_text("my notes")
    refused_run("own: --overwrite on a folder holding several runs", data.train, runs,
                "is not empty and not an artlearn run directory (no config.json; it holds a, b, notes.txt)",
                "use another --out folder", overwrite=True)


def test_overwrite_deletes_only_what_artlearn_wrote(base_run, data, tmp_path, dry):
    out = tmp_path / "run"
    shutil.copytree(base_run.run.path, out)
    (out / "notes.txt").write_text("keep me")
    (out / "fold0" / "my_plot.png").write_bytes(b"png")
    run, lines, _ = train(data.train, out, overwrite=True, epochs=2)  # another configuration: allowed with overwrite
    assert (out / "notes.txt").read_text() == "keep me" and (out / "fold0" / "my_plot.png").is_file()
    assert not (out / "fold1").exists() and not (out / "fold0" / "best.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    note("own: --overwrite keeps files artlearn did not write (log)", next(x for x in lines if "kept" in x))


def test_overwrite_with_a_bad_table_deletes_nothing(base_run, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run.run.path, out)
    df = data.train.copy()
    df.loc[0, "artist"] = None
    refused_run("own: --overwrite with a bad table", df, out, "column 'artist' is empty", overwrite=True)


def test_a_folder_that_is_not_a_run_is_never_taken_over(data, tmp_path):
    out = tmp_path / "mine"
    (out / "fold0").mkdir(parents=True)
    (out / "fold0" / "best.safetensors").write_bytes(b"my own weights")
    (out / "folds.csv").write_text("my,own\n1,2\n")
    (out / "summary.json").write_text("{}")
    refused_run("own: a non-empty --out that is not an artlearn run", data.train, out,
                "is not empty and not an artlearn run directory", "fold0, folds.csv, summary.json")
    (out / "config.json").write_text(json.dumps({"name": "another tool's config"}))
    refused_run("own: --out with another tool's config.json", data.train, out,
                "config.json is not an artlearn run config")


def test_out_that_is_a_file_or_not_writable(data, tmp_path, monkeypatch):
    target = tmp_path / "a_file"
    target.write_text("x")
    refused_run("own: --out is a file", data.train, target, "exists and is not a folder")
    refused_run("own: --out under a file", data.train, target / "run", "is a file, so the run directory cannot be "
                "created there")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    refused_run("own: --out not writable", data.train, tmp_path / "run", "is not writable by this user")


HOLDER = r"""
import sys, time
from artlearn.run import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_naming_the_holder_and_a_stale_lock_does_not_block(data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with refused("lock: a second process trains into the same run", f"pid {holder.pid} on",
                     "is in use by another artlearn process", "released when that process ends"):
            train(data.train, out)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written by the refused call
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").is_file()  # the holder died: its lock file stays, but the kernel released the lock
    with al.run.run_lock(out):
        assert f"pid {os.getpid()}" in (out / ".lock").read_text()


BAD_ARGS = {  # case: (train_kfold keywords, parts of the message)
    "--arch resnet9": (dict(arch="resnet9"), ["arch='resnet9' is not supported"]),
    "--epochs 0": (dict(epochs=0), ["epochs=0: need an integer >= 1"]),
    "--lr 0": (dict(lr=0.0), ["lr=0.0: need a number > 0"]),
    "--bs 0": (dict(bs=0), ["bs=0: need an integer >= 1"]),
    "label_smoothing=1": (dict(label_smoothing=1.0), ["label_smoothing=1.0: need a number in [0, 1)"]),
    "pool='max'": (dict(pool="max"), ["pool='max' is not supported"]),
    "epochs <= warmup": (dict(preset="best", warmup=2, epochs=2), ["warmup=2 must be shorter than epochs=2"]),
    "tta='bogus'": (dict(tta="bogus"), ["tta='bogus' is not supported"]),
    "seed=-1": (dict(seed=-1), ["seed=-1: need an integer in 0..2**32-1"]),
    "folds=[0, 'abc']": (dict(folds=[0, "abc"]), ["need fold numbers such as [0, 2]"]),
    "folds=[]": (dict(folds=[]), ["out of range"]),
    "n_folds=1": (dict(n_folds=1), ["n_folds=1: need an integer of at least 2"]),
    "workers=-1": (dict(workers=-1), ["workers=-1"]),
    "cbs=5": (dict(cbs=5), ["cbs: 5 is neither a fastai Callback"]),
    "cbs=[a factory returning 3]": (dict(cbs=[lambda: 3]), ["returned 3, not a fastai Callback"]),
    "--bs 1 (BatchNorm)": (dict(bs=1), ["bs=1: resnet18 uses BatchNorm", "use bs >= 2"]),
    "overwrite='yes'": (dict(overwrite="yes"), ["overwrite='yes': need True or False"]),
    "log='print'": (dict(log="print"), ["log='print'"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_are_refused_before_anything_is_written_or_trained(data, tmp_path, monkeypatch, case):
    kw, parts = BAD_ARGS[case]
    trained = record_fits(monkeypatch)
    refused_run(f"args: {case}", data.train, tmp_path / "run", *parts, watch=[data.root], **kw)
    assert trained == []


def test_a_one_image_training_split_is_refused_with_the_fix(data, tmp_path):
    two = data.train[data.train["artist"].isin(["Ana"])].head(2)
    refused_run("args: a training split of one image (BatchNorm)", two, tmp_path / "run",
                "the smallest training split (1 image): resnet18 uses BatchNorm", "fewer folds or more images")


def test_replaced_pixels_are_a_different_run_and_old_runs_still_resume(data, tmp_path, dry):
    root = tmp_path / "data"
    shutil.copytree(data.root, root)
    df = al.read_artworks(root / "train.csv", kind="train")
    out = tmp_path / "run"
    train(df, out)
    victim = Path(df["img_path"].iloc[3])
    stat = victim.stat()
    with Image.open(victim) as img:
        img.rotate(90).save(victim, quality=100)  # new pixels: the same name, the same mtime
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    refused_run("content: images replaced between runs (same names and mtimes)", df, out,
                "was made with a different configuration (data: ")
    config = json.loads((out / "config.json").read_text())  # a run written before content fingerprints (v2)
    config.update(format_version=2, data=al.run.data_fingerprint(pd.read_csv(out / "folds.csv", dtype=str)
                                                                    .assign(fold=lambda d: d["fold"].astype(int))))
    (out / "config.json").write_text(json.dumps(config))
    _, lines, _ = train(df, out)
    note("content: resuming a run of format version 2 (log)", next(x for x in lines if "format version 2" in x))


def test_identical_images_share_a_fold_and_conflicting_labels_are_refused(data, tmp_path, dry):
    df = data.train.copy()
    copy = tmp_path / "copy_of_3.jpg"
    shutil.copy(df["img_path"].iloc[3], copy)
    twin = pd.DataFrame([{"id": "TWIN", "img_path": str(copy), "artist": df["artist"].iloc[3]}])
    with pytest.warns(UserWarning, match=r"1 image\(s\) appear more than once") as rec:
        folds = al.assign_folds(pd.concat([df, twin], ignore_index=True), 2)
    note("content: an image listed twice (same artist)", rec[0].message)
    assert folds["fold"].iloc[3] == folds["fold"].iloc[-1]
    run, _, caught = train(pd.concat([df, twin, twin.assign(id="TWIN2")], ignore_index=True), tmp_path / "run")
    table = pd.read_csv(run.path / "folds.csv")
    assert table.loc[table["id"].isin(["TWIN", "TWIN2", df["id"].iloc[3]]), "fold"].nunique() == 1
    assert any("appear more than once" in w for w in caught)
    other = twin.assign(artist="Bo" if twin["artist"].iloc[0] != "Bo" else "Ana")
    refused_run("content: an image listed twice with different artists", pd.concat([df, other]), tmp_path / "r2",
                "1 image(s) appear more than once with different artists", "copy_of_3.jpg", "fix or remove")
    given = pd.concat([df, twin], ignore_index=True).assign(fold=lambda d: np.arange(len(d)) % 2)
    given.loc[len(given) - 1, "fold"] = 1 - given.loc[3, "fold"]
    refused_run("content: a given fold column splitting copies of an image", given, tmp_path / "r3",
                "column 'fold' puts copies of 1 image(s) in different folds")


TEXT_ARTISTS = {"7": 6, "07": 6, "NA": 5, "None": 5}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A run whose artists look like numbers or NaN ('7', '07', 'NA', 'None'), ids with leading zeros, a train.csv
    that carries its own fold column, written under umask 0o022; a probe tries the lock while fold 0 trains."""
    root = tmp_path_factory.mktemp("text") / "data"
    csv = make_dataset(root, TEXT_ARTISTS, size=(36, 36))
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table["id"] = [f"{i:05d}" for i in range(len(table))]
    table["fold"] = [str(i % 2) for i in range(len(table))]
    table.to_csv(csv, index=False)
    df = al.read_artworks(csv, kind="train")
    out, probes = root.parent / "run", []
    probe = [sys.executable, "-c", "import sys; from artlearn.run import run_lock\ntry:\n with run_lock(sys.argv[1]):"
             " print('acquired')\nexcept ValueError as e: print(e)", str(root.parent / "run")]
    old_mask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            real_fit = kfold_module._fit_fold
            mp.setattr(kfold_module, "_fit_fold", lambda learn, epochs, fold: (
                probes.append(subprocess.run(probe, capture_output=True, text=True).stdout) if fold == 0 else None,
                real_fit(learn, epochs, fold)))
            run, lines, _ = train(df, out)
    finally:
        os.umask(old_mask)
    return SimpleNamespace(df=df, run=run, probes=probes, lines=lines)


def test_artists_that_look_like_numbers_or_nan_stay_text(text_run):
    run = text_run.run
    assert set(run.oof["artist"]) == set(TEXT_ARTISTS) and set(run.vocab) == set(TEXT_ARTISTS)
    truth = run.oof["artist"] == run.oof["pred"]
    assert run.summary["oof"]["accuracy"] == pytest.approx(truth.mean())
    folds = al.run.read_folds(run.path / "folds.csv")
    assert folds["id"].tolist() == text_run.df["id"].tolist() and folds["id"].iloc[1] == "00001"
    assert (al.run.read_oof(run.path / "oof.csv")["id"].str.len() == 5).all()
    again = finish_run(run.path)  # read back from disk, every rerun
    assert again.summary["oof"] == run.summary["oof"] and again.summary["majority_baseline"]["artist"] in TEXT_ARTISTS


def test_a_train_csv_with_its_own_fold_column_is_used(text_run):
    folds = pd.read_csv(text_run.run.path / "folds.csv")
    assert folds["fold"].tolist() == [i % 2 for i in range(len(folds))]


def test_the_lock_is_held_while_training_and_files_follow_the_umask(text_run):
    note("lock: probe while fold 0 trains", text_run.probes[0].strip())
    assert "is in use by another artlearn process" in text_run.probes[0] and f"pid {os.getpid()}" in text_run.probes[0]
    modes = {str(p.relative_to(text_run.run.path)): p.stat().st_mode & 0o777
             for p in text_run.run.path.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes  # 0o666 less the umask, not mkstemp's 0o600


def test_labels_are_normalised_at_every_entry_and_mixed_types_are_text(data, tmp_path, dry):
    df = data.train.copy()
    df.loc[df["artist"] == "Ana", "artist"] = ["Van Gogh", "Van Gogh ", " Van  Gogh", "Van\u00a0Gogh"] * 2
    assert set(al.assign_folds(df, 2)["artist"]) == {"Van Gogh", "Bo", "Cy", "Solo"}
    dls = al.artist_dls(df, fold=0, n_folds=2, size=32, bs=4)
    assert list(dls.vocab) == sorted({"Van Gogh", "Bo", "Cy", "Solo"})
    run, _, _ = train(df, tmp_path / "run")
    assert run.config["n_artists"] == 4
    mixed = data.train.copy()
    mixed["artist"] = [7, "7", 8, "8 ", 9, "09"] * 3 + [7, 8, 9, "x"]
    assert set(al.assign_folds(mixed, 2)["artist"]) == {"7", "8", "9", "09", "x"}


def test_folder_layout_reports_every_skipped_file_and_a_competition_root(data, tmp_path):
    root = tmp_path / "artists"
    for artist in ("Ana", "Bo"):
        for j in range(3):
            write_image(root / artist / f"{j}.jpg", seed=j)
    write_image(root / "Bo" / "x.jfif", fmt="JPEG")
    (root / "Bo" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    write_image(root / "Bo" / "sketches" / "s.jpg")
    (root / "Cy").mkdir()
    (root / "README.txt").write_text("about")
    with pytest.warns(UserWarning, match="skipped 5 entr") as rec:
        df = al.read_artworks(root)
    message = note("layout: skipped files (.jfif, broken symlink, nested folder, empty artist, loose file)",
                   rec[0].message)
    for part in ("1 unknown extension", "x.jfif", "1 broken symlink", "1 nested folder", "1 artist folder without "
                 "images (artist left out)", "1 file outside the artist folders"):
        assert part in message, part
    assert sorted(df["artist"].unique()) == ["Ana", "Bo"] and len(df) == 6
    with refused("layout: a competition root passed as a folder layout", "is a competition folder",
                 "train.csv", "not a folder of artist sub-folders", "kind='train'"):
        al.read_artworks(data.root)


def test_a_symlinked_images_folder_is_not_escaping(data, tmp_path):
    elsewhere = tmp_path / "other_disk" / "images"
    shutil.copytree(data.root / "train", elsewhere)
    root = tmp_path / "data"
    root.mkdir()
    (root / "train").symlink_to(elsewhere, target_is_directory=True)
    shutil.copy(data.csv, root / "train.csv")
    df = al.read_artworks(root / "train.csv", kind="train")
    assert len(df) == len(data.train) and all(Path(p).is_file() for p in df["img_path"])


def _run_copy(base_run, dst) -> Path:
    """A copy of the finished base run (weights hard-linked)."""
    shutil.copytree(base_run.run.path, dst, copy_function=link_or_copy)
    return Path(dst)


def test_stray_and_foreign_fold_folders_are_never_ensembled(base_run, data, tmp_path):
    out = _run_copy(base_run, tmp_path / "run")
    fold_copy(out / "fold0", out / "fold9")
    (out / "fold9" / "oof.csv").write_bytes((out / "fold0" / "oof.csv").read_bytes())
    fold_copy(out / "fold1", out / "fold01")
    run = al.load_run(out)
    assert run.folds == [0, 1] and len(run.oof) == len(data.train)
    assert set(run.ignored) == {"fold9", "fold01"}
    note("consistency: a stray fold9/ in a 2-fold run (load_run ignores it)",
         run.ignored["fold9"] + " | " + run.ignored["fold01"])
    shutil.rmtree(out / "fold1")
    fold_copy(out / "fold0", out / "fold1")  # fold 0's checkpoint copied into fold1/
    run = al.load_run(out)
    assert run.folds == [0] and "fold=0" in run.ignored["fold1"]
    note("consistency: a fold folder holding another fold's checkpoint", run.ignored["fold1"])
    assert not al.run.fold_is_complete(out / "fold1", run.config)  # train_kfold retrains it


def test_a_run_whose_config_was_deleted_is_not_taken_over(base_run, data, tmp_path):
    out = _run_copy(base_run, tmp_path / "run")
    (out / "config.json").unlink()
    refused_run("consistency: rerun after config.json was deleted", data.train, out,
                "is not empty and not an artlearn run directory", epochs=2)


def test_a_missing_history_excludes_a_fold_with_the_right_reason(base_run, tmp_path):
    out = _run_copy(base_run, tmp_path / "run")
    (out / "fold1" / "history.csv").unlink()
    assert select_folds(out).folds == [0, 1]  # every complete fold: its history is not needed to keep it
    selection = select_folds(out, rule="stable")
    reason = note("consistency: a fold without history.csv in select_folds", selection.excluded[1])
    assert selection.folds == [0] and "no history.csv in" in reason and "name it by hand" in reason
    assert select_folds(out, folds=[0, 1]).folds == [0, 1]


@pytest.mark.parametrize("where", ["CSV", "DataFrame"])
def test_an_empty_img_path_cell_is_named(data, tmp_path, where):
    table = pd.read_csv(data.csv)
    table.loc[4, "img_path"] = None
    csv = _write_csv(data.root, "empty_img_path.csv", table.to_numpy().tolist())
    with refused(f"table: an empty img_path cell ({where})", "column 'img_path' is empty in 1 row(s): row 4 (line 6)"):
        if where == "CSV":
            al.read_artworks(csv, kind="train")
        else:
            train(data.train.assign(img_path=lambda d: d["img_path"].where(d.index != 4, None)), tmp_path / "run")
    csv.unlink()


# ---------------------------------------------------------------- 9. red team: careless users and hostile files

RED = {}  # case -> (verdict, parts of the message, function)


def red(case, verdict, *parts):
    """Register a red-team case: 'refused' (fn returns the action, refused before anything is written) or 'handled'
    (fn asserts the correct result and may return a note)."""
    def register(fn):
        RED[case] = (verdict, parts, fn)
        return fn
    return register


def _csv_text(data, change) -> Path:
    """A copy of the shared train.csv with its text changed (written next to it, removed by the test runner)."""
    path = data.root / "red.csv"
    path.write_bytes(change(data.csv.read_text()) if not isinstance(change, bytes) else change)
    return path


@red("CSV with a UTF-8 byte-order mark", "handled")
def _(c):
    csv = _csv_text(c.data, lambda t: b"\xef\xbb\xbf" + t.encode())
    assert list(al.read_artworks(csv, kind="train").columns) == ["id", "img_path", "artist"]


@red("CSV with Windows line endings", "handled")
def _(c):
    csv = _csv_text(c.data, lambda t: t.replace("\n", "\r\n").encode())
    assert al.read_artworks(csv, kind="train")["artist"].tolist() == c.data.train["artist"].tolist()


@red("CSV separated by ';'", "refused", "columns are ['id;img_path;artist']", "is the file separated by ';'")
def _(c):
    csv = _csv_text(c.data, lambda t: t.replace(",", ";").encode())
    return lambda: al.read_artworks(csv, kind="train")


@red("CSV with capitalised headers (IMG_PATH, Artist)", "refused", "column names are lower case")
def _(c):
    csv = _csv_text(c.data, lambda t: t.replace("img_path", "IMG_PATH", 1).encode())
    return lambda: al.read_artworks(csv, kind="train")


@red("CSV saved as Latin-1", "refused", "not UTF-8 text", "save the CSV as UTF-8")
def _(c):
    csv = _csv_text(c.data, lambda t: t.replace("Ana", "D\u00fcrer").encode("latin-1"))
    return lambda: al.read_artworks(csv, kind="train")


@red("Windows backslash paths", "refused", "do not exist", "train\\TRAIN_0000.jpg")
def _(c):
    csv = _csv_text(c.data, lambda t: t.replace("./train/TRAIN_0000", "train\\TRAIN_0000").encode())
    return lambda: al.read_artworks(csv, kind="train")


@red("a relative path with '..' that stays inside", "handled")
def _(c):
    csv = _csv_text(c.data, lambda t: t.replace("./train/TRAIN_0000", "train/../train/TRAIN_0000").encode())
    assert al.read_artworks(csv, kind="train")["img_path"].iloc[0] == c.data.train["img_path"].iloc[0]


@red("read_artworks on a path that does not exist", "refused", "no such CSV file")
def _(c):
    return lambda: al.read_artworks(c.tmp / "nowhere.csv")


@red("read_artworks on an empty folder", "refused", "no images found in artist sub-folders")
def _(c):
    (c.tmp / "empty").mkdir()
    return lambda: al.read_artworks(c.tmp / "empty")


@red("artist labels in quotes with spaces, NFD accents, double spaces", "handled")
def _(c):
    df = c.data.train.copy()
    df["artist"] = ["  D\u00fcrer", "Du\u0308rer ", "D\u00fcrer", "Van  Gogh", "Van Gogh", "x"] * 3 + ["y"] * 4
    assert set(al.assign_folds(df, 2)["artist"]) == {"D\u00fcrer", "Van Gogh", "x", "y"}


@red("artists that differ only in case", "handled")
def _(c):
    df = c.data.train.assign(artist=["Monet", "monet"] * 11)
    with pytest.warns(UserWarning, match="differ only in upper/lower case") as rec:
        out = al.assign_folds(df, 2)
    assert set(out["artist"]) == {"Monet", "monet"}
    return rec[0].message


@red("float artist labels in a DataFrame (1.0, 2.0)", "handled")
def _(c):
    df = c.data.train.assign(artist=[1.0, 2.0] * 11)
    assert set(al.assign_folds(df, 2)["artist"]) == {"1.0", "2.0"}


@red("ids 1 and '1' in one DataFrame", "refused", "column 'id' has 1 duplicated id(s): '1'")
def _(c):
    df = c.data.train.copy()
    df["id"] = [1, "1"] + [f"x{i}" for i in range(20)]
    return lambda: train(df, c.tmp / "run")


@red("img_path given as pathlib.Path objects", "handled")
def _(c):
    df = c.data.train.assign(img_path=[Path(p) for p in c.data.train["img_path"]])
    assert al.validate_table(df, "t")["img_path"].tolist() == c.data.train["img_path"].tolist()


@red("img_path given as integers (file descriptors!)", "refused", "column 'img_path' holds 22 value(s) that are not "
     "paths")
def _(c):
    df = c.data.train.assign(img_path=range(22))
    return lambda: train(df, c.tmp / "run")


@red("img_path pointing to a folder", "refused", "1 of 22 image file(s) in 'img_path' do not exist")
def _(c):
    df = c.data.train.copy()
    df.loc[0, "img_path"] = str(c.data.root / "train")
    return lambda: train(df, c.tmp / "run")


@red("a table that is a path string, not a DataFrame", "refused", "need a pandas DataFrame (got str)")
def _(c):
    return lambda: train(str(c.data.csv), c.tmp / "run")


@red("an empty DataFrame", "refused", "the table has no rows")
def _(c):
    return lambda: train(c.data.train.iloc[:0], c.tmp / "run")


@red("a fold column with 1.5, -1 and x", "refused", "column 'fold' has values", "'-1'", "'1.5'", "'x'")
def _(c):
    df = c.data.train.assign(fold=["1.5", "-1", "x"] + ["0", "1"] * 9 + ["0"])
    return lambda: train(df, c.tmp / "run")


@red("a fold column that leaves a fold without rows", "refused", "leaves fold(s) [1] without validation rows")
def _(c):
    df = c.data.train.assign(fold=[0, 2] * 11)
    return lambda: train(df, c.tmp / "run", n_folds=3)


@red("a fold column with ' 1' and '01'", "handled")
def _(c):
    out = kfold_module._given_folds(c.data.train.assign(fold=[" 1", "01", "0"] * 7 + ["0"]), 2)
    assert out["fold"].tolist()[:3] == [1, 1, 0]


@red("more folds than distinct images (copies)", "refused", "larger than the number of distinct images (2)")
def _(c):
    paths = list(c.data.train["img_path"].iloc[[0, 1]]) * 3
    df = pd.DataFrame({"img_path": paths, "artist": ["Ana", "Bo"] * 3})
    return lambda: al.assign_folds(df, 3)


@red("artists and ids that look like CSV syntax or numbers", "handled")
def _(c):
    df = c.data.train.assign(artist=['Smith, "Jr."', "1e5", "0x1", "nan "] * 5 + ["1e5", "0x1"],
                             id=[f"{i:03d}" for i in range(22)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfold_module, "_train_fold", lambda job, k, **kw: None)
        run, _, _ = train(df, c.tmp / "run")
    folds = al.run.read_folds(run.path / "folds.csv")
    assert set(folds["artist"]) == {'Smith, "Jr."', "1e5", "0x1", "nan"} and folds["id"].iloc[7] == "007"


@red("a PNG named .jpg, an animated GIF, a 1x1 image", "handled")
def _(c):
    png = write_image(c.tmp / "png.jpg", fmt="PNG")
    gif = c.tmp / "anim.gif"
    frames = [Image.new("RGB", (20, 20), color) for color in ("red", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    tiny = write_image(c.tmp / "tiny.png", size=(1, 1))
    report = al.check_images(pd.DataFrame({"img_path": [str(png), str(gif), str(tiny)]}))
    assert report["ok"].all() and "small" in report["odd"].iloc[2]
    assert al.load_rgb(gif).size == (20, 20)


@red("folder layout: hidden files, upper-case .JPG, a symlinked artist folder", "handled")
def _(c):
    root = c.tmp / "layout"
    write_image(root / "Ana" / "a.JPG")
    write_image(root / "Ana" / "b.jpg")
    (root / "Ana" / ".DS_Store").write_bytes(b"\0")
    write_image(c.tmp / "elsewhere" / "c.png")
    (root / "Bo").symlink_to(c.tmp / "elsewhere", target_is_directory=True)
    df = al.read_artworks(root)
    assert sorted(df["artist"]) == ["Ana", "Ana", "Bo"]


@red("--out an empty existing folder", "handled")
def _(c):
    (c.tmp / "run").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfold_module, "_train_fold", lambda job, k, **kw: None)
        train(c.data.train, c.tmp / "run")
    assert (c.tmp / "run" / "config.json").is_file()


@red("--out holding only the stale lock of a killed run", "handled")
def _(c):
    (c.tmp / "run").mkdir()
    (c.tmp / "run" / ".lock").write_text("pid 999999 on a-host, since 2020-01-01 00:00:00\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfold_module, "_train_fold", lambda job, k, **kw: None)
        train(c.data.train, c.tmp / "run")
    assert f"pid {os.getpid()}" in (c.tmp / "run" / ".lock").read_text()


def _marked(c, config_text) -> Path:
    """A run folder holding only a config.json with the given text."""
    out = c.tmp / "run"
    out.mkdir()
    (out / "config.json").write_text(config_text)
    return out


@red("config.json that is not JSON", "refused", "config.json: not valid JSON", "restore it, or use another --out")
def _(c):
    out = _marked(c, "{oops")
    return lambda: train(c.data.train, out)


@red("config.json that is a JSON list", "refused", "is not an artlearn run config")
def _(c):
    out = _marked(c, "[1, 2]")
    return lambda: train(c.data.train, out)


@red("config.json of a newer artlearn", "refused", "has run format version 99", "upgrade artlearn")
def _(c):
    out = _marked(c, json.dumps({"format": "artlearn-run", "format_version": 99}))
    return lambda: train(c.data.train, out)


@red("config.json that is a folder", "refused", "is not empty and not an artlearn run directory")
def _(c):
    (c.tmp / "run" / "config.json").mkdir(parents=True)
    return lambda: train(c.data.train, c.tmp / "run")


@red("--out a symlink to the data folder", "refused", "holds the data")
def _(c):
    (c.tmp / "link").symlink_to(c.data.root, target_is_directory=True)
    return lambda: train(c.data.train, c.tmp / "link", overwrite=True)


@red("--out inside the data folder (data/runs/x)", "handled")
def _(c):
    root = c.tmp / "data"
    shutil.copytree(c.data.root, root)
    df = al.read_artworks(root / "train.csv", kind="train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfold_module, "_train_fold", lambda job, k, **kw: None)
        train(df, root / "runs" / "x")
    assert (root / "runs" / "x" / "config.json").is_file()


@red("--overwrite while another process holds the lock", "refused", "is in use by another artlearn process")
def _(c):
    out = _run_copy(c.base, c.tmp / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    c.cleanup.append(lambda: (holder.kill(), holder.wait()))
    return lambda: train(c.data.train, out, overwrite=True)


def _damaged_run(c, fold_file, change) -> Path:
    """A copy of the base run with one file changed."""
    out = _run_copy(c.base, c.tmp / "run")
    path = out / fold_file
    path.unlink()
    path.write_bytes(change)
    return out


@red("summary.json that is not JSON", "refused", "summary.json: not valid JSON", "finish_run rewrites it")
def _(c):
    out = _damaged_run(c, "summary.json", b"{")
    return lambda: al.load_run(out)


@red("oof.csv with a probability that is not a number", "refused", "oof.csv: column 'p_Ana' holds 1 value(s) that "
     "are not numbers")
def _(c):
    text = (c.base.run.path / "fold0" / "oof.csv").read_text().splitlines()
    header = text[0].split(",")
    row = text[1].split(",")
    row[header.index("p_Ana")] = "abc"
    out = _damaged_run(c, "fold0/oof.csv", "\n".join([text[0], ",".join(row), *text[2:]]).encode())
    return lambda: al.load_run(out)


@red("oof.csv without its pred column", "refused", "oof.csv: missing column(s) ['pred']")
def _(c):
    oof = pd.read_csv(c.base.run.path / "fold0" / "oof.csv").drop(columns="pred")
    out = _damaged_run(c, "fold0/oof.csv", oof.to_csv(index=False).encode())
    return lambda: al.load_run(out)


@red("folds.csv without its fold column", "refused", "folds.csv: missing column(s) ['fold']")
def _(c):
    folds = pd.read_csv(c.base.run.path / "folds.csv").drop(columns="fold")
    out = _damaged_run(c, "folds.csv", folds.to_csv(index=False).encode())
    return lambda: finish_run(out)


@red("history.csv that is binary garbage", "handled")
def _(c):
    out = _damaged_run(c, "fold1/history.csv", bytes(range(256)) * 4)
    reason = select_folds(out, rule="stable").excluded[1]
    assert "history.csv: not a readable history CSV" in reason or "missing column" in reason
    return reason


@red("history.csv without its valid_loss column", "handled")
def _(c):
    hist = pd.read_csv(c.base.run.path / "fold1" / "history.csv").drop(columns="valid_loss")
    out = _damaged_run(c, "fold1/history.csv", hist.to_csv(index=False).encode())
    reason = select_folds(out, rule="stable").excluded[1]
    assert "missing column(s) ['valid_loss']" in reason
    return reason


@red("best.safetensors of 0 bytes", "refused", "is truncated or not a safetensors file")
def _(c):
    out = _damaged_run(c, "fold0/best.safetensors", b"")
    return lambda: load_fold(out / "fold0")


@red("best.safetensors with an extra tensor", "refused", "unexpected tensor 'extra.weight'")
def _(c):
    from safetensors.torch import save_file
    out = _run_copy(c.base, c.tmp / "run")
    state = load_weights(out / "fold0" / "best.safetensors")
    (out / "fold0" / "best.safetensors").unlink()
    save_file({**state, "extra.weight": torch.zeros(2)}, out / "fold0" / "best.safetensors")
    forbid_real_models(c.mp)
    return lambda: load_fold(out / "fold0")


@red("a fold folder from a run with another seed", "handled")
def _(c):
    out = _run_copy(c.base, c.tmp / "run")
    meta = json.loads((out / "fold1" / "meta.json").read_text())
    (out / "fold1" / "meta.json").unlink()
    (out / "fold1" / "meta.json").write_text(json.dumps({**meta, "split_seed": 7}))
    run = al.load_run(out)
    assert run.folds == [0] and "split_seed=7" in run.ignored["fold1"]
    return run.ignored["fold1"]


@red("finish_run on a folder without config.json", "refused", "not an artlearn run directory (no config.json)")
def _(c):
    (c.tmp / "x").mkdir()
    return lambda: finish_run(c.tmp / "x")


@red("finish_run(select=[])", "refused", "folds [] have no complete checkpoint")
def _(c):
    out = _run_copy(c.base, c.tmp / "run")
    return lambda: finish_run(out, select=[])


@red("select_folds(folds=['x'])", "refused", "folds=['x']: need fold numbers")
def _(c):
    return lambda: select_folds(c.base.run, folds=["x"])


@red("seed=2**40 and seed=1.5", "refused", "seed=1.5: need an integer")
def _(c):
    with raises_msg("seed=1099511627776"):
        train(c.data.train, c.tmp / "run", seed=2 ** 40)
    return lambda: train(c.data.train, c.tmp / "run", seed=1.5)


@red("a DataFrame with a shuffled, duplicated index and numpy n_folds", "handled")
def _(c):
    df = c.data.train.sample(frac=1.0, random_state=0)
    df.index = [5] * 11 + [7] * 11
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfold_module, "_train_fold", lambda job, k, **kw: None)
        run, _, _ = train(df, c.tmp / "run", n_folds=np.int64(2))
    assert run.config["n_folds"] == 2 and len(al.run.read_folds(run.path / "folds.csv")) == 22


@red("img_path cells with a leading space", "refused", "do not exist", " ./train/TRAIN_0000.jpg")
def _(c):
    csv = _csv_text(c.data, lambda t: t.replace(",./train/TRAIN_0000", ", ./train/TRAIN_0000").encode())
    return lambda: al.read_artworks(csv, kind="train")


@red("an artist named like a column or with a slash (pred, p_Ana, AC/DC)", "handled")
def _(c):
    df = c.data.train.assign(artist=["pred", "p_Ana", "AC/DC", "fold"] * 5 + ["pred", "fold"])
    assert set(al.assign_folds(df, 2)["artist"]) == {"pred", "p_Ana", "AC/DC", "fold"}
    oof = pd.DataFrame({"artist": ["pred", "AC/DC"], "pred": ["pred", "fold"], "fold": [0, 1], "p_pred": [0.5, 0.1]})
    oof.to_csv(c.tmp / "oof.csv", index=False)
    assert al.run.oof_scores(al.run.read_oof(c.tmp / "oof.csv"))["accuracy"] == 0.5


@contextmanager
def raises_msg(part):
    """pytest.raises(ValueError) containing part."""
    with pytest.raises(ValueError, match=re.escape(part)):
        yield


@pytest.mark.parametrize("case", list(RED))
def test_red_team(case, data, base_run, tmp_path, monkeypatch):
    verdict, parts, fn = RED[case]
    c = SimpleNamespace(data=data, base=base_run, tmp=tmp_path, mp=monkeypatch, cleanup=[])
    extra = set(data.root.iterdir())
    try:
        if verdict == "refused":
            action = fn(c)
            with unchanged(data.root, tmp_path), refused(f"red: {case}", *parts):
                action()
        else:
            note(f"red: {case}", fn(c) or "handled correctly")
    finally:
        for undo in c.cleanup:
            undo()
        for p in set(data.root.iterdir()) - extra:  # red.csv and the like
            p.unlink()


# ---------------------------------------------------------------- 10. identity, changed data, private store (issue 29)


def _rewrite_meta(folder, change) -> dict:
    """Edit a fold's meta.json as a new file (a run copy's files are hard links to the base run's)."""
    path = Path(folder) / "meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.unlink()
    path.write_text(json.dumps(meta))
    return meta


def _replace_file(path, data: bytes) -> None:
    """Write `data` to a new file at path (never through a hard link)."""
    Path(path).unlink()
    Path(path).write_bytes(data)


def test_weights_copied_from_another_fold_are_refused_and_retrained_on_resume(base_run, data, tmp_path, dry):
    out = _run_copy(base_run, tmp_path / "run")
    _replace_file(out / "fold1" / "best.safetensors", (out / "fold0" / "best.safetensors").read_bytes())
    fold0 = snapshot(out / "fold0")
    with refused("identity: fold0/best.safetensors copied into fold1/ (load_fold)", "fold1/best.safetensors",
                 "sha256", "its meta.json recorded", "rerun train_kfold"):
        load_fold(out / "fold1")
    with refused("identity: fold0/best.safetensors copied into fold1/ (ensemble)", "fold1/best.safetensors", "sha256"):
        al.ensemble(out, data.test, bs=4)
    with refused("identity: fold0/best.safetensors copied into fold1/ (predict)", "fold1/best.safetensors", "sha256"):
        al.predict(out, data.test["img_path"][:1].tolist())
    _, lines, _ = train(data.train, out)
    assert dry == [1]  # only the copied fold is trained again; fold 0 is kept byte for byte
    assert snapshot(out / "fold0") == fold0 and not (out / "fold1" / "best.safetensors").exists()
    why = next(line for line in lines if "not this run's" in line)
    assert "fold 1" in why and "sha256" in why
    note("identity: fold0/best.safetensors copied into fold1/ (resume retrains it)", why)


def test_a_fold_folder_linked_to_another_runs_fold_is_refused_and_never_written_through(base_run, data, tmp_path):
    out, other = _run_copy(base_run, tmp_path / "run"), _run_copy(base_run, tmp_path / "other")
    shutil.rmtree(out / "fold1")
    (out / "fold1").symlink_to(other / "fold1", target_is_directory=True)
    with refused("identity: fold1/ a symlink to another run's fold1 (load_fold)", "fold1 is a symbolic link"):
        load_fold(out / "fold1")
    run = al.load_run(out)
    assert run.folds == [0] and "symbolic link" in run.ignored["fold1"]
    with unchanged(other), refused("identity: fold1/ a symlink to another run's fold1 (ensemble)", "folds [1]"):
        al.ensemble(out, data.test)
    refused_run("identity: fold1/ a symlink to another run's fold1 (resume)", data.train, out,
                f"fold1 -> {other / 'fold1'}", "symbolic link", "remove the link", watch=[other])


FOREIGN_META = {  # case: (change to fold1's meta.json, parts of the message)
    "another tool's format": (lambda m: m.update(format="other-tool", format_version=99),
                              ["'format' is 'other-tool'", "'artlearn-fold'"]),
    "a newer format version": (lambda m: m.update(format_version=99), ["'format_version' is 99", "1..3"]),
    "vocab reversed": (lambda m: m.update(vocab=m["vocab"][::-1]),
                       ["'vocab' is not the run's artists", "folds.csv", "another order"]),
    "pipeline 'bogus'": (lambda m: m.update(pipeline="bogus"), ["'pipeline' is 'bogus'", "['device', 'items']"]),
    "run_id of another run": (lambda m: m.update(run_id="0" * 32), ["run_id 000", "is not this run's", "config.json"]),
    "weights digest not hex": (lambda m: m.update(weights_sha256="xyz"), ["'weights_sha256' is 'xyz'"]),
    "fold number of fold 0": (lambda m: m.update(fold=0), ["says fold=0", "fold1"]),
    "complete as text": (lambda m: m.update(complete="yes"), ["'complete' is 'yes'", "true or false"]),
    "monitor unknown": (lambda m: m.update(monitor="loss"), ["'monitor' is 'loss'"]),
    "class_counts too short": (lambda m: m.update(class_counts=[1, 2]), ["'class_counts' is [1, 2]"]),
    "ema out of range": (lambda m: m.update(ema=1.5), ["'ema' is 1.5"]),
    "score NaN": (lambda m: m.update(score=float("nan")), ["'score' is nan"]),
}


RESUMED = ("another tool's format", "vocab reversed", "pipeline 'bogus'", "fold number of fold 0")


@pytest.mark.parametrize("case", list(FOREIGN_META))
def test_a_fold_meta_json_that_is_not_this_runs_is_refused_never_coerced(base_run, data, tmp_path, dry, case):
    change, parts = FOREIGN_META[case]
    out = _run_copy(base_run, tmp_path / "run")
    _rewrite_meta(out / "fold1", change)
    with refused(f"identity: fold meta.json with {case}", "fold1", *parts):
        load_fold(out / "fold1")
    with refused(f"identity: fold meta.json with {case} (ensemble)", "fold1", *parts):
        al.ensemble([out / "fold0", out / "fold1"], data.test)
    if case in RESUMED:  # the resume path is the same for every field: run for a few (each costs a dry run)
        fold0 = snapshot(out / "fold0")
        _, lines, _ = train(data.train, out)
        assert dry == [1] and snapshot(out / "fold0") == fold0
        assert any("fold 1: its checkpoint is not this run's" in line and parts[0] in line for line in lines)


def test_a_tensor_of_another_dtype_is_refused_never_cast(base_run, tmp_path):
    from safetensors.torch import save_file
    folder = fold_copy(base_run.run.fold_dir(0), tmp_path / "fold0", weights=False)
    state = load_weights(base_run.run.fold_dir(0) / "best.safetensors")
    state["fc.weight"] = (state["fc.weight"] * 1000).to(torch.int64)
    save_file(state, folder / "best.safetensors")
    _rewrite_meta(folder, lambda m: m.update(weights_sha256=al.checkpoint.file_sha256(folder / "best.safetensors")))
    with refused("identity: classifier weight stored as int64", "best.safetensors: tensor 'fc.weight' is torch.int64",
                 "expects torch.float32", "never casts"):
        load_fold(folder)


def test_runs_written_before_the_identity_fields_still_load_and_resume(base_run, data, tmp_path, dry):
    out = _run_copy(base_run, tmp_path / "run")
    for k in (0, 1):
        meta = _rewrite_meta(out / f"fold{k}", lambda m: [m.pop(key) for key in ("run_id", "weights_sha256")]
                             + [m.update(format_version=2)])
        assert "run_id" not in meta and meta["format_version"] == 2
    model, meta = load_fold(out / "fold1")
    assert meta["fold"] == 1
    probs, vocab = al.ensemble(out, data.test, bs=4)
    assert probs.shape == (len(data.test), len(vocab))
    train(data.train, out)
    assert dry == []  # nothing retrained
    written = json.loads((base_run.run.fold_dir(0) / "meta.json").read_text())
    assert written["format_version"] == 3 and len(written["run_id"]) == 32 and len(written["weights_sha256"]) == 64
    assert written["weights_sha256"] == al.checkpoint.file_sha256(base_run.run.fold_dir(0) / "best.safetensors")


def _own_data(tmp_path) -> pd.DataFrame:
    """A small training table of its own (the test changes its images)."""
    csv = make_dataset(tmp_path / "own", {"Ana": 5, "Bo": 5, "Cy": 4}, size=(36, 36))
    return al.read_artworks(csv, kind="train")


@pytest.mark.parametrize("change", ["repainted", "deleted"])
def test_images_changed_between_folds_stop_the_run_naming_them(tmp_path, monkeypatch, change):
    df = _own_data(tmp_path)
    victim = df["img_path"][3]
    fitted = []

    def fake_train(job, k, **kw):
        fitted.append(k)
        if k == 0:
            if change == "repainted":
                write_image(victim, (36, 36), color=(0, 250, 0), seed=99)
            else:
                os.unlink(victim)

    monkeypatch.setattr(kfold_module, "_train_fold", fake_train)
    out = tmp_path / "run"
    why = "content changed" if change == "repainted" else "deleted or moved"
    with refused(f"changed data: an image {change} during fold 0", "fold 0's out-of-fold predictions", victim, why,
                 "Restore the images"):
        train(df, out)
    assert fitted == [0] and not (out / "summary.json").exists()


def test_images_changed_before_a_resume_are_named_by_the_config_check(tmp_path, dry):
    df = _own_data(tmp_path)
    train(df, tmp_path / "run")
    write_image(df["img_path"][0], (36, 36), color=(0, 250, 0), seed=99)
    with refused("changed data: an image repainted between two train_kfold calls", "different configuration",
                 "data:"):
        train(al.read_artworks(tmp_path / "own" / "train.csv", kind="train"), tmp_path / "run")


def test_the_data_recheck_rereads_only_changed_files(tmp_path, monkeypatch):
    from artlearn import tables
    df = _own_data(tmp_path)
    digests, changes = tables.digest_changes(df["img_path"])
    assert changes == [] and None not in digests
    read = []
    real = tables.content_digest
    monkeypatch.setattr(tables, "content_digest", lambda p: read.append(p) or real(p))
    again, changes = tables.digest_changes(df["img_path"])
    assert again == digests and read == [] and changes == []
    os.utime(df["img_path"][2])  # touched, same bytes: read again, not a change
    again, changes = tables.digest_changes(df["img_path"])
    assert read == [df["img_path"][2]] and changes == [] and again == digests


def test_a_store_file_replaced_by_another_images_array_is_never_served(tmp_path, caplog):
    from artlearn.store import PresizeCache
    a = str(write_image(tmp_path / "a.png", (30, 20), color=(200, 0, 0), seed=1))
    b = str(write_image(tmp_path / "b.png", (30, 20), color=(0, 0, 200), seed=2))
    first = PresizeCache(16, mode="disk", cache_dir=tmp_path / "cache")
    first.fill([a, b])
    want_a = first.get(a).copy()
    file_a, file_b = (first._disk_path(first._disk_keys[p]) for p in (a, b))
    shutil.copy(file_b, file_a)  # a's store file now holds b's array
    caplog.set_level("WARNING", logger="artlearn")
    assert np.array_equal(first.get(a), want_a)  # read in this process: the claim is checked, a is decoded again
    again = PresizeCache(16, mode="disk", cache_dir=tmp_path / "cache")
    shutil.copy(file_b, file_a)
    again.fill([a])  # a later process: the file's claim is not a's
    assert again.n_decodes == 1 and np.array_equal(again.get(a), want_a)
    assert sum("claims to hold image" in r.getMessage() for r in caplog.records) == 2
    np.save(file_a, np.load(file_a)[:300])  # not a store file at all
    third = PresizeCache(16, mode="disk", cache_dir=tmp_path / "cache")
    third.fill([a])
    assert third.n_decodes == 1 and np.array_equal(third.get(a), want_a)


def test_an_image_deleted_after_it_was_stored_is_a_clear_error(tmp_path):
    from artlearn.store import PresizeCache
    a = write_image(tmp_path / "a.png", (30, 20), seed=1)
    for mode in ("memory", "disk"):
        cache = PresizeCache(16, mode=mode, cache_dir=tmp_path / "cache")
        cache.fill([str(a)])
        moved = a.rename(tmp_path / "moved.png")
        with refused(f"changed data: an image deleted after the store read it ({mode})", str(a), "deleted or moved"):
            cache.get(str(a))
        moved.rename(a)


PLANT = r"""
import os, sys
import numpy as np
os.setuid(65534)
folder = sys.argv[1]
os.mkdir(folder, 0o777)
os.chmod(folder, 0o777)
np.save(os.path.join(folder, "planted.npy"), np.zeros(10, np.uint8))
if len(sys.argv) > 2:
    os.symlink(sys.argv[3], sys.argv[2])
"""


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to act as a second user")
def test_a_store_folder_planted_by_another_user_is_never_used(tmp_path, monkeypatch, caplog):
    import tempfile

    from artlearn.store import PresizeCache, default_store_dir
    shared = Path(tempfile.mkdtemp(prefix="artlearn-test-tmp-", dir="/tmp"))  # a /tmp of its own: sticky, 1777
    try:
        shared.chmod(0o1777)
        monkeypatch.setattr(tempfile, "tempdir", str(shared))
        mine = default_store_dir()
        assert mine.parent == shared and mine.name.endswith(str(os.getuid()))
        subprocess.run([sys.executable, "-c", PLANT, str(mine)], check=True)  # uid 65534 takes the name first
        assert mine.stat().st_uid == 65534
        img = str(write_image(tmp_path / "a.png", (30, 20), seed=1))
        caplog.set_level("WARNING", logger="artlearn")
        cache = PresizeCache(16, mode="disk")
        cache.fill([img])
        used = cache.cache_dir
        assert used != mine and used.parent == shared and (used.stat().st_mode & 0o777) == 0o700
        assert used.stat().st_uid == os.getuid() and len(list(used.glob("*.npy"))) == 1
        assert sorted(p.name for p in mine.iterdir()) == ["planted.npy"]  # nothing written into the planted folder
        message = next(r.getMessage() for r in caplog.records if "belongs to another user" in r.getMessage())
        note("private store: the default store folder pre-created by another user", message)
        with refused("private store: cache_dir owned by another user", "belongs to another user (uid 65534"):
            PresizeCache(16, mode="disk", cache_dir=mine).fill([img])
        link = shared / "linked"
        subprocess.run([sys.executable, "-c", PLANT, str(shared / "other"), str(link), str(tmp_path)], check=True)
        with refused("private store: cache_dir a symlink planted by another user", "is a symbolic link"):
            PresizeCache(16, mode="disk", cache_dir=link).fill([img])
        open_dir = tmp_path / "open"
        open_dir.mkdir(mode=0o777)
        open_dir.chmod(0o777)
        with refused("private store: cache_dir writable by everyone", "writable by other users (mode 777)"):
            PresizeCache(16, mode="disk", cache_dir=open_dir).fill([img])
        assert list(open_dir.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_device_pipeline_trains_on_1x1_to_3x3_images(tmp_path):
    rows = []
    for i in range(12):
        side = 1 + i % 3
        path = write_image(tmp_path / f"im{i}.png", (side, side + i % 2), color=(80 * (i % 3), 0, 0), seed=i)
        rows.append((f"i{i}", str(path), f"A{i % 3}"))
    df = pd.DataFrame(rows, columns=["id", "img_path", "artist"])
    run, _, _ = train(df, tmp_path / "run", size=16, bs=4, pipeline="device")
    assert run.folds == [0, 1] and len(run.oof) == 12 and np.isfinite(run.oof.filter(like="p_").to_numpy()).all()


# ---------------------------------------------------------------- 11. the last raw errors (issue 29)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def script(name: str):
    """An example script loaded in-process (no second interpreter start-up)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{Path(name).name}_script_29", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(capsys, case, *parts) -> str:
    """The script's stderr: one 'error: ...' line holding every part (recorded for docs/robustness.md)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    missing = [p for p in parts if p not in err]
    assert not missing, f"{missing} not in {err}"
    return note(case, err.strip())


def test_disk_full_during_a_checkpoint_keeps_the_earlier_one_and_the_run_resumes(tmp_path, monkeypatch):
    import errno

    from artlearn import files
    df = _own_data(tmp_path)
    real, seen = files._write_all, []

    def full_disk(f, data, path):
        seen.append(Path(path).name)
        if {"history.csv", "meta.json"} <= set(seen[:-1]) and seen[-1] in ("best.safetensors", "history.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")  # the second epoch's first write
        real(f, data, path)

    monkeypatch.setattr(files, "_write_all", full_disk)
    out = tmp_path / "run"
    with refused("resource: disk full during a checkpoint write", "no space left on the device",
                 "previous version of the file (an earlier checkpoint) is kept", "rerun"):
        train(df, out, epochs=2)
    monkeypatch.setattr(files, "_write_all", real)
    kept = read_meta(out / "fold0")
    assert kept["epoch"] == 0 and not kept["complete"] and load_fold(out / "fold0")[1]["epoch"] == 0
    assert not list(out.rglob("*.tmp"))
    run, _, _ = train(df, out, epochs=2, folds=[0])  # resumes: fold 0 trained again, complete this time
    assert run.folds == [0] and read_meta(out / "fold0")["epochs_run"] == 2


def test_a_submission_into_a_read_only_folder_or_a_folder_path_is_one_clear_error(tmp_path):
    probs, ids, vocab = np.eye(3), ["a", "b", "c"], ["X", "Y", "Z"]
    with refused("resource: write_submission to a folder", str(tmp_path), "is a folder", "submission.csv"):
        al.write_submission(ids, probs, vocab, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    al.write_submission(ids, probs, vocab, locked / "submission.csv")
    before = (locked / "submission.csv").read_bytes()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: a read-only mount is simulated instead
            import errno

            from artlearn import files
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(files.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(
                    OSError(errno.EROFS, "Read-only file system")))
                with refused("resource: write_submission into a read-only place", "submission.csv",
                             "cannot be written (Read-only file system)"):
                    al.write_submission(ids, probs[::-1], vocab, locked / "submission.csv")
        else:
            with refused("resource: write_submission into a read-only place", "cannot be written"):
                al.write_submission(ids, probs[::-1], vocab, locked / "submission.csv")
    finally:
        locked.chmod(0o755)
    assert (locked / "submission.csv").read_bytes() == before and sorted(os.listdir(locked)) == ["submission.csv"]


def test_a_temp_file_of_a_killed_write_is_removed_by_the_next_good_write(tmp_path):
    probs, ids, vocab = np.eye(2), ["a", "b"], ["X", "Y"]
    stale = tmp_path / ".submission.csv.k1ll3d_x.tmp"  # as a write killed mid-way leaves it
    stale.write_text("id,artist\na,")
    fresh = tmp_path / ".submission.csv.s7arting.tmp"  # a write that has just started (not locked yet)
    fresh.write_text("")
    foreign = [tmp_path / ".submission.csv.notes.tmp", tmp_path / ".other.csv.k1ll3d_x.tmp", tmp_path / "mine.tmp"]
    for p in [stale, *foreign]:
        p.write_text("keep")
        os.utime(p, (0, 0))
    al.write_submission(ids, probs, vocab, tmp_path / "submission.csv")
    assert not stale.exists() and fresh.exists() and all(p.exists() for p in foreign)


def test_ensemble_and_predict_refuse_bad_numbers_before_loading(base_run, data, monkeypatch):
    forbid_real_models(monkeypatch)
    for case, kw, part in [("bs=0", dict(bs=0), "bs=0: need an integer >= 1"),
                           ("prior_adjust=-5", dict(prior_adjust=-5), "prior_adjust=-5: need a number >= 0"),
                           ("prior_adjust=inf", dict(prior_adjust=float("inf")), "not inf or NaN")]:
        with refused(f"arguments: ensemble({case})", part):
            al.ensemble(base_run.run, data.test, **kw)
        with refused(f"arguments: predict({case})", part):
            al.predict(base_run.run, data.test["img_path"][:1].tolist(), **kw)


def test_train_kfold_refuses_a_non_finite_learning_rate(data, tmp_path):
    for value in (float("inf"), float("nan")):
        refused_run(f"arguments: train_kfold(lr={value})", data.train, tmp_path / "run", f"lr={value}",
                    "need a finite number > 0", lr=value)


def test_check_images_and_a_repeated_csv_column_are_refused_naming_the_column(data, tmp_path):
    with refused("arguments: check_images on a table without img_path", "'img_path' column", "['id', 'artist']"):
        al.check_images(data.train[["id", "artist"]])
    csv = tmp_path / "twice.csv"
    csv.write_text("id,img_path,artist,artist\na,x.jpg,Ana,Bo\n")
    with refused("tables: a CSV header naming 'artist' twice", str(csv), "['artist'] more than once"):
        al.read_artworks(csv, kind="train")


def test_fold_learner_refuses_items_without_artists(base_run, data):
    items = data.train[data.train["fold"] == 0] if "fold" in data.train.columns else data.train
    with refused("arguments: fold_learner(items=<table without artist>)", "no 'artist' column", "predict"):
        al.fold_learner(base_run.run.fold_dir(0), items=items.drop(columns="artist"))
    learn = al.fold_learner(base_run.run.fold_dir(0), items=items)
    assert len(learn.validate()) >= 2


def test_predict_script_errors_are_one_line_and_nothing_is_written(base_run, data, tmp_path, capsys):
    predict_py, image = script("predict"), data.test["img_path"][0]
    assert predict_py.main([str(base_run.run.path), image, "--folds", "0,x"]) == 2
    one_line(capsys, "cli: predict.py --folds 0,x", "--folds '0,x'", "comma-separated fold numbers")
    assert predict_py.main([str(base_run.run.path), image, "--csv", str(tmp_path)]) == 2
    one_line(capsys, "cli: predict.py --csv <a folder>", "--csv", "is a folder")
    assert predict_py.main([str(base_run.run.path), image, "--explain", str(tmp_path)]) == 2
    one_line(capsys, "cli: predict.py --explain <a folder>", "--explain", "is a folder")
    (tmp_path / "file").write_text("")
    assert predict_py.main([str(base_run.run.path), image, "--csv", str(tmp_path / "file" / "top.csv")]) == 2
    one_line(capsys, "cli: predict.py --csv under a file", "is not a folder this user can write")
    assert sorted(os.listdir(tmp_path)) == ["file"]
    assert predict_py.main([str(base_run.run.path), image, "--csv", str(tmp_path / "top.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "top.csv")) == 4  # 4 artists


def test_compare_report_only_on_a_hand_edited_jsonl_names_the_lines(tmp_path, capsys):
    compare = script("benchmarks/compare_recipes")
    jsonl = tmp_path / "edited.jsonl"
    jsonl.write_text('{"row": "best"}\n[1, 2]\nnot json\n{"row": "reference", "seed": "0"}\n')
    assert compare.read_records(jsonl) == []
    err = capsys.readouterr().err
    note("cli: compare_recipes --report-only on a hand-edited jsonl", err.strip().splitlines()[0])
    assert "edited.jsonl:3 is not JSON" in err and [f"record {i} is not usable" in err for i in (1, 2, 3)] == [True] * 3
    assert "missing or malformed 'data_fingerprint'" in err and "a JSON list" in err and "'seed'" in err


# ---------------------------------------------------------------- 12. red team of issue 29 (docs/robustness.md)

RED29 = {}  # case -> (class, verdict, parts of the message, function)


def red29(kind, case, verdict, *parts):
    """Register a case: 'refused' (fn does the set-up and returns the action, refused changing nothing under the
    test's folder) or 'handled' (fn asserts the right result and may return a note)."""
    def register(fn):
        RED29[case] = (kind, verdict, parts, fn)
        return fn
    return register


def _fold1(c, change):
    """A copy of the base run with fold1's meta.json changed; the action loads fold1."""
    out = _run_copy(c.base, c.tmp / "run")
    _rewrite_meta(out / "fold1", change)
    return lambda: load_fold(out / "fold1")


for _case, _change, _part in [
        ("meta.json 'fold' as text", lambda m: m.update(fold="1"), "'fold' is '1'"),
        ("meta.json n_folds 1", lambda m: m.update(n_folds=1), "'n_folds' is 1"),
        ("meta.json split_seed -1", lambda m: m.update(split_seed=-1), "'split_seed' is -1"),
        ("meta.json epoch -1", lambda m: m.update(epoch=-1), "'epoch' is -1"),
        ("meta.json epochs_run 2.0 (a float)", lambda m: m.update(epochs_run=2.0), "'epochs_run' is 2.0"),
        ("meta.json artlearn_version a number", lambda m: m.update(artlearn_version=1), "'artlearn_version' is 1"),
        ("meta.json weights_sha256 in upper case", lambda m: m.update(weights_sha256=m["weights_sha256"].upper()),
         "'weights_sha256' is '"),
        ("meta.json run_id of 31 digits", lambda m: m.update(run_id=m["run_id"][:31]), "'run_id' is '"),
        ("meta.json vocab naming an artist the run lacks", lambda m: m.update(vocab=[*m["vocab"][:-1], "Zed"]),
         "artists not in both: ['Solo', 'Zed']"),
        ("meta.json stopped a number", lambda m: m.update(stopped=3), "'stopped' is 3"),
        ("meta.json of fold0 copied over fold1's (weights fold1's)", lambda m: m.update(fold=0), "says fold=0")]:
    red29("identity", _case, "refused", "fold1", _part)(lambda c, change=_change: _fold1(c, change))


def _retyped(c, convert):
    """A fold folder (outside a run) whose tensors `convert` changed, with the digest of the new file recorded."""
    from safetensors.torch import save_file
    folder = fold_copy(c.base.run.fold_dir(0), c.tmp / "fold0", weights=False)
    state = {k: convert(k, v) for k, v in load_weights(c.base.run.fold_dir(0) / "best.safetensors").items()}
    save_file(state, folder / "best.safetensors")
    _rewrite_meta(folder, lambda m: m.update(weights_sha256=al.checkpoint.file_sha256(folder / "best.safetensors")))
    return lambda: load_fold(folder)


red29("identity", "every tensor stored as float16", "refused", "is torch.float16", "never casts")(
    lambda c: _retyped(c, lambda k, v: v.half() if v.is_floating_point() else v))
red29("identity", "num_batches_tracked stored as float32", "refused", "num_batches_tracked' is torch.float32")(
    lambda c: _retyped(c, lambda k, v: v.float()))


@red29("identity", "config.json edited (epochs) after the folds were trained", "refused", "is not this run's",
       "config.json")
def _(c):
    out = _run_copy(c.base, c.tmp / "run")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps({**config, "epochs": 9}))
    return lambda: load_fold(out / "fold0")


@red29("identity", "both files of fold0 copied into fold1/", "refused", "says fold=0")
def _(c):
    out = _run_copy(c.base, c.tmp / "run")
    for name in ("meta.json", "best.safetensors"):
        _replace_file(out / "fold1" / name, (out / "fold0" / name).read_bytes())
    return lambda: load_fold(out / "fold1")


@red29("identity", "a whole run directory copied elsewhere", "handled")
def _(c):
    out = _run_copy(c.base, c.tmp / "moved")
    probs, _ = al.ensemble(out, c.data.test, bs=4)
    assert np.allclose(probs, al.ensemble(c.base.run, c.data.test, bs=4)[0], atol=1e-6)
    return "the copy keeps its identity (run_id is the config's fingerprint, not the path): same predictions"


@red29("identity", "a fold folder copied out of its run", "handled")
def _(c):
    folder = fold_copy(c.base.run.fold_dir(1), c.tmp / "fold1")
    assert load_fold(folder)[1]["fold"] == 1
    return "loads alone: the weights digest is checked, the run's identity only inside a run"


@red29("identity", "weights replaced by a byte-identical copy", "handled")
def _(c):
    out = _run_copy(c.base, c.tmp / "run")
    _replace_file(out / "fold0" / "best.safetensors", (out / "fold0" / "best.safetensors").read_bytes())
    assert load_fold(out / "fold0")[1]["fold"] == 0
    return "same bytes, same digest: accepted"


def _changed(c, change, *, extra=None):
    """A small table with its fingerprint; `change` edits the images; the action re-checks them."""
    df = _own_data(c.tmp)
    config = {"data": al.run.data_fingerprint(df, al.tables.content_digests(df["img_path"]))}
    change(df)
    return lambda: al.run.check_data_unchanged(df, config, "fold 1")


def _repaint(path, seed=99):
    write_image(path, (36, 36), color=(0, 250, 0), seed=seed)


red29("changed data", "an image truncated between folds", "refused", "TRAIN_0001.jpg (content changed)")(
    lambda c: _changed(c, lambda df: Path(df["img_path"][1]).write_bytes(Path(df["img_path"][1]).read_bytes()[:50])))


def _restore_mtime(df):
    path = df["img_path"][2]
    st = os.stat(path)
    _repaint(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the mtime says nothing changed


red29("changed data", "an image repainted and its mtime restored", "refused", "TRAIN_0002.jpg (content changed)")(
    lambda c: _changed(c, _restore_mtime))


def _relink(df):
    os.unlink(df["img_path"][3])
    os.symlink(df["img_path"][9], df["img_path"][3])


red29("changed data", "an image replaced by a symlink to another image", "refused",
      "TRAIN_0003.jpg (content changed)")(lambda c: _changed(c, _relink))


def _swap(df):
    a, b = df["img_path"][0], df["img_path"][12]
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)


red29("changed data", "two images swapped", "refused", "2 training image(s) changed", "TRAIN_0000.jpg",
      "TRAIN_0012.jpg")(lambda c: _changed(c, _swap))
red29("changed data", "an image moved away", "refused", "TRAIN_0004.jpg (deleted or moved)")(
    lambda c: _changed(c, lambda df: os.rename(df["img_path"][4], df["img_path"][4] + ".bak")))


def _to_folder(df):
    os.unlink(df["img_path"][5])
    os.mkdir(df["img_path"][5])


red29("changed data", "an image replaced by a folder of the same name", "refused",
      "TRAIN_0005.jpg (cannot be read")(lambda c: _changed(c, _to_folder))


@red29("changed data", "an image rewritten with the same bytes", "handled")
def _(c):
    action = _changed(c, lambda df: _replace_file(df["img_path"][6], Path(df["img_path"][6]).read_bytes()))
    action()
    return "read again (new inode), same digest: the run goes on"


def _stored(c, mode="disk"):
    """A disk store holding two images: (cache, a, b, a's store file, b's store file)."""
    from artlearn.store import PresizeCache
    a = str(write_image(c.tmp / "a.png", (30, 20), color=(200, 0, 0), seed=1))
    b = str(write_image(c.tmp / "b.png", (30, 20), color=(0, 0, 200), seed=2))
    cache = PresizeCache(16, mode=mode, cache_dir=c.tmp / "cache")
    cache.fill([a, b])
    return cache, a, b, *(cache._disk_path(cache._disk_keys[p]) for p in (a, b))


def _served_again(c, tamper) -> str:
    """Tamper with a's store file; a new store must decode a again (never serve the file)."""
    from artlearn.store import PresizeCache
    cache, a, b, file_a, file_b = _stored(c)
    want = cache.get(a).copy()
    tamper(cache, a, b, file_a, file_b)
    again = PresizeCache(16, mode="disk", cache_dir=c.tmp / "cache")
    again.fill([a])
    assert again.n_decodes == 1 and np.array_equal(again.get(a), want)
    return "decoded again from the image, with a warning naming the store file"


def _other_presize(cache, a, b, file_a, file_b):
    from artlearn.store import PresizeCache
    other = PresizeCache(24, mode="disk", cache_dir=cache.cache_dir)
    other.fill([a])
    shutil.copy(other._disk_path(other._disk_keys[a]), file_a)


red29("private store", "a store file of the same image at another presize copied over", "handled")(
    lambda c: _served_again(c, _other_presize))
red29("private store", "a store file replaced by a symlink to another store file", "handled")(
    lambda c: _served_again(c, lambda cache, a, b, fa, fb: (fa.unlink(), fa.symlink_to(fb))))
red29("private store", "a plain .npy (older artlearn, no claim) in the store", "handled")(
    lambda c: _served_again(c, lambda cache, a, b, fa, fb: np.save(fa, cache.get(a))))


def _edit_pixels(cache, a, b, file_a, file_b):
    flat = np.load(file_a)
    flat[-1] ^= 0xFF
    np.save(file_a, flat)


red29("private store", "a store file's pixels edited in place (claim kept)", "handled")(
    lambda c: _served_again(c, _edit_pixels))


@red29("private store", "the default store folder is this user's but mode 0777", "handled")
def _(c):
    import tempfile

    from artlearn.store import PresizeCache, default_store_dir
    c.mp.setattr(tempfile, "tempdir", str(c.tmp))
    folder = default_store_dir()
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    cache = PresizeCache(16, mode="disk")
    cache.fill([str(write_image(c.tmp / "a.png", (30, 20), seed=1))])
    assert cache.cache_dir != folder and (cache.cache_dir.stat().st_mode & 0o777) == 0o700
    assert list(folder.iterdir()) == []
    return f"replaced by a fresh private folder {cache.cache_dir.name} (warning names both)"


@red29("private store", "cache_dir is a regular file", "refused", "is not a folder")
def _(c):
    from artlearn.store import PresizeCache
    (c.tmp / "afile").write_text("x")
    img = str(write_image(c.tmp / "a.png", (30, 20), seed=1))
    return lambda: PresizeCache(16, mode="disk", cache_dir=c.tmp / "afile").fill([img])


@red29("private store", "a cache_dir that does not exist yet", "handled")
def _(c):
    cache, *_ = _stored(c)
    assert (cache.cache_dir.stat().st_mode & 0o777) == 0o700
    return "created 0700"


@red29("resource errors", "write_submission under a path whose parent is a file", "refused", "cannot be written")
def _(c):
    (c.tmp / "afile").write_text("x")
    return lambda: al.write_submission(["a"], np.ones((1, 1)), ["X"], c.tmp / "afile" / "submission.csv")


@red29("resource errors", "save_weights to a folder path", "refused", "is a folder")
def _(c):
    return lambda: al.checkpoint.save_weights(c.tmp, {"w": torch.zeros(1)})


@red29("resource errors", "disk full while writing config.json", "refused", "config.json: cannot be written",
       "no space left")
def _(c):
    import errno

    from artlearn import files
    real = files._write_all

    def full(f, data, path):
        if Path(path).name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data, path)

    c.mp.setattr(files, "_write_all", full)
    c.mp.setattr(kfold_module, "_train_fold", lambda job, k, **kw: None)
    (c.tmp / "run").mkdir()  # an empty --out: after the failure it holds nothing but the lock file
    return lambda: _run_then_check(c.data.train, c.tmp / "run")


def _run_then_check(df, out):
    """train_kfold that must fail before config.json exists (and leave no temp file)."""
    try:
        train(df, out)
    finally:
        assert not (out / "config.json").exists() and not list(out.glob(".*.tmp"))


@red29("resource errors", "a temp file locked by a live writer", "handled")
def _(c):
    import fcntl
    tmp = c.tmp / ".submission.csv.l1vewrit.tmp"
    tmp.write_text("")
    os.utime(tmp, (0, 0))
    with open(tmp) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        al.write_submission(["a"], np.ones((1, 1)), ["X"], c.tmp / "submission.csv")
        assert tmp.exists()
    return "kept: its writer holds the lock"


@red29("resource errors", "a symlink named like a temp file", "handled")
def _(c):
    target = c.tmp / "precious.txt"
    target.write_text("keep")
    link = c.tmp / ".submission.csv.s1mlink_.tmp"
    link.symlink_to(target)
    os.utime(link, (0, 0), follow_symlinks=False)
    al.write_submission(["a"], np.ones((1, 1)), ["X"], c.tmp / "submission.csv")
    assert link.is_symlink() and target.read_text() == "keep"
    return "neither followed nor removed"


@red29("resource errors", "an I/O error artlearn has no advice for", "handled")
def _(c):
    import errno

    from artlearn import files
    c.mp.setattr(files, "_write_all", lambda f, d, p: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        files.atomic_write_text(c.tmp / "x.txt", "x")
    assert list(c.tmp.iterdir()) == []
    return "re-raised as it is (OSError EIO), no temp file left"


for _case, _kw, _part in [("ensemble(bs=2.5)", dict(bs=2.5), "bs=2.5: need an integer >= 1"),
                          ("ensemble(bs=True)", dict(bs=True), "bs=True: need an integer >= 1"),
                          ("ensemble(prior_adjust=nan)", dict(prior_adjust=float("nan")), "not inf or NaN")]:
    red29("argument checks", _case, "refused", _part)(
        lambda c, kw=_kw: (lambda: al.ensemble(c.base.run, c.data.test, **kw)))

for _case, _kw, _part in [("train_kfold(epochs=inf)", dict(epochs=float("inf")), "epochs=inf: need a finite"),
                          ("train_kfold(wd=inf)", dict(wd=float("inf")), "wd=inf: need a finite")]:
    red29("argument checks", _case, "refused", _part)(
        lambda c, kw=_kw: (lambda: train(c.data.train, c.tmp / "run", **kw)))


def _header(c, header):
    csv = c.tmp / "t.csv"
    csv.write_text(header + "\n" + ",".join(["a"] * len(header.split(","))) + "\n")
    return lambda: al.read_artworks(csv)


red29("argument checks", "a CSV header naming img_path twice", "refused", "['img_path'] more than once")(
    lambda c: _header(c, "id,img_path,img_path,artist"))
red29("argument checks", "a CSV header with ' artist' and 'artist'", "refused", "['artist'] more than once")(
    lambda c: _header(c, "id,img_path, artist,artist"))
red29("argument checks", "check_images on a list of paths", "refused", "'img_path' column", "list")(
    lambda c: (lambda: al.check_images(list(c.data.train["img_path"]))))


def _cli(c, argv, *parts):
    """predict.py main(argv): exit status 2 and one line naming every part."""
    predict_py = script("predict")

    def action():
        assert predict_py.main([str(c.base.run.path), *argv]) == 2
        err = c.capsys.readouterr().err
        assert err.count("\n") == 1 and all(p in err for p in parts), err
        raise ValueError(err.strip())  # reported like the refusals
    return action


red29("argument checks", "predict.py --folds 7", "refused", "folds [7] have no complete checkpoint")(
    lambda c: _cli(c, [c.data.test["img_path"][0], "--folds", "7"], "folds [7]"))
red29("argument checks", "predict.py with a missing image", "refused", "nope.jpg")(
    lambda c: _cli(c, [str(c.tmp / "nope.jpg")], "nope.jpg"))


@red29("argument checks", "study.py --grids arch,arch", "handled")
def _(c):
    assert script("study").parse_grids("arch,arch") == ["arch"]
    return "one arch grid"


@red29("argument checks", "predict.py --csv in a folder that does not exist yet", "handled")
def _(c):
    assert script("predict").main([str(c.base.run.path), c.data.test["img_path"][0], "--csv",
                                   str(c.tmp / "new" / "top.csv")]) == 0
    assert len(pd.read_csv(c.tmp / "new" / "top.csv")) == 4
    c.capsys.readouterr()
    return "the folder is created, the table written atomically"


@red29("argument checks", "run_cli on a message spread over lines", "handled")
def _(c):
    def main(argv):
        raise al.checks.ArtlearnError("first\n\tsecond")
    assert al.checks.run_cli(main) == 2
    assert c.capsys.readouterr().err == "error: first second\n"
    return "one line"


@pytest.mark.parametrize("case", list(RED29))
def test_red_team_29(case, data, base_run, tmp_path, monkeypatch, capsys):
    kind, verdict, parts, fn = RED29[case]
    c = SimpleNamespace(data=data, base=base_run, tmp=tmp_path, mp=monkeypatch, capsys=capsys)
    if verdict == "refused":
        action = fn(c)
        with unchanged(tmp_path), refused(f"red29: {kind}: {case}", *parts):
            action()
    else:
        note(f"red29: {kind}: {case}", fn(c) or "handled correctly")


def test_a_fold_folder_that_cannot_be_written_on_resume_is_one_clear_error(base_run, data, tmp_path, monkeypatch):
    out = _run_copy(base_run, tmp_path / "run")
    _rewrite_meta(out / "fold1", lambda m: m.update(complete=False))  # fold 1 must be trained again
    real = Path.unlink

    def denied(self, missing_ok=False):
        if self.parent.name == "fold1":
            raise PermissionError(13, "Permission denied")  # as for a folder of another user (tests run as root)
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", denied)
    fold1 = snapshot(out / "fold1")
    with refused("resource: a fold folder that cannot be written on resume", "fold1/",
                 "cannot be deleted to retrain its fold (Permission denied)", "writable by this user"):
        train(data.train, out)
    assert snapshot(out / "fold1") == fold1
