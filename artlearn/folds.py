"""Stratified K-fold assignment (identical images kept in one fold), the fastai fold splitter, stratified subsets."""
import os
import sys
import warnings

import numpy as np
import pandas as pd

from .checks import listing
from .tables import content_digests, normalise_labels


def check_n_folds(n_folds, n_rows: int) -> None:
    """n_folds must be an int in [2, n_rows]."""
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds={n_folds!r}: need an integer of at least 2")
    if n_folds > n_rows:
        raise ValueError(f"n_folds={n_folds} is larger than the table ({n_rows} rows); use at most {n_rows} folds")


def stratified_fold_ids(labels, n_folds: int = 4, seed: int = 42, keys=None) -> np.ndarray:
    """Fold number per row: each label's rows dealt evenly over folds (counts within 1), fold sizes balanced.

    Rows are ordered by `keys` (default: position) before a seeded shuffle, so the assignment does not depend on
    the table's row order when keys are given. A label with fewer rows than folds lands in as many folds as it has
    rows (the least filled ones); it is absent from the validation split of the other folds.
    """
    labels = pd.Series(list(labels))
    check_n_folds(n_folds, len(labels))
    keys = pd.Series(range(len(labels)) if keys is None else list(keys))
    rng = np.random.default_rng(seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    fold_sizes = np.zeros(n_folds, dtype=np.int64)
    counts = labels.value_counts()
    order = sorted(counts.index, key=lambda a: (-counts[a], str(a)))
    for artist in order:
        idx = np.flatnonzero((labels == artist).to_numpy())
        idx = idx[np.argsort(keys.iloc[idx].astype(str).to_numpy(), kind="stable")]
        idx = idx[rng.permutation(len(idx))]
        base, extra = divmod(len(idx), n_folds)
        tie_break = rng.permutation(n_folds)
        least_filled = sorted(range(n_folds), key=lambda f: (fold_sizes[f], tie_break[f]))
        per_fold = np.full(n_folds, base)
        per_fold[least_filled[:extra]] += 1
        slots = np.repeat(np.arange(n_folds), per_fold)
        folds[idx] = slots[rng.permutation(len(slots))]
        fold_sizes += per_fold
    return folds


def stratified_group_fold_ids(labels, groups, n_folds: int = 4, seed: int = 42, keys=None) -> np.ndarray:
    """Fold number per row with each group (identical images, one label each) kept whole in one fold.

    sklearn's StratifiedGroupKFold semantics: groups are never split, each label's rows are spread as evenly as the
    group sizes allow (greedy: largest group first, to the fold with the fewest rows of that label, then the least
    filled). Rows are ordered as in `stratified_fold_ids` (by keys, then a seeded shuffle).
    """
    labels, groups = pd.Series(list(labels)), pd.Series(list(groups))
    n_groups = groups.nunique()
    check_n_folds(n_folds, len(labels))
    if n_groups < n_folds:
        raise ValueError(f"n_folds={n_folds} is larger than the number of distinct images ({n_groups}); use at "
                         f"most {n_groups} folds")
    keys = pd.Series(range(len(labels)) if keys is None else list(keys))
    rng = np.random.default_rng(seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    fold_sizes = np.zeros(n_folds, dtype=np.int64)
    counts = labels.value_counts()
    for artist in sorted(counts.index, key=lambda a: (-counts[a], str(a))):
        idx = np.flatnonzero((labels == artist).to_numpy())
        idx = idx[np.argsort(keys.iloc[idx].astype(str).to_numpy(), kind="stable")]
        idx = idx[rng.permutation(len(idx))]
        units = list(pd.Series(idx).groupby(groups.iloc[idx].to_numpy(), sort=False).apply(list))
        units.sort(key=len, reverse=True)
        tie_break, per_label = rng.permutation(n_folds), np.zeros(n_folds, dtype=np.int64)
        for unit in units:
            f = min(range(n_folds), key=lambda f: (per_label[f], fold_sizes[f], tie_break[f]))
            folds[unit] = f
            per_label[f] += len(unit)
            fold_sizes[f] += len(unit)
    return folds


def rare_artists(df: pd.DataFrame, n_folds: int) -> list:
    """Artists with fewer works than folds."""
    counts = df["artist"].value_counts()
    return sorted(counts[counts < n_folds].index, key=str)


def content_keys(paths) -> list:
    """One key per image: its content digest when the file exists, else its absolute path (identical = same key)."""
    paths = [str(p) for p in paths]
    exists = [os.path.isfile(p) for p in paths]
    digests = iter(content_digests([p for p, e in zip(paths, exists) if e]))
    return [next(digests) if e else "path:" + os.path.abspath(p) for p, e in zip(paths, exists)]


def duplicate_sets(df: pd.DataFrame, keys) -> list:
    """Row positions of every set of rows sharing a key (identical images), largest first."""
    keys = pd.Series(list(keys))
    dup = keys[keys.duplicated(keep=False)]
    return sorted((list(v) for v in dup.groupby(dup, sort=False).groups.values()), key=len, reverse=True)


def _describe_set(df: pd.DataFrame, rows: list, with_artist: bool) -> str:
    """'a.jpg = b.jpg' (with each row's artist when asked)."""
    parts = [f"{df['img_path'].iloc[r]}" + (f" ({df['artist'].iloc[r]!r})" if with_artist else "") for r in rows]
    return " = ".join(parts)


def check_duplicates(df: pd.DataFrame, keys, source="table") -> list:
    """Refuse identical images labelled with different artists; warn about the others; returns the sets."""
    sets = duplicate_sets(df, keys)
    conflicts = [r for r in sets if df["artist"].iloc[r].nunique() > 1]
    if conflicts:
        named = [_describe_set(df, r, True) for r in conflicts]
        raise ValueError(f"{source}: {len(conflicts)} image(s) appear more than once with different artists: "
                         f"{listing(named, len(named))}; an image has one artist: fix or remove the wrong rows")
    if sets:
        named = [_describe_set(df, r, False) for r in sets]
        warnings.warn(f"{source}: {len(sets)} image(s) appear more than once (identical files, "
                      f"{sum(map(len, sets)) - len(sets)} extra row(s)): {listing(named, len(named))}; each set is "
                      "kept in one fold, so no copy is validated by a model trained on another (remove the copies "
                      "to silence this)", stacklevel=3)
    return sets


def check_fold_groups(df: pd.DataFrame, keys, source="table") -> None:
    """Refuse a given 'fold' column that puts copies of one image in different folds (their OOF would be inflated)."""
    split = [r for r in duplicate_sets(df, keys) if df["fold"].iloc[r].nunique() > 1]
    if split:
        named = [f"{_describe_set(df, r, False)} (folds {sorted(set(int(f) for f in df['fold'].iloc[r]))})"
                 for r in split]
        raise ValueError(f"{source}: column 'fold' puts copies of {len(split)} image(s) in different folds: "
                         f"{listing(named, len(named))}; give each set of copies one fold, remove the copies, or drop "
                         "the column to let artlearn assign the folds")


def _group_keys(df: pd.DataFrame, groups) -> list | None:
    """The per-row keys of identical images: 'content' (file digests), None (no grouping) or given keys."""
    if groups is None:
        return None
    if isinstance(groups, str):
        if groups != "content":
            raise ValueError(f"groups={groups!r}: use 'content' (identical files), None, or one key per row")
        return content_keys(df["img_path"]) if "img_path" in df.columns else None
    keys = list(groups)
    if len(keys) != len(df):
        raise ValueError(f"groups: {len(keys)} key(s) for {len(df)} row(s); give one key per row")
    return keys


def _caller_outside() -> int:
    """The `stacklevel` of the first caller outside artlearn, so that a warning points at the user's line (and
    Python's warning display echoes that line, not a line of artlearn's own source)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("artlearn."):
        frame, level = frame.f_back, level + 1
    return level


def assign_folds(df: pd.DataFrame, n_folds: int = 4, seed: int = 42, groups="content",
                 source="assign_folds") -> pd.DataFrame:
    """Copy of df with an integer 'fold' column: stratified by artist, balanced, deterministic for a seed.

    Rule for rare artists (fewer works than folds): each of their works goes to a different fold (the least filled
    ones), so such an artist is validated in only some folds, and an artist with a single work is absent from the
    training split of the fold that validates it. A warning names these artists; nothing is dropped. Labels are
    normalised (`tables.normalise_label`). Identical images (`groups='content'`: same file bytes; or one key per
    row) are kept in one fold (warned about), and refused when their artists differ. `source` names the table in
    messages.
    """
    if not isinstance(df, pd.DataFrame) or "artist" not in df.columns:
        cols = list(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ValueError(f"assign_folds needs a DataFrame with an 'artist' column (got {cols})")
    check_n_folds(n_folds, len(df))
    df = normalise_labels(df, source)
    keys = _group_keys(df, groups)
    sets = check_duplicates(df, keys, source) if keys is not None else []
    rare = rare_artists(df, n_folds)
    if rare:
        warnings.warn(f"{len(rare)} artist(s) have fewer works than n_folds={n_folds}: {listing(rare, len(rare))}; "
                      "each of their works goes to a different fold, so they are missing from some validation "
                      "splits (and single-work artists from one training split)", stacklevel=_caller_outside())
    out = df.copy()
    if sets:
        out["fold"] = stratified_group_fold_ids(df["artist"], keys, n_folds, seed, keys=df.get("img_path"))
    else:
        out["fold"] = stratified_fold_ids(df["artist"], n_folds, seed, keys=df.get("img_path"))
    return out


def fold_column(df: pd.DataFrame, fold: int, n_folds: int | None) -> tuple[np.ndarray, int]:
    """The validated fold column and the number of folds it defines."""
    try:
        folds = pd.to_numeric(df["fold"], errors="raise").to_numpy()
    except (ValueError, TypeError):
        raise ValueError("column 'fold' must hold integers 0..n_folds-1") from None
    if np.isnan(folds.astype(float)).any() or (folds != np.round(folds)).any() or folds.min() < 0:
        raise ValueError("column 'fold' must hold integers 0..n_folds-1 (found NaN, negative or fractional values)")
    folds = folds.astype(np.int64)
    n = int(folds.max()) + 1 if n_folds is None else n_folds
    if folds.max() >= n:
        raise ValueError(f"column 'fold' has fold {folds.max()} but n_folds={n}")
    return folds, n


def check_fold(fold, n_folds: int) -> None:
    """fold must be in range."""
    if not isinstance(fold, (int, np.integer)) or not 0 <= fold < n_folds:
        raise ValueError(f"fold={fold!r} is out of range: with n_folds={n_folds} use 0..{n_folds - 1}")


def StratifiedFoldSplitter(fold: int = 0, n_folds: int = 4, seed: int = 42, label_col: str = "artist",
                           fold_col: str = "fold"):
    """fastai splitter: `_inner(items) -> (train_idx, valid_idx)` for one fold of a stratified K-fold split."""
    check_fold(fold, n_folds)

    def _inner(items):
        if isinstance(items, pd.DataFrame) and fold_col in items.columns:
            folds, _ = fold_column(items.rename(columns={fold_col: "fold"}), fold, n_folds)
        else:
            labels = items[label_col] if isinstance(items, pd.DataFrame) else items
            keys = items["img_path"] if isinstance(items, pd.DataFrame) and "img_path" in items else None
            folds = stratified_fold_ids(labels, n_folds, seed, keys=keys)
        valid = np.flatnonzero(folds == fold)
        train = np.flatnonzero(folds != fold)
        return train.tolist(), valid.tolist()

    return _inner


def stratified_subset(df: pd.DataFrame, n: int, seed: int = 42, min_per_artist: int = 1) -> pd.DataFrame:
    """About n rows keeping each artist's share (at least `min_per_artist` each, when it has them), seeded."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}: need a positive number of rows")
    if n >= len(df):
        return df.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    counts = df["artist"].value_counts()
    quota = np.maximum(np.round(counts * n / len(df)).astype(int), np.minimum(counts, min_per_artist))
    keep = []
    for artist, k in quota.items():
        idx = np.flatnonzero((df["artist"] == artist).to_numpy())
        keep.extend(np.sort(rng.choice(idx, size=min(k, len(idx)), replace=False)))
    return df.iloc[np.sort(keep)].reset_index(drop=True)
