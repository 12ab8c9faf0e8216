"""The package: `import artlearn` and the light stages stay fast (fastai and torch load on first use)."""
import subprocess
import sys

import artlearn


def test_import_is_light():
    code = ("import sys, time; t = time.perf_counter(); import artlearn, artlearn.tables, artlearn.folds, "
            "artlearn.store, artlearn.recipe, artlearn.run; "
            "print(time.perf_counter() - t, 'fastai' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    seconds, fastai_loaded, torch_loaded = out.stdout.split()
    assert float(seconds) < 3.0 and fastai_loaded == "False" and torch_loaded == "False"


def test_every_public_name_resolves():
    for name in artlearn.__all__:
        assert getattr(artlearn, name) is not None, name
    assert callable(artlearn.ensemble) and callable(artlearn.predict)
