"""artlearn.folds: stratified folds (sklearn StratifiedKFold as oracle), the fastai splitter, subsets."""
import os
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from conftest import raises_with
from sklearn.model_selection import StratifiedKFold

from artlearn.folds import (
    StratifiedFoldSplitter,
    assign_folds,
    check_fold_groups,
    stratified_fold_ids,
    stratified_group_fold_ids,
)
from artlearn.tables import read_artworks

LONG_TAIL = [40, 23, 15, 11, 9, 7, 6, 5, 4, 3, 2, 2, 1, 1]  # counts per artist (A00..A13)


def long_tail_table(counts=LONG_TAIL) -> pd.DataFrame:
    """A table of made-up paths (no files needed by the fold functions)."""
    rows = [(f"/data/{a}_{j:03d}.jpg", f"A{a:02d}") for a, n in enumerate(counts) for j in range(n)]
    return pd.DataFrame(rows, columns=["img_path", "artist"])


def per_fold_counts(folds, labels, n_folds) -> dict:
    """artist -> sorted per-fold counts."""
    tab = pd.crosstab(pd.Series(labels, name="artist"), pd.Series(folds, name="fold"))
    tab = tab.reindex(columns=range(n_folds), fill_value=0)
    return {a: sorted(row) for a, row in tab.iterrows()}


def sklearn_folds(labels, n_folds, seed) -> np.ndarray:
    """Fold per row from sklearn's StratifiedKFold (the oracle); sklearn only warns about rare classes."""
    folds = np.full(len(labels), -1)
    skf = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, valid) in enumerate(skf.split(np.zeros(len(labels)), labels)):
            folds[valid] = f
    return folds



# ---------------------------------------------------------------- folds


@pytest.mark.parametrize("n_folds", [4, 5])
def test_folds_match_sklearn_counts(n_folds):
    df = long_tail_table()
    with pytest.warns(UserWarning):
        out = assign_folds(df, n_folds, seed=0)
    folds = out["fold"].to_numpy()
    assert set(folds) == set(range(n_folds)) and len(folds) == len(df) and (folds >= 0).all()
    ours = per_fold_counts(folds, df["artist"], n_folds)
    oracle = per_fold_counts(sklearn_folds(df["artist"], n_folds, 0), df["artist"], n_folds)
    assert ours == oracle
    assert all(c[-1] - c[0] <= 1 for c in ours.values())
    sizes, oracle_sizes = np.bincount(folds), np.bincount(sklearn_folds(df["artist"], n_folds, 0))
    assert sizes.max() - sizes.min() <= oracle_sizes.max() - oracle_sizes.min()
    assert out.drop(columns="fold").equals(df) and "fold" not in df.columns  # a copy; df untouched


def test_folds_deterministic_and_seeded():
    df = long_tail_table()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a, b = assign_folds(df, 4, seed=42)["fold"], assign_folds(df, 4, seed=42)["fold"]
        c = assign_folds(df, 4, seed=43)["fold"]
    assert a.equals(b)
    assert not a.equals(c)
    assert per_fold_counts(a, df["artist"], 4) == per_fold_counts(c, df["artist"], 4)


def test_folds_independent_of_row_order():
    df = long_tail_table()
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = assign_folds(df, 4, seed=7).set_index("img_path")["fold"]
        b = assign_folds(shuffled, 4, seed=7).set_index("img_path")["fold"]
    assert a.sort_index().equals(b.sort_index())


def test_rare_artists_warned_and_spread_over_folds():
    df = long_tail_table([9, 6, 3, 2, 1])
    with pytest.warns(UserWarning, match="fewer works than n_folds=4") as rec:
        out = assign_folds(df, 4, seed=1)
    message = str(rec[0].message)
    assert "A02" in message and "A03" in message and "A04" in message and "A00" not in message
    for artist in ["A02", "A03", "A04"]:
        folds = out.loc[out["artist"] == artist, "fold"]
        assert folds.is_unique  # every work in a different fold
    # sklearn handles the same table by only warning, with the same per-fold counts
    with pytest.warns(UserWarning, match="least populated class"):
        list(StratifiedKFold(4, shuffle=True, random_state=1).split(np.zeros(len(df)), df["artist"]))
    assert per_fold_counts(out["fold"], df["artist"], 4) == per_fold_counts(
        sklearn_folds(df["artist"], 4, 1), df["artist"], 4)


def test_single_work_artist():
    df = long_tail_table([5, 1])
    with pytest.warns(UserWarning, match="A01"):
        out = assign_folds(df, 2, seed=0)
    assert out["fold"].between(0, 1).all() and (out["artist"] == "A01").sum() == 1
    assert sorted(np.bincount(out["fold"])) == [3, 3]


def test_fold_count_errors():
    df = long_tail_table([2, 1])
    with raises_with("n_folds=4", "3 rows"):
        assign_folds(df, 4)
    for bad in (1, 0, -2, 2.5, "4"):
        with raises_with("n_folds", "at least 2"):
            assign_folds(long_tail_table(), bad)
    with raises_with("'artist'"):
        assign_folds(df.drop(columns="artist"))
    with raises_with("n_folds=3"):
        stratified_fold_ids(["a", "b"], 3)


