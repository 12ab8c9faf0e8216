"""Execute the demo notebooks (nbs/) with nbclient in their tiny smoke setting (ARTLEARN_NB_SMOKE=1)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NBS = Path(__file__).resolve().parents[1] / "nbs"
NAMES = ["01_data", "02_train_one_fold", "03_kfold_ensemble", "04_compare", "05_predict_explain"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One folder for every notebook's data and runs, so the smoke data set is built once."""
    return tmp_path_factory.mktemp("nb_work")


def _outputs(nb, kind: str) -> list:
    """Every output of the code cells holding the given MIME type."""
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if kind in o.get("data", {})]


def test_notebooks_present_with_settings_first():
    assert sorted(p.stem for p in NBS.glob("[0-9][0-9]_*.ipynb")) == NAMES
    for name in NAMES:
        nb = nbformat.read(NBS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        first = next(c for c in nb.cells if c.cell_type == "code").source
        assert "ARTLEARN_NB_SMOKE" in first and "DATA = None" in first and "ARTLEARN_NB_WORK" in first, name


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_smoke_mode(name, work, monkeypatch):
    monkeypatch.setenv("ARTLEARN_NB_SMOKE", "1")
    monkeypatch.setenv("ARTLEARN_NB_WORK", str(work))
    nb = nbformat.read(NBS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NBS)}})
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    assert _outputs(nb, "image/png"), f"{name}: no figure was displayed"
