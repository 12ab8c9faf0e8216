"""artlearn.recipe: the one owner of every default, its presets, checks and consumers."""
import dataclasses
import inspect

import pytest

from artlearn.dls import artist_dls
from artlearn.learner import artist_learner
from artlearn.recipe import BEST, PIPELINES, REFERENCE, STORES, TTAS, Recipe, field_type


def test_reference_is_the_reports_recipe():
    r = Recipe.preset("reference")
    assert r is REFERENCE and r == Recipe()
    assert (r.arch, r.size, r.bs, r.epochs, r.lr, r.optimizer, r.wd) == ("resnet50", 288, 32, 30, 1e-3, "adam", 0.0)
    assert (r.label_smoothing, r.min_scale, r.max_rotate, r.flip, r.pool) == (0.05, 0.08, 15.0, True, "avg")
    assert (r.mixup, r.cutmix, r.ema, r.logit_adjust, r.progressive, r.sampler, r.warmup) == (0, 0, None, 0, 0, None, 0)
    assert (r.drop_path, r.compile, r.tta) == (None, False, "flip")  # architecture's own depth drop, eager, flip
    assert r.pipeline in PIPELINES and r.store in STORES


def test_best_differs_from_reference_only_in_named_options():
    changed = {f.name for f in dataclasses.fields(Recipe) if getattr(BEST, f.name) != getattr(REFERENCE, f.name)}
    assert changed and changed <= {"optimizer", "wd", "warmup", "label_smoothing", "min_scale", "logit_adjust",
                                   "lr", "sampler", "ema", "store", "drop_path", "mixup", "cutmix", "progressive",
                                   "tta"}
    assert Recipe.preset("best") is BEST


def test_tta_setting_reads_the_registry_live(monkeypatch):
    """`tta`'s choices are tta.TTA_VIEWS itself: a view registered at run time is accepted, an unknown one refused."""
    from artlearn.tta import TTA, TTA_VIEWS, tta_spec
    assert REFERENCE.tta == "flip" and set(TTAS) == set(TTA_VIEWS)
    with pytest.raises(ValueError, match="tta='multi'"):
        REFERENCE.replace(tta="multi").validate()
    monkeypatch.setitem(TTA_VIEWS, "multi", TTA(mirror=True))
    assert REFERENCE.replace(tta="multi").validate().tta == "multi" and tta_spec("multi").views == 2
    assert tta_spec(None) is TTA_VIEWS["none"] and TTA_VIEWS["multicrop"].views == 12


def test_signatures_restate_no_recipe_default():
    """artist_dls / artist_learner take no recipe setting with a default of their own: every default is Recipe's."""
    for fn in (artist_dls, artist_learner):
        params = inspect.signature(fn).parameters
        restated = {n: p.default for n, p in params.items() if n in Recipe.names() and p.default is not None}
        assert restated == {}, (fn.__name__, restated)
    consumers = {f.metadata["to"] for f in dataclasses.fields(Recipe)}
    assert consumers == {"dls", "learner", "kfold"}
    assert {Recipe.consumer(n) for n in Recipe.names()} == {"artist_dls", "artist_learner", "train_kfold"}


def test_the_recipe_travels_whole_into_loaders_and_learners(dataset):
    """artist_dls / artist_learner take the Recipe as it is (no defaults or checks of their own): the loader keeps
    the very recipe object, keyword overrides give the same result as a replaced recipe, the learner reads its
    settings from it, and a setting of the other stage is refused naming where it goes."""
    from artlearn.tables import read_artworks
    table = read_artworks(dataset([6, 5, 4]))
    recipe = REFERENCE.replace(size=16, bs=4, min_scale=0.5, arch="resnet18", lr=3e-4, label_smoothing=0.1)
    dls = artist_dls(table, recipe=recipe, n_folds=2)
    assert dls.train.recipe is recipe and dls.train.size == 16
    assert artist_dls(table, 0, 16, 4, n_folds=2, min_scale=0.5).train.recipe == REFERENCE.replace(
        size=16, bs=4, min_scale=0.5)
    learn = artist_learner(dls, recipe=recipe, progress=False)
    assert learn.lr == 3e-4 and learn.model.config["arch"] == "resnet18"
    assert [cb.eps for cb in learn.cbs if type(cb).__name__ == "LabelSmoothing"] == [0.1]
    assert artist_learner(dls, "resnet34", recipe=recipe, ema=None, progress=False).model.config["depth"] == 34
    with pytest.raises(ValueError, match=r"\['lr'\] are not data settings; pass them to artist_learner"):
        artist_dls(table, size=16, n_folds=2, lr=1e-3)
    with pytest.raises(ValueError, match=r"\['min_scale'\] are data settings: pass them to artist_dls"):
        artist_learner(dls, min_scale=0.5, progress=False)
    with pytest.raises(ValueError, match="size=7"):  # the one check of the rule, Recipe.validate's
        artist_dls(table, size=7, n_folds=2)


def test_override_keeps_none_and_absent_means_come_from_the_fields():
    from artlearn.recipe import IDENTITY_SETTINGS, absent_means
    assert BEST.override(ema=None).ema is None and REFERENCE.replace(ema=0.99).override(ema=None).ema is None
    absent = absent_means()
    assert set(absent) == set(Recipe.names())
    assert (absent["pipeline"], absent["store"], absent["colour_jitter"], absent["size"]) == ("items", "presize", 0.0,
                                                                                               288)
    assert set(Recipe.names()) - IDENTITY_SETTINGS == {"pipeline", "store", "zero_init_residual", "colour_jitter",
                                                       "size_by_budget"}


