"""artlearn.checkpoint: FoldMeta, meta.json's typed form (written, read and validated in one place)."""
import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from artlearn.checkpoint import (META_FORMAT, META_FORMAT_VERSION, DataMeta, FoldMeta, check_meta, load_fold,
                                 read_meta, save_weights)
from artlearn.files import atomic_write_json
from artlearn.store import fold_store_side, presize_for

MODEL = {"arch": "resnet18", "depth": 18, "n_classes": 3, "pool": "avg", "zero_init_residual": False,
         "drop_rate": 0.0, "grad_checkpoint": False}
VOCAB = ["Ann", "Bob", "Cy"]

# a meta.json as the code before FoldMeta wrote it at the end of a fit (format 3), keys in the file's order
FORMAT3 = {"note": "kept", "epochs_run": 4, "format": "artlearn-fold", "format_version": 3, "model": MODEL,
           "arch": "resnet18", "depth": 18, "pool": "avg", "n_classes": 3, "vocab": VOCAB, "size": 32,
           "mean": [0.5, 0.25, 0.125], "std": [0.2, 0.3, 0.4], "fold": 1, "epoch": 2, "monitor": "valid_loss",
           "score": 0.75, "complete": True, "artlearn_version": "0.1.0", "n_folds": 4, "split_seed": 42,
           "class_counts": [5, 4, 3], "ema": None, "pipeline": "device", "store_side": 40,
           "weights_sha256": "ab" * 32, "run_id": "cd" * 16}

# a meta.json of the first format: no format/format_version, pipeline, store_side, run_id or weights_sha256
FORMAT1 = {"model": MODEL, "arch": "resnet18", "depth": 18, "pool": "avg", "n_classes": 3, "vocab": VOCAB,
           "size": 32, "mean": [0.5, 0.25, 0.125], "std": [0.2, 0.3, 0.4], "fold": 0, "epoch": 1,
           "monitor": "valid_loss", "score": 0.9, "complete": True, "artlearn_version": "0.0.1", "n_folds": 4,
           "split_seed": 42, "class_counts": [5, 4, 3], "ema": None}

DATA = DataMeta(vocab=VOCAB, size=32, mean=[0.5, 0.25, 0.125], std=[0.2, 0.3, 0.4], fold=1, class_counts=[5, 4, 3],
                n_folds=4, split_seed=42, pipeline="device", store_side=40)


def built(**kw) -> FoldMeta:
    """A FoldMeta as FoldCheckpoint builds one at the end of a fit."""
    args = dict(fold=1, epoch=2, monitor="valid_loss", score=0.75, complete=True, epochs_run=4,
                identity={"weights_sha256": "ab" * 32, "run_id": "cd" * 16}, extra={"note": "kept"})
    return FoldMeta.build(MODEL, DATA, **{**args, **kw})


def write(folder: Path, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "meta.json", meta)
    return folder / "meta.json"


def test_round_trip_fold_meta_meta_json_fold_meta(tmp_path):
    meta = built()
    back = read_meta(write(tmp_path / "fold1", meta.to_json()))
    assert back == meta and dataclasses.asdict(back) == dataclasses.asdict(meta)
    assert json.loads((tmp_path / "fold1" / "meta.json").read_text()) == meta.to_json()
    stopped = built(complete=False, stopped="non-finite loss at epoch 3", epochs_run=None, identity=None, extra=None)
    assert read_meta(write(tmp_path / "fold2", stopped.to_json())) == stopped


def test_build_writes_exactly_what_the_previous_code_wrote(monkeypatch):
    import artlearn
    monkeypatch.setattr(artlearn, "__version__", "0.1.0")
    assert json.dumps(built().to_json()) == json.dumps(FORMAT3)  # same keys, values and order
    assert "stopped" not in built().to_json() and "epochs_run" not in built(epochs_run=None).to_json()
    assert built(extra={"size": 99, "note": 1}).size == 32  # extra entries cannot override the fields


def test_a_format_3_meta_json_of_the_previous_code_loads_and_writes_back_unchanged(tmp_path):
    meta = read_meta(write(tmp_path / "fold1", FORMAT3))
    assert (meta.format, meta.format_version, meta.run_id, meta.weights_sha256) == (META_FORMAT, 3, "cd" * 16,
                                                                                  "ab" * 32)
    assert meta.vocab == tuple(VOCAB) and meta.size == 32 and meta.pipeline == "device" and meta.store_side == 40
    assert meta.epochs_run == 4 and meta.extra == {"note": "kept"} and meta.model == MODEL and meta.complete is True
    assert json.dumps(meta.to_json()) == json.dumps(FORMAT3)