def test_real_data_folds(real_data):
    df = read_artworks(real_data / "train.csv")
    assert len(df) > 1000 and df["img_path"].map(os.path.isabs).all()
    a = assign_folds(df, 4, seed=42)
    b = assign_folds(df, 4, seed=42)
    c = assign_folds(df, 4, seed=43)
    counts = per_fold_counts(a["fold"], a["artist"], 4)
    assert all(v[-1] - v[0] <= 1 for v in counts.values()), counts
    assert a["fold"].equals(b["fold"]) and not a["fold"].equals(c["fold"])
    sizes = np.bincount(a["fold"])
    assert sizes.max() - sizes.min() <= 1


# ---------------------------------------------------------------- splitter


def check_split(train, valid, n):
    assert set(train).isdisjoint(valid) and sorted([*train, *valid]) == list(range(n)) and train and valid


def test_splitter_uses_fold_column():
    df = long_tail_table([6, 5, 4])
    df["fold"] = np.arange(len(df)) % 3
    for f in range(3):
        train, valid = StratifiedFoldSplitter(f, n_folds=3)(df)
        check_split(train, valid, len(df))
        assert valid == list(np.flatnonzero(df["fold"] == f))


def test_splitter_computes_stratified_folds():
    df = long_tail_table([8, 8, 4])
    seen = []
    for f in range(4):
        train, valid = StratifiedFoldSplitter(f, n_folds=4, seed=5)(df)
        check_split(train, valid, len(df))
        assert Counter(df["artist"].iloc[valid]) == {"A00": 2, "A01": 2, "A02": 1}
        seen += valid
    assert sorted(seen) == list(range(len(df)))  # the folds partition the table
    # plain label lists work too, and agree with assign_folds on the same table
    train, valid = StratifiedFoldSplitter(0, n_folds=4, seed=5)(list(df["artist"]))
    check_split(train, valid, len(df))
    folds = assign_folds(df, 4, seed=5)["fold"]
    assert StratifiedFoldSplitter(2, n_folds=4, seed=5)(df)[1] == list(np.flatnonzero(folds == 2))


def test_splitter_bad_fold():
    for fold in (4, -1, 1.0):
        with raises_with(f"fold={fold!r}", "0..3"):
            StratifiedFoldSplitter(fold, n_folds=4)
    df = long_tail_table([4, 4])
    df["fold"] = [0, 1, 2, 5, 0, 1, 2, 3]
    with raises_with("fold 5", "n_folds=4"):
        StratifiedFoldSplitter(0, n_folds=4)(df)




# ---------------------------------------------------------------- identical images


def test_without_copies_the_folds_are_unchanged():
    df = long_tail_table()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grouped = assign_folds(df, 4, seed=3, groups=[f"k{i}" for i in range(len(df))])
        plain = assign_folds(df, 4, seed=3, groups=None)
    assert grouped["fold"].tolist() == plain["fold"].tolist() == list(stratified_fold_ids(df["artist"], 4, 3,
                                                                                          keys=df["img_path"]))


def test_copies_share_a_fold_and_stratification_holds():
    df = long_tail_table([12, 10, 8])
    keys = [f"k{i // 3}" if i < 9 else f"u{i}" for i in range(len(df))]  # 3 sets of 3 copies among A00's works
    with pytest.warns(UserWarning, match=r"t: 3 image\(s\) appear more than once \(identical files, 6 extra"):
        out = assign_folds(df, 4, seed=0, groups=keys, source="t")
    for k in ("k0", "k1", "k2"):
        assert out["fold"][[key == k for key in keys]].nunique() == 1
    counts = per_fold_counts(out["fold"], out["artist"], 4)
    assert counts["A00"][-1] - counts["A00"][0] <= 3 and all(c[-1] - c[0] <= 1 for a, c in counts.items() if a != "A00")
    again = stratified_group_fold_ids(df["artist"], keys, 4, 0, keys=df["img_path"])
    assert again.tolist() == out["fold"].tolist()  # deterministic for a seed


def test_copies_with_different_artists_are_refused():
    df = long_tail_table([4, 4])
    keys = ["same"] + [f"u{i}" for i in range(1, 4)] + ["same"] + [f"v{i}" for i in range(1, 4)]
    with raises_with("1 image(s) appear more than once with different artists", "('A00')", "('A01')"):
        assign_folds(df, 2, groups=keys)
    with raises_with("groups: 2 key(s) for 8 row(s)"):
        assign_folds(df, 2, groups=["a", "b"])


def test_a_given_fold_column_must_keep_copies_together():
    df = long_tail_table([4]).assign(fold=[0, 1, 0, 1])
    check_fold_groups(df, ["a", "b", "a", "c"], "t")
    with raises_with("t: column 'fold' puts copies of 1 image(s) in different folds", "(folds [0, 1])"):
        check_fold_groups(df, ["a", "a", "b", "c"], "t")


def test_mixed_int_and_text_artists_are_text():
    df = pd.DataFrame({"img_path": [f"/x/{i}.jpg" for i in range(8)], "artist": [7, "7", " 7", 8, "8", 9, "9", "x"]})
    with pytest.warns(UserWarning, match="x"):
        out = assign_folds(df, 2)
    assert sorted(out["artist"].unique()) == ["7", "8", "9", "x"]
