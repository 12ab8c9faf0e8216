"""artlearn.tables: reading and validating tables, decoding every image mode, checking images."""
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import MODES, broken_dataset, mode_suffix, raises_with, write_broken, write_image, write_mode_image
from PIL import Image

from artlearn.tables import (
    check_images,
    check_img_paths,
    content_digest,
    content_digests,
    load_rgb,
    normalise_label,
    normalise_labels,
    read_artworks,
)


# ---------------------------------------------------------------- read_artworks


def test_read_csv_paths_resolved(dataset, tmp_path):
    csv = dataset([3, 2], test=2)
    df = read_artworks(csv)
    assert list(df.columns) == ["id", "img_path", "artist"] and len(df) == 5
    assert all(Path(p).is_absolute() and Path(p).is_file() and Path(p).parent == csv.parent / "train"
               for p in df["img_path"])
    # the same table stored elsewhere, read against root=
    moved = tmp_path / "elsewhere" / "train.csv"
    moved.parent.mkdir()
    moved.write_text(csv.read_text())
    with raises_with("do not exist"):
        read_artworks(moved)
    assert read_artworks(moved, root=csv.parent)["img_path"].tolist() == df["img_path"].tolist()
    # a test table without artist
    test = read_artworks(csv.parent / "test.csv")
    assert list(test.columns) == ["id", "img_path"] and len(test) == 2
    # kind='test' with an artist column: warned and dropped
    with pytest.warns(UserWarning, match="'artist' column"):
        t = read_artworks(csv, kind="test")
    assert "artist" not in t.columns and len(t) == 5


def test_read_keeps_extra_columns(dataset):
    csv = dataset([2, 2])
    table = pd.read_csv(csv)
    table["year"] = [1890, 1891, 1700, 1701]
    table.to_csv(csv, index=False)
    df = read_artworks(csv, kind="train")
    assert df["year"].tolist() == ["1890", "1891", "1700", "1701"] and "id" in df.columns