def test_the_items_pipeline_refuses_data_settings_added_after_it():
    assert REFERENCE.replace(pipeline="items", min_scale=0.35).validate().pipeline == "items"
    with pytest.raises(ValueError, match="colour_jitter=0.2 needs pipeline='device'"):
        REFERENCE.replace(pipeline="items", colour_jitter=0.2).validate()


def test_replace_and_unknown_names():
    r = REFERENCE.replace(size=64, store="presize", lr=None)
    assert (r.size, r.store, r.lr) == (64, "presize", REFERENCE.lr)  # None keeps the value
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['sise'\]"):
        REFERENCE.replace(sise=64)


@pytest.mark.parametrize("bad, match", [
    (dict(store="huge"), "store"), (dict(optimizer="lion"), "optimizer"), (dict(drop_path=1.0), "drop_path"),
    (dict(drop_path=-0.1), "drop_path"), (dict(compile="yes"), "compile"), (dict(min_scale=0), "min_scale"),
    (dict(warmup=30), "warmup=30 must be shorter than epochs=30"), (dict(mixup=0.4, cutmix=1.0), "use one of"),
    (dict(pipeline="gpu"), "pipeline"), (dict(size=4), "size")])
def test_validate_names_the_bad_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        REFERENCE.replace(**bad).validate()


def test_new_options_validate():
    ok = REFERENCE.replace(optimizer="sgd", drop_path=0.1, compile=True, store="full").validate()
    assert (ok.optimizer, ok.drop_path, ok.compile, ok.store) == ("sgd", 0.1, True, "full")


def test_field_types_for_the_cli():
    assert field_type("store") == (str, False)
    assert field_type("drop_path") == (float, True)
    assert field_type("compile") == (bool, False)
    assert field_type("sampler") == (str, True)


NEW_OPTION_SCRIPT = r'''
import json, sys
from pathlib import Path
import pandas as pd
import artlearn
from artlearn import augment, tta
from artlearn.kfold import train_kfold

assert artlearn.__file__.startswith(sys.argv[1]), artlearn.__file__
old_run, new_run, table = Path(sys.argv[2]), Path(sys.argv[3]), pd.read_csv(sys.argv[4])
windows = []
def shifted(cache, paths, size, pool, device):
    windows.append(len(paths))
    return [v.roll(1, dims=3) for v in tta.native_windows(cache, paths, size, pool, device)[:1]]
tta.TTA_VIEWS["shift"] = tta.TTA(n_windows=1, windows=shifted)
kw = dict(preset="fast", size=16, bs=4, epochs=1, n_folds=2, progress=False)
weights = sorted(old_run.glob("fold*/best.safetensors"))
before = [w.stat().st_mtime_ns for w in weights]
train_kfold(table, old_run, **kw)  # the old run resumes: nothing retrained
assert [w.stat().st_mtime_ns for w in weights] == before
train_kfold(table, new_run, grey_prob=0.5, tta="shift", **kw)
config = json.loads((new_run / "config.json").read_text())
print(json.dumps(dict(config=[config["grey_prob"], config["tta"]], applied=sorted(set(augment.GREY_CALLS)),
                      windows=sum(windows), rows=len(table))))
'''


def test_a_new_data_option_and_tta_view_need_no_other_edit(tmp_path, dataset):
    """docs/architecture.md's promise, kept: a scratch copy of artlearn gets a data option as a contributor adds one
    (a field in recipe.py, its use in augment.recipe_views, nothing else) and a TTA view registered at run time; the
    option reaches the CLI, config.json and the loader, the view the OOF predictions, and a run trained before the
    option existed resumes without retraining a fold."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import artlearn
    from artlearn.kfold import train_kfold
    from artlearn.tables import read_artworks
    src = tmp_path / "src"
    shutil.copytree(Path(artlearn.__file__).parent, src / "artlearn", ignore=shutil.ignore_patterns("__pycache__"))
    recipe_py, augment_py = src / "artlearn" / "recipe.py", src / "artlearn" / "augment.py"
    anchor = "    colour_jitter: float = _setting("
    field = '    grey_prob: float = _setting(0.0, "data", "dls", "probability of a grey training view (0: off)")\n'
    recipe_py.write_text(recipe_py.read_text().replace(anchor, field + anchor, 1))
    use = "    return colour_jitter(x, recipe.colour_jitter, generator)\n"
    grey = ("    x = colour_jitter(x, recipe.colour_jitter, generator)\n    if recipe.grey_prob:\n"
            "        GREY_CALLS.append(recipe.grey_prob)\n"
            "        x = x.mean(1, keepdim=True).expand_as(x).contiguous()\n"
            "    return x\n\n\nGREY_CALLS = []\n")
    assert use in augment_py.read_text()
    augment_py.write_text(augment_py.read_text().replace(use, grey, 1))

    table = read_artworks(dataset([6, 5, 4], size=(40, 30)))
    table.to_csv(tmp_path / "table.csv", index=False)
    old_run = tmp_path / "old-run"
    train_kfold(table, old_run, preset="fast", size=16, bs=4, epochs=1, n_folds=2, progress=False)
    assert "grey_prob" not in json.loads((old_run / "config.json").read_text())

    env = {**__import__("os").environ, "PYTHONPATH": str(src), "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).resolve().parents[1] / "examples" / "run_kfold.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], env=env, capture_output=True, text=True,
                               check=True, cwd=tmp_path).stdout
    assert "--grey-prob" in help_text and "shift" not in help_text
    done = subprocess.run([sys.executable, "-c", NEW_OPTION_SCRIPT, str(src), str(old_run), str(tmp_path / "new"),
                           str(tmp_path / "table.csv")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["config"] == [0.5, "shift"] and report["applied"] == [0.5]
    assert report["windows"] == report["rows"]  # every OOF row went through the registered view's windows
