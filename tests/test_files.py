"""artlearn.files: atomic writes (temp file + os.replace) and JSON reading with errors that name the file."""
import json

import numpy as np
import pandas as pd
import pytest

from artlearn.files import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text, read_json


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails mid-write
    assert path.read_text() == "new"
    atomic_write_json(tmp_path / "m.json", {"a": np.float32(0.5), "b": np.arange(2), "p": tmp_path})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 0.5, "b": [0, 1], "p": str(tmp_path)}
    df = pd.DataFrame({"epoch": [0, 1], "lr": [1e-3, 0.1 + 0.2]})
    atomic_write_csv(tmp_path / "h.csv", df)
    back = pd.read_csv(tmp_path / "h.csv", float_precision="round_trip")  # pandas < 3 parses inexactly otherwise
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt", "h.csv", "m.json"]




def test_read_json_names_a_damaged_file(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"a": 1')
    with pytest.raises(ValueError, match="meta.json: not valid JSON"):
        read_json(path)
    path.write_text('{"a": 1}')
    assert read_json(path) == {"a": 1}
