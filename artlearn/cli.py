"""What the example scripts share: flags made from `Recipe`'s fields, fold and seed lists, the fold-selection rule
names, the competition-folder reader and the one-line error exit (`run_cli`, from `artlearn.checks`).

Light to import (no torch, fastai or pandas), so that a script's `--help` stays fast: the reader and the rule names
load the rest of artlearn when they are called.
"""
import argparse
import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

from . import recipe as _recipe
from .checks import check_choice, run_cli
from .recipe import Recipe, field_type

__all__ = ["RULE_ALIASES", "SYNTHETIC_DIR", "Competition", "add_recipe_flag", "add_recipe_flags", "fold_list",
           "fold_rules", "fold_selection", "given_settings", "int_list", "optional", "parse_setting",
           "read_competition", "run_cli", "setting_choices", "shown", "submission_scores", "tta_choices"]

logger = logging.getLogger("artlearn")
SYNTHETIC_DIR = Path("data") / "synthetic"  # where the scripts build the built-in dataset when --data is not given
RULE_ALIASES = {"auto": "stable"}  # extra --select names -> a rule of artlearn.kfold.FOLD_RULES


# ---------------------------------------------------------------- flags from Recipe's fields


def optional(kind):
    """An argparse type accepting 'none' (any case) for a setting that may be None, else `kind(text)`."""
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def shown(value) -> str:
    """A value as help text and folder names show it: none, on/off, or the value."""
    return "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)


def tta_choices() -> tuple:
    """The test-time view names, read from the registry (`tta.TTA_VIEWS`, as the recipe's `tta` choices) at each
    call (not frozen at import)."""
    return tuple(_recipe.TTA_VIEWS)


def setting_choices(name: str):
    """The values Recipe setting `name` allows (None when any value of its type may do), read now: a registry's
    (e.g. tta's, `tta.TTA_VIEWS`) current names."""
    choices = Recipe.__dataclass_fields__[name].metadata["choices"]
    return None if choices is None else tuple(choices)


_UNSET = object()


def add_recipe_flag(parser, name: str, default=None, help: str | None = None, shows=_UNSET):
    """`--name` (dashes for underscores) for Recipe setting `name`: its type ('none' accepted where None is allowed;
    --x / --no-x for a bool), its choices, and help ending in [default: `shows`] (`default` when not None, unless
    `shows` is given); returns the argparse action."""
    kind, nullable = field_type(name)
    text = help if help is not None else Recipe.__dataclass_fields__[name].metadata["help"]
    if shows is not _UNSET or default is not None:
        text = f"{text} [default: {shown(default if shows is _UNSET else shows)}]"
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        return parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                                   help=text)
    choices = setting_choices(name)
    metavar = "|".join(shown(c) for c in choices) if choices else kind.__name__.upper()
    return parser.add_argument(flag, dest=name, type=optional(kind) if nullable else kind, default=default,
                               choices=choices, metavar=metavar, help=text)


def add_recipe_flags(parser, defaults: Recipe, short_help: dict | None = None) -> None:
    """One flag per Recipe field (default None: the flag was not given), in one group per stage in field order,
    the help showing `defaults`' values; `short_help` replaces some settings' help text."""
    groups = {}
    for f in dataclasses.fields(Recipe):
        stage = f.metadata["stage"]
        if stage not in groups:
            groups[stage] = parser.add_argument_group(f"{stage} settings")
        add_recipe_flag(groups[stage], f.name, help=(short_help or {}).get(f.name), shows=getattr(defaults, f.name))


def given_settings(args, names=None) -> dict:
    """{setting: value} of the recipe flags given on the command line (an absent flag is None and left out)."""
    names = Recipe.names() if names is None else names
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def parse_setting(name: str, text: str):
    """The value of Recipe setting `name` written as `text` ('none' / 'null' for None where allowed; true / false,
    1 / 0, yes / no for a bool), checked against its choices; ValueError naming `name=text` otherwise."""
    if name not in Recipe.names():
        raise ValueError(f"{name}={text}: no such setting; Recipe settings: {', '.join(Recipe.names())}")
    kind, nullable = field_type(name)
    if nullable and text.lower() in ("none", "null"):
        return None
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}={text}: need true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text}: need {'an' if kind is int else 'a'} {kind.__name__}") from None
    choices = setting_choices(name)
    if choices is not None:
        check_choice(name, value, choices)
    return value


# ---------------------------------------------------------------- fold and seed lists, fold-selection rules


def _numbers(text: str):
    """'0, 2,' -> [0, 2] (empty parts skipped); None when a part is not a whole number >= 0 or none is given."""
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    return [int(t) for t in parts] if parts and all(t.isdigit() for t in parts) else None


def int_list(text: str, flag: str) -> list:
    """'42,7' -> [42, 7] in the order given; ValueError naming `flag` and `text` for anything else."""
    values = _numbers(text)
    if values is None:
        raise ValueError(f"{flag} {text!r}: need comma-separated integers >= 0 such as 42,7")
    return values