def test_read_folder_layout(tmp_path):
    for artist, n in [("Claude_Monet", 3), ("Frida_Kahlo", 2)]:
        for j in range(n):
            write_image(tmp_path / artist / f"{j}.jpg", seed=j)
    (tmp_path / "Claude_Monet" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_dir").mkdir()
    write_image(tmp_path / ".hidden" / "x.jpg")
    with pytest.warns(UserWarning, match="skipped 2 entr") as rec:
        df = read_artworks(tmp_path)
    assert "1 unknown extension: " in str(rec[0].message) and "notes.txt" in str(rec[0].message)
    assert "1 artist folder without images (artist left out)" in str(rec[0].message)
    assert Counter(df["artist"]) == {"Claude_Monet": 3, "Frida_Kahlo": 2}
    assert df["img_path"].map(lambda p: Path(p).is_absolute() and Path(p).suffix == ".jpg").all()
    with raises_with(str(tmp_path / "empty_dir"), "no images"):
        read_artworks(tmp_path / "empty_dir")


def test_read_errors(dataset, tmp_path):
    csv = dataset([3, 2])
    good = pd.read_csv(csv)
    folder = csv.parent

    def table(name, frame):
        frame.to_csv(folder / name, index=False)
        return folder / name

    with raises_with(f"{folder / 'a.csv'}", "missing column 'img_path'", "['id', 'path', 'artist']"):
        read_artworks(table("a.csv", good.rename(columns={"img_path": "path"})))
    with raises_with("b.csv", "missing column 'artist'"):
        read_artworks(table("b.csv", good.drop(columns="artist")), kind="train")
    with raises_with("c.csv", "no rows"):
        read_artworks(table("c.csv", good.iloc[:0]))
    (folder / "d.csv").write_bytes(b"")
    with raises_with("d.csv", "empty"):
        read_artworks(folder / "d.csv")
    with raises_with("nope.csv", "no such"):
        read_artworks(folder / "nope.csv")
    bad = good.copy()
    bad.loc[1, "artist"] = np.nan
    bad.loc[3, "artist"] = "   "
    with raises_with("e.csv", "'artist'", "2 row(s)", "row 1 (line 3)", "row 3 (line 5)"):
        read_artworks(table("e.csv", bad))
    bad = good.copy()
    bad.loc[3, "id"] = bad.loc[0, "id"]
    with raises_with("f.csv", "'id'", "'TRAIN_0000'", "[0, 3]"):
        read_artworks(table("f.csv", bad))
    bad = good.copy()
    bad.loc[[1, 2, 4], "img_path"] = ["./train/gone1.jpg", "./train/gone2.jpg", "./train/gone3.jpg"]
    with raises_with("g.csv", "3 of 5", str(folder / "train" / "gone1.jpg")):
        read_artworks(table("g.csv", bad))
    write_image(tmp_path / "outside.jpg")
    bad = good.copy()
    bad.loc[2, "img_path"] = "../outside.jpg"
    with raises_with("h.csv", "escape", "../outside.jpg", "row 2"):
        read_artworks(table("h.csv", bad))
    with raises_with("kind="):
        read_artworks(csv, kind="valid")
    with raises_with("on_bad="):
        read_artworks(csv, on_bad="ignore")


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_loads_as_rgb_uint8(tmp_path, mode):
    path = write_mode_image(tmp_path / f"img{mode_suffix(mode)}", mode)
    img = load_rgb(path)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (20, 24, 3) and arr.dtype == np.uint8
    report = check_images(pd.DataFrame({"img_path": [str(path)]}))
    row = report.iloc[0]
    assert row["ok"] and row["problem"] == "" and (row["width"], row["height"]) == (24, 20)
    assert row["mode"] == ("P" if mode == "PT" else mode) and "converted to RGB" in row["odd"]


def test_transparency_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = np.asarray(load_rgb(tmp_path / "a.png"))
    assert (arr[:, :4] == 255).all() and (arr[:, 4:] == [200, 0, 0]).all()


def test_16bit_scaled(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    arr = np.asarray(load_rgb(tmp_path / "a.png"))
    assert (arr[0, :, 0] == [0, 1, 128, 255]).all() and (arr[..., 0] == arr[..., 2]).all()
    # a dark 16-bit image stays dark (the range is 0..65535 whatever the maximum)
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(tmp_path / "dark.png")
    assert np.asarray(load_rgb(tmp_path / "dark.png")).max() <= 1


def test_1bit_is_black_and_white(tmp_path):
    bits = np.zeros((6, 6), bool)
    bits[:, 3:] = True
    Image.fromarray(bits).save(tmp_path / "a.png")
    arr = np.asarray(load_rgb(tmp_path / "a.png"))
    assert (arr[:, :3] == 0).all() and (arr[:, 3:] == 255).all()


def test_check_images_reports_broken_files(tmp_path):
    broken = write_broken(tmp_path)
    good = str(write_image(tmp_path / "good.jpg"))
    report = check_images(pd.DataFrame({"img_path": [*broken.values(), good]})).set_index("img_path")
    assert list(report.columns) == ["ok", "mode", "width", "height", "odd", "problem"]
    assert report.loc[good, "ok"] and report.loc[good, "problem"] == ""
    assert not report.loc[list(broken.values()), "ok"].any()
    assert "empty" in report.loc[broken["zero"], "problem"] and "0 bytes" in report.loc[broken["zero"], "problem"]
    assert "truncated" in report.loc[broken["truncated"], "problem"]
    assert "not an image" in report.loc[broken["text"], "problem"]


@pytest.mark.parametrize("limit", [300, 100])  # 480-pixel image: Pillow's warning zone, then its error zone
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    path = str(write_image(tmp_path / "big.png", (24, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        row = check_images(pd.DataFrame({"img_path": [path]})).iloc[0]
        with pytest.raises(Image.DecompressionBombError):
            load_rgb(path)
    assert not row["ok"] and "decompression-bomb limit" in row["problem"] and str(limit) in row["problem"]
    assert warnings.filters == filters


def test_bomb_check_is_thread_safe(tmp_path, monkeypatch):
    """Many threads at once: every over-limit image refused, the warning filters left as they were."""
    paths = [str(write_image(tmp_path / f"{i}.png", (24, 20), seed=i)) for i in range(64)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for _ in range(8):
            report = check_images(pd.DataFrame({"img_path": paths}), workers=8)
            assert not report["ok"].any()
    assert warnings.filters == filters


def test_read_artworks_on_bad(dataset):
    csv, broken = broken_dataset(dataset)
    assert len(read_artworks(csv)) == 18  # no decode check by default
    with raises_with("3 unreadable", *broken.values(), "on_bad='drop'") as info:
        read_artworks(csv, on_bad="raise")
    assert "truncated" in str(info.value) and "not an image" in str(info.value) and "empty file" in str(info.value)
    with pytest.warns(UserWarning, match="dropped 3 row") as rec:
        df = read_artworks(csv, on_bad="drop")
    assert all(p in str(rec[0].message) for p in broken.values())
    assert len(df) == 15 and not set(broken.values()) & set(df["img_path"]) and df.index.tolist() == list(range(15))




# ---------------------------------------------------------------- labels, paths, digests


def test_normalise_label():
    cases = {" Van Gogh ": "Van Gogh", "Van  Gogh": "Van Gogh", "Van\u00a0Gogh": "Van Gogh",
             "Du\u0308rer": "D\u00fcrer", 7: "7", "07": "07", "NA": "NA", "None": "None", "\tA\nB ": "A B"}
    assert {k: normalise_label(k) for k in cases} == cases
    df = pd.DataFrame({"artist": [7, "7", " 7"]})
    assert normalise_labels(df, "t")["artist"].tolist() == ["7", "7", "7"]
    with pytest.warns(UserWarning, match="differ only in upper/lower case: 'Monet' / 'monet'"):
        normalise_labels(pd.DataFrame({"artist": ["Monet", "monet", "Bo"]}), "t")


def test_check_img_paths(tmp_path):
    df = pd.DataFrame({"img_path": ["a.jpg", None, "  ", float("nan"), ""]})
    with raises_with("t: column 'img_path' is empty in 4 row(s): row 1 (line 3), row 2 (line 4), row 3 (line 5)"):
        check_img_paths(df, "t")
    with raises_with("holds 1 value(s) that are not paths: row 1 (3)"):
        check_img_paths(pd.DataFrame({"img_path": ["a.jpg", 3]}), "t")
    out = check_img_paths(pd.DataFrame({"img_path": [tmp_path / "a.jpg"]}), "t")
    assert out["img_path"].tolist() == [str(tmp_path / "a.jpg")]


def test_content_digests(tmp_path):
    a, b = write_image(tmp_path / "a.jpg", seed=1), write_image(tmp_path / "b.png", seed=2)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(a.read_bytes())
    digests = content_digests([a, b, copy])
    assert digests[0] == digests[2] != digests[1] and digests[0] == content_digest(a) and len(digests[0]) == 32
    with raises_with("imgs: 1 image file(s) cannot be read", str(tmp_path)):
        content_digests([a, tmp_path], source="imgs")


def test_escaping_is_judged_on_the_path_as_written(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    write_image(tmp_path / "elsewhere" / "x.jpg")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "imgs").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    pd.DataFrame({"img_path": ["imgs/x.jpg"], "artist": ["A"]}).to_csv(tmp_path / "data" / "t.csv", index=False)
    assert read_artworks(tmp_path / "data" / "t.csv")["img_path"].tolist() == [str(tmp_path / "elsewhere" / "x.jpg")]
    pd.DataFrame({"img_path": ["imgs/../../elsewhere/x.jpg"], "artist": ["A"]}).to_csv(tmp_path / "data" / "t.csv",
                                                                                       index=False)
    with raises_with("escape the data folder"):
        read_artworks(tmp_path / "data" / "t.csv")