def test_a_format_1_meta_json_loads_with_what_absent_keys_mean(tmp_path):
    meta = read_meta(write(tmp_path / "fold0", FORMAT1))
    assert meta.format == META_FORMAT and meta.format_version == 1  # written before versions: version 1
    assert meta.run_id is None and meta.weights_sha256 is None  # not recorded, so not checked
    assert meta.pipeline == "items" and meta.store_side is None and fold_store_side(meta) == presize_for(32)
    assert meta.epochs_run is None and meta.stopped is None and meta.extra == {}
    absent = FoldMeta.absent_means()
    assert {k: absent[k] for k in ("run_id", "weights_sha256", "format", "format_version", "pipeline")} == \
        {"run_id": None, "weights_sha256": None, "format": META_FORMAT, "format_version": 1, "pipeline": "items"}
    assert FoldMeta(model=MODEL).format_version == META_FORMAT_VERSION  # a new meta is today's version
    minimal = read_meta(write(tmp_path / "fold9", {"model": MODEL}))  # absent arch/n_classes: the model's
    assert (minimal.arch, minimal.depth, minimal.pool, minimal.n_classes) == ("resnet18", 18, "avg", 3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from artlearn.models import build_model
    path = tmp_path_factory.mktemp("weights") / "best.safetensors"
    save_weights(path, build_model(**MODEL))
    return path


@pytest.mark.parametrize("old", [FORMAT1, FORMAT3], ids=["format1", "format3"])
def test_load_fold_reads_old_folders_whole(tmp_path, weights, old):
    folder = tmp_path / "fold0"
    old = {**old, "fold": 0}
    old.pop("weights_sha256", None)  # the weights here are not those of the literal sha256
    write(folder, old)
    (folder / "best.safetensors").write_bytes(weights.read_bytes())
    model, meta = load_fold(folder)
    assert isinstance(meta, FoldMeta) and model.config == MODEL
    # users' code reading it as a dict keeps working (read-only Mapping over the JSON form)
    assert meta["size"] == 32 and meta["vocab"] == VOCAB and meta.get("pipeline") == old.get("pipeline", "items")
    assert dict(meta) == meta.to_json() and "model" in meta and meta.get("nothing") is None
    with pytest.raises(TypeError):
        meta["size"] = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.size = 64


BAD = {
    "no model": (lambda m: m.pop("model"), "has no 'model' entry"),
    "n_classes": (lambda m: m.update(n_classes=4), "'n_classes' is 4 but 'model.n_classes' is 3"),
    "vocab twice": (lambda m: m.update(vocab=["Ann", "Ann", "Cy"]), "'vocab' lists 1 artist"),
    "size": (lambda m: m.update(size=2), "'size' is 2; need an integer image size"),
    "store_side": (lambda m: m.update(store_side=3), "'store_side' is 3"),
    "std": (lambda m: m.update(std=[0.2, 0.0, 0.4]), "'std' must be positive"),
    "mean": (lambda m: m.update(mean=[0.5, 0.25]), "'mean' must be 3 finite numbers"),
    "format_version": (lambda m: m.update(format_version=99), "'format_version' is 99; need an integer in 1..3"),
    "format": (lambda m: m.update(format="other"), "'format' is 'other'"),
    "run_id": (lambda m: m.update(run_id="xyz"), "'run_id' is 'xyz'; need 32 hex digits"),
    "complete": (lambda m: m.update(complete="yes"), "'complete' is 'yes'; need true or false"),
    "ema": (lambda m: m.update(ema=1.5), r"'ema' is 1.5; need None or a decay in \(0, 1\)"),
    "class_counts": (lambda m: m.update(class_counts=[1]), "'class_counts' is \\[1\\]; need None or 3 counts"),
    "pipeline": (lambda m: m.update(pipeline="gpu"), "'pipeline' is 'gpu'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_validation_message_names_the_file(tmp_path, case):
    change, message = BAD[case]
    meta = copy.deepcopy(FORMAT3)
    change(meta)
    path = write(tmp_path / "fold1", meta)
    for read in (lambda: read_meta(path), lambda: read_meta(path.parent), lambda: check_meta(meta, path),
                 lambda: FoldMeta.from_json(meta, path)):
        with pytest.raises(ValueError, match=message) as e:
            read()
        assert str(e.value).startswith(str(path))


def test_unreadable_meta_json_names_the_file(tmp_path):
    path = tmp_path / "fold0" / "meta.json"
    path.parent.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_meta(path.parent)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not valid JSON"):
        read_meta(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " has no 'model' entry"):
        check_meta(["a list"], path)


def test_data_meta_is_the_data_part_of_a_fold_meta():
    meta = built()
    assert meta.data() == DATA and isinstance(meta, DataMeta) and meta != DATA
    assert DATA["split_seed"] == 42 and DATA.to_json()["vocab"] == VOCAB  # meta.json's names, lists
    assert FoldMeta.from_json(meta.to_json(), "meta.json") == meta.to_json()  # equal to its JSON form, like a dict


def test_no_metadata_is_hung_on_fastai_dataloaders():
    """The data's meta and store travel as typed attributes of ArtistDataLoaders, never set on fastai's objects."""
    root = Path(__file__).resolve().parents[1]
    sources = [*(root / "artlearn").glob("*.py"), *(root / "tests").glob("*.py"), *(root / "examples").glob("*.py")]
    hung = re.compile(r"\bartlearn_meta\b|\bdls\.(cache|data_meta)\s*=[^=]")
    found = [f"{p.name}:{i}" for p in sources if p.name != Path(__file__).name
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if hung.search(line)]
    assert found == []
