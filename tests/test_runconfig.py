"""artlearn.runconfig: a run's config.json in today's terms and the run identity its folds record."""
import json

import pytest

from artlearn.recipe import Recipe, absent_means
from artlearn.runconfig import ABSENT_MEANS, config_as_now, read_config, run_identity

# config.json of a `--preset fast --budget 15min` run written by artlearn at commit 1e232af (before colour_jitter)
V3_CONFIG = {'format': 'artlearn-run',
 'format_version': 3,
 'preset': 'fast',
 'n_folds': 4,
 'seed': 42,
 'budget': 892.6741859912872,
 'size': 64,
 'bs': 32,
 'min_scale': 0.35,
 'max_rotate': 15.0,
 'flip': True,
 'sampler': None,
 'pipeline': 'device',
 'store': 'crop',
 'arch': 'resnet18',
 'pool': 'avg',
 'grad_checkpoint': False,
 'zero_init_residual': False,
 'drop_path': None,
 'compile': False,
 'epochs': None,
 'lr': 0.0005,
 'optimizer': 'adam',
 'wd': 0.0,
 'label_smoothing': 0.05,
 'eta_min': 0.0,
 'warmup': 0,
 'monitor': 'valid_loss',
 'precision': 'auto',
 'grad_accum': 1,
 'mixup': 0.0,
 'cutmix': 0.0,
 'ema': None,
 'logit_adjust': 0.0,
 'progressive': 0.0,
 'tta': 'flip',
 'n_images': 5311,
 'n_artists': 50,
 'data': 'f7ddf727be90ac4c',
 'library_version': '0.1.0'}
# what that artlearn's run_identity gave for it (its folds' meta.json record it as run_id)
V3_IDENTITY = "4c5a431fc59413889cb72a9cf8153c93"


def test_the_identity_of_an_existing_run_is_unchanged_by_settings_added_since():
    assert "colour_jitter" not in V3_CONFIG
    assert run_identity(V3_CONFIG) == V3_IDENTITY
    assert run_identity({**V3_CONFIG, "colour_jitter": 0.0}) == V3_IDENTITY  # what a resume writes today
    assert run_identity({**V3_CONFIG, "colour_jitter": 0.2}) != V3_IDENTITY
    assert run_identity({**V3_CONFIG, "budget": None}) == V3_IDENTITY  # how long, not what
    assert run_identity({**V3_CONFIG, "lr": 1e-3}) != V3_IDENTITY


def test_absent_keys_mean_what_each_fields_metadata_says():
    old = {k: v for k, v in V3_CONFIG.items() if k not in ("pipeline", "store", "zero_init_residual")}
    now = config_as_now(old)
    assert (now["pipeline"], now["store"], now["zero_init_residual"], now["colour_jitter"]) == (
        "items", "presize", False, 0.0)
    assert set(Recipe.names()) <= set(now) and ABSENT_MEANS == {**absent_means(), "budget": None}
    assert config_as_now({**V3_CONFIG, "tta": None})["tta"] == "none"  # an old spelling


def test_read_config_refuses_a_folder_that_is_not_a_run_and_a_newer_format(tmp_path):
    with pytest.raises(ValueError, match="not an artlearn run directory"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**V3_CONFIG, "format_version": 99}))
    with pytest.raises(ValueError, match="newer than this artlearn reads"):
        read_config(tmp_path)
