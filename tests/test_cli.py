"""artlearn/cli.py: the flags made from Recipe's fields, fold and seed lists, the --select rules, the
competition-folder reader, and a light import."""
import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from artlearn import cli, recipe
from artlearn.recipe import BEST, REFERENCE, Recipe, field_type


def _parser(defaults=REFERENCE, short_help=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x", exit_on_error=False)
    cli.add_recipe_flags(p, defaults, short_help)
    return p


def _action(p, name):
    return next(a for a in p._actions if a.dest == name)


# ---------------------------------------------------------------- flags from Recipe's fields


def test_one_flag_per_field_typed_as_the_field_with_its_choices():
    p = _parser()
    for f in dataclasses.fields(Recipe):
        action, flag = _action(p, f.name), "--" + f.name.replace("_", "-")
        kind, nullable = field_type(f.name)
        assert action.default is None, f.name  # an absent flag is None: the preset's value stays
        if kind is bool:
            assert isinstance(action, argparse.BooleanOptionalAction), f.name
            assert action.option_strings == [flag, "--no-" + flag[2:]], f.name
            continue
        assert action.option_strings == [flag] and action.type.__name__ == kind.__name__, f.name
        if nullable:  # 'none' (any case) is None; any other text is the field's type
            assert action.type("none") is None and action.type("None") is None, f.name
            assert type(action.type({int: "3", float: "0.5", str: "x"}[kind])) is kind, f.name
        else:
            assert action.type is kind, f.name  # 'none' is no value of a setting that cannot be None
        expected = tuple(recipe.TTA_VIEWS) if f.name == "tta" else f.metadata["choices"]
        assert (tuple(action.choices) if action.choices else None) == (tuple(expected) if expected else None)


def test_groups_follow_the_stages_in_field_order():
    p = _parser()
    stages = list(dict.fromkeys(f.metadata["stage"] for f in dataclasses.fields(Recipe)))
    titles = [g.title for g in p._action_groups if g.title.endswith(" settings")]
    assert titles == [f"{stage} settings" for stage in stages]
    grouped = {a.dest: g.title for g in p._action_groups for a in g._group_actions}
    assert all(grouped[f.name] == f"{f.metadata['stage']} settings" for f in dataclasses.fields(Recipe))


def test_values_parse_to_the_fields_types_and_none_only_where_allowed():
    p = _parser()
    args = p.parse_args(["--size", "64", "--lr", "0.002", "--no-flip", "--sampler", "none", "--drop-path", "NONE",
                         "--ema", "0.99", "--tta", "multicrop"])
    assert (args.size, args.lr, args.flip, args.sampler, args.drop_path, args.ema, args.tta) == (
        64, 0.002, False, None, None, 0.99, "multicrop")
    assert cli.given_settings(args) == dict(size=64, lr=0.002, flip=False, ema=0.99, tta="multicrop")
    for bad in (["--size", "none"], ["--size", "6.5"], ["--tta", "tenfold"], ["--optimizer", "rmsprop"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            p.parse_args(bad)


def test_help_shows_the_defaults_given_and_short_help_replaces_the_text():
    p = _parser(BEST, {"tta": "views at test time"})
    assert _action(p, "tta").help == f"views at test time [default: {BEST.tta}]"
    assert _action(p, "lr").help.endswith(f"[default: {BEST.lr}]")
    assert _action(p, "sampler").help.endswith("[default: none]")  # None is shown, not left out
    assert _action(p, "flip").help.endswith("[default: on]")
    assert _action(p, "sampler").metavar == "none|balanced|sqrt"


def test_one_recipe_flag_with_its_own_default():
    p = argparse.ArgumentParser()
    cli.add_recipe_flag(p, "precision", default="auto")
    cli.add_recipe_flag(p, "size", help="resolution")
    assert p.parse_args([]).precision == "auto" and p.parse_args([]).size is None
    assert _action(p, "precision").choices == recipe.PRECISIONS and _action(p, "size").help == "resolution"
    assert _action(p, "precision").help.endswith("[default: auto]")


def test_tta_choices_are_read_when_the_parser_is_built(monkeypatch):
    from artlearn.tta import TTA
    monkeypatch.setitem(recipe.TTA_VIEWS, "tenfold", TTA(n_windows=4, mirror=True))
    assert cli.tta_choices() == (*recipe.TTAS, "tenfold")
    assert "tenfold" in _action(_parser(), "tta").choices
    assert cli.parse_setting("tta", "tenfold") == "tenfold"


def test_parse_setting_types_and_checks_like_the_flags():
    assert cli.parse_setting("min_scale", "0.35") == 0.35 and cli.parse_setting("epochs", "3") == 3
    assert cli.parse_setting("flip", "No") is False and cli.parse_setting("compile", "1") is True
    assert cli.parse_setting("ema", "null") is None and cli.parse_setting("sampler", "none") is None
    for name, text, message in (("min_scale", "abc", "min_scale=abc: need a float"),
                                ("epochs", "none", "epochs=none: need an int"),
                                ("flip", "maybe", "flip=maybe: need true or false"),
                                ("optimizer", "rmsprop", "optimizer='rmsprop' is not supported"),
                                ("warp", "1", "warp=1: no such setting")):
        with pytest.raises(ValueError, match=message):
            cli.parse_setting(name, text)


# ---------------------------------------------------------------- fold and seed lists, --select


def test_fold_lists():
    assert cli.fold_list("2, 0,2,") == [0, 2]
    assert cli.fold_list(None) is None and cli.fold_list("") is None and cli.fold_list("auto") is None
    assert cli.fold_list("0,3", n_folds=4) == [0, 3]


@pytest.mark.parametrize("text, flag, n_folds, message", [
    ("0,abc", "--folds", None, "--folds '0,abc': need comma-separated fold numbers such as 0,2"),
    ("-1", "--folds", None, "--folds '-1': need comma-separated fold numbers"),
    (",", "--select", None, "--select ',': need comma-separated fold numbers"),
    ("1.5", "--folds", 4, "--folds '1.5': need comma-separated fold numbers"),
    ("4", "--folds", 4, "--folds '4': with --n-folds 4 use folds 0..3"),
    ("0", "--folds", 1, "--n-folds 1: need at least 2 folds"),
])
def test_fold_list_errors_name_the_flag_and_the_value(text, flag, n_folds, message):
    with pytest.raises(ValueError) as info:
        cli.fold_list(text, flag, n_folds)
    assert str(info.value).startswith(message), info.value


def test_int_lists_keep_the_order_and_name_the_flag():
    assert cli.int_list("42,7", "--seeds") == [42, 7]
    with pytest.raises(ValueError, match=r"--seeds '42,x': need comma-separated integers"):
        cli.int_list("42,x", "--seeds")


def test_select_names_are_kfolds_rules_and_auto_is_an_alias_of_one():
    from artlearn.kfold import FOLD_RULES
    assert cli.fold_rules() == tuple(FOLD_RULES)
    assert set(cli.RULE_ALIASES.values()) <= set(FOLD_RULES) and not set(cli.RULE_ALIASES) & set(FOLD_RULES)
    for rule in FOLD_RULES:
        assert cli.fold_selection(rule) == (rule, None)
    assert cli.fold_selection("auto") == (cli.RULE_ALIASES["auto"], None) == ("stable", None)
    assert cli.fold_selection("2,0", n_folds=4) == ("complete", [0, 2])
    rules = " / ".join(repr(r) for r in FOLD_RULES)
    with pytest.raises(ValueError, match=f"--select 'best': need comma-separated fold numbers such as 0,2 "
                                         rf"\(or {rules}\)"):
        cli.fold_selection("best")
    with pytest.raises(ValueError, match=r"--select '9': with --n-folds 4 use folds 0\.\.3"):
        cli.fold_selection("9", n_folds=4)


# ---------------------------------------------------------------- the competition folder


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


@pytest.fixture
def folder(tmp_path):
    """A tiny competition folder: train.csv, test.csv, test_solution.csv and the images in train/ and test/."""
    root = tmp_path / "comp"
    train = []
    for i, artist in enumerate(["Monet", "Monet", "Klimt", "Klimt"]):
        _image(root / "train" / f"{i}.png", (40 * i, 10, 10))
        train.append((f"t{i}", f"train/{i}.png", artist))
    pd.DataFrame(train, columns=["id", "img_path", "artist"]).to_csv(root / "train.csv", index=False)
    for i in range(2):
        _image(root / "test" / f"{i}.png", (10, 40 * i, 10))
    pd.DataFrame({"id": ["a", "b"], "img_path": ["test/0.png", "test/1.png"]}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": ["a", "b"], "artist": ["Monet", "Klimt"]}).to_csv(root / "test_solution.csv", index=False)
    return root


def test_reader_finds_the_tables_the_solution_and_the_name(folder):
    found = cli.read_competition(folder, decode=True)
    assert list(found.train["artist"]) == ["Monet", "Monet", "Klimt", "Klimt"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in found.train["img_path"])
    assert list(found.test["id"]) == ["a", "b"] and "artist" not in found.test.columns
    assert found.solution == folder / "test_solution.csv" and found.name == "comp" and found.root == folder
    csv = cli.read_competition(folder / "train.csv")  # the CSV file itself: its folder is the competition's
    assert csv.root == folder and len(csv.test) == 2
    assert cli.read_competition(folder, test=False).test is None


def test_reader_reads_artist_folders_and_refuses_what_it_cannot_use(folder, tmp_path):
    artists = tmp_path / "by_artist"
    for artist in ("Monet", "Klimt"):
        _image(artists / artist / "a.png", (1, 2, 3))
    found = cli.read_competition(artists)
    assert sorted(found.train["artist"]) == ["Klimt", "Monet"] and found.test is None and found.solution is None
    with pytest.raises(ValueError, match=r"train\.csv not found; pass --data with the folder holding train\.csv"):
        cli.read_competition(artists, folders=False)
    with pytest.raises(ValueError, match="no test.csv in .*by_artist"):
        cli.read_competition(artists, test=True)
    with pytest.raises(ValueError, match="--data .*nowhere: no such folder or file"):
        cli.read_competition(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="test='yes' is not supported"):
        cli.read_competition(folder, test="yes")


def test_reader_checks_the_test_table_ids_and_images(folder):
    pd.read_csv(folder / "test.csv").drop(columns="id").to_csv(folder / "test.csv", index=False)
    with pytest.raises(ValueError, match=r"test\.csv: no 'id' column"):
        cli.read_competition(folder)
    pd.DataFrame({"id": ["a", "b"], "img_path": ["test/0.png", "test/1.png"]}).to_csv(folder / "test.csv",
                                                                                       index=False)
    (folder / "test" / "1.png").write_bytes(b"not a png")
    assert len(cli.read_competition(folder).test) == 2  # not decoded unless asked
    with pytest.raises(ValueError, match=r"test\.csv: 1 unreadable image\(s\).*the submission needs every test"):
        cli.read_competition(folder, decode=True)


def test_reader_builds_the_synthetic_set_when_no_data_is_given(folder, tmp_path, monkeypatch):
    import shutil
    made, said = [], []

    def build(dest):  # make_synthetic_artworks' part: a competition folder at dest, its path returned
        made.append(dest)
        shutil.copytree(folder, dest)
        return dest

    monkeypatch.setattr("artlearn.make_synthetic_artworks", build, raising=False)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    found = cli.read_competition(None, say=said.append)
    assert made == [cli.SYNTHETIC_DIR] and said == [f"data: built-in synthetic artworks in {cli.SYNTHETIC_DIR}"]
    assert found.name == "synthetic" and len(found.train) == 4 and found.solution is not None


def test_submission_scores_match_ids_not_rows(folder, tmp_path):
    sub = tmp_path / "submission.csv"
    pd.DataFrame({"id": ["b", "a", "z"], "artist": ["Klimt", "Klimt", "Monet"]}).to_csv(sub, index=False)
    scores = cli.submission_scores(sub, folder / "test_solution.csv")  # truth: a Monet, b Klimt; z is not scored
    assert scores == dict(accuracy=0.5, f1_macro=pytest.approx(1 / 3), n=2)


# ---------------------------------------------------------------- a light import


def test_importing_cli_loads_neither_torch_nor_pandas():
    code = "import sys, artlearn.cli; print(sorted(m for m in ('torch', 'fastai', 'pandas') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
