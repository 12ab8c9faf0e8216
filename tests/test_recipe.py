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


def test_tta_setting_takes_the_names_ensemble_takes():
    from artlearn.ensemble import TTA_CHOICES
    assert REFERENCE.tta == "flip" and set(TTAS) == set(TTA_CHOICES) - {None}
    with pytest.raises(ValueError, match="tta='multi'"):
        REFERENCE.replace(tta="multi").validate()


def test_signature_defaults_read_the_recipe():
    dls_defaults = inspect.signature(artist_dls).parameters
    learner_defaults = inspect.signature(artist_learner).parameters
    for name, value in REFERENCE.kwargs_for("dls").items():
        assert dls_defaults[name].default == value, name
    for name, value in REFERENCE.kwargs_for("learner").items():  # grad_checkpoint travels as a model keyword
        if name in learner_defaults and name != "epochs":  # epochs=None: the cosine spans each fit;
            assert learner_defaults[name].default == value, name
    consumers = {f.metadata["to"] for f in dataclasses.fields(Recipe)}
    assert consumers == {"dls", "learner", "kfold"}
    assert sum(len(REFERENCE.kwargs_for(c)) for c in consumers) == len(Recipe.names())


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