def fold_list(text, flag: str = "--folds", n_folds: int | None = None, hint: str = "") -> list | None:
    """'0,2' -> [0, 2] (sorted, once each); None, '' or 'auto' -> None (every fold); with `n_folds`, folds outside
    0..n_folds-1 (and n_folds < 2) are a ValueError; the error names `flag` and `text`, `hint` appended."""
    if n_folds is not None and n_folds < 2:
        raise ValueError(f"--n-folds {n_folds}: need at least 2 folds")
    if text is None or str(text).strip() in ("", "auto"):
        return None
    folds = _numbers(text)
    if folds is None:
        raise ValueError(f"{flag} {text!r}: need comma-separated fold numbers such as 0,2{hint}")
    if n_folds is not None and max(folds) >= n_folds:
        raise ValueError(f"{flag} {text!r}: with --n-folds {n_folds} use folds 0..{n_folds - 1}")
    return sorted(set(folds))


def fold_rules() -> tuple:
    """The fold-selection rule names of `artlearn.kfold.FOLD_RULES` (loads artlearn.kfold, torch and fastai, as
    artlearn's lazy import does: quietly)."""
    import artlearn
    return tuple(artlearn.kfold.FOLD_RULES)


def fold_selection(text: str, n_folds: int | None = None) -> tuple:
    """(rule, hand-picked folds or None) of a --select value: a rule of FOLD_RULES, an alias of RULE_ALIASES, or a
    fold list (rule 'complete'); ValueError naming the flag and value otherwise."""
    folds = _numbers(text) if text is not None else None
    rules = fold_rules() if folds is None else None  # a fold list needs no rule names (nor the import)
    if rules is not None and text in (*rules, *RULE_ALIASES):
        return RULE_ALIASES.get(text, text), None
    hint = " (or " + " / ".join(repr(r) for r in rules) + ")" if rules else ""
    return "complete", fold_list(text, "--select", n_folds, hint=hint)


# ---------------------------------------------------------------- the competition folder


class Competition(NamedTuple):
    """What `read_competition` found: tables, the test solution's path, the data's name and folder."""
    train: object  # DataFrame(img_path, artist[, id, ...])
    test: object  # DataFrame(id, img_path) or None
    solution: Path | None  # test_solution.csv (the built-in synthetic set has one), or None
    name: str  # the folder's name (run folder names), 'synthetic' for the built-in set
    root: Path  # the folder holding train.csv (or the artist sub-folders)


def read_competition(data=None, test="auto", decode: bool = False, folders: bool = True,
                     say=logger.info) -> Competition:
    """A competition folder (train.csv, test.csv, the images), a training CSV, or (`folders`) one sub-folder per
    artist; without `data` the built-in synthetic set, built once into SYNTHETIC_DIR. `test`: 'auto' (test.csv when
    there is one), True (required) or False (not read); `decode`: every test image decoded once, unreadable ones a
    ValueError. Every refusal is a ValueError naming the path."""
    import artlearn
    check_choice("test", test, ("auto", True, False))
    if data is None:
        data = artlearn.make_synthetic_artworks(SYNTHETIC_DIR)
        say(f"data: built-in synthetic artworks in {data}")
    data = Path(data)
    if not data.exists():
        raise ValueError(f"--data {data}: no such folder or file")
    csv = data / "train.csv" if data.is_dir() else data
    if csv.is_file():
        train = artlearn.read_artworks(csv, kind="train")
    elif folders:
        train = artlearn.read_artworks(data)
    else:
        raise ValueError(f"{csv} not found; pass --data with the folder holding train.csv")
    root = data if data.is_dir() else data.parent
    solution = root / "test_solution.csv"
    tests = _read_test(root, decode) if test and (root / "test.csv").is_file() else None
    if test is True and tests is None:
        raise ValueError(f"no test.csv in {root}: point --data at a competition folder (train.csv, test.csv and the "
                         "images)")
    return Competition(train, tests, solution if solution.is_file() else None, root.name, root)


def _read_test(root: Path, decode: bool):
    """test.csv of `root` with its id column required; `decode`: every image decoded once (the submission needs
    every test image)."""
    import artlearn
    test = artlearn.read_artworks(root / "test.csv", kind="test")
    if "id" not in test.columns:
        raise ValueError(f"{root / 'test.csv'}: no 'id' column (columns are {list(test.columns)}); the submission "
                         "needs id,img_path")
    if decode:
        report = artlearn.check_images(test)
        bad = report[~report["ok"]]
        if len(bad):
            raise ValueError(artlearn.tables.bad_images_message(bad, root / "test.csv") + "; fix or remove them "
                             "before training (the submission needs every test image)")
    return test


def submission_scores(submission, solution) -> dict:
    """accuracy, f1_macro and n (ids matched) of a submission.csv against a test_solution.csv (id, artist)."""
    import pandas as pd
    from sklearn.metrics import accuracy_score, f1_score
    sub, sol = (pd.read_csv(p, dtype=str, keep_default_na=False) for p in (submission, solution))
    merged = sol.merge(sub, on="id", suffixes=("_true", "_pred"))
    true, pred = merged["artist_true"], merged["artist_pred"]
    return dict(accuracy=float(accuracy_score(true, pred)),
                f1_macro=float(f1_score(true, pred, average="macro", zero_division=0)), n=len(merged))
