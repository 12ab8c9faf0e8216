"""Argument checks and error-message helpers shared by every stage (ValueError naming the bad value), and the one
error type the command-line scripts turn into a line on stderr and exit status 2."""
import math
import numbers
import sys

SHOW = 5  # how many offending names an error message lists
MIN_SIDE = 8  # the smallest image side anything in artlearn makes or stores (a ResNet's stride 32 needs >= 1 px left)
MAX_SIDE = 4096  # the largest: a meta.json's image size or store side, and what the 'full' store keeps at most


class ArtlearnError(ValueError):
    """A problem the user can fix that is not a bad argument as such (a full disk, a read-only folder, a path that
    is a folder): a ValueError, so every `except ValueError` (and `run_cli`) reports it as one line."""


def run_cli(main, argv=None) -> int:
    """An example script's `main(argv)`; a ValueError (ArtlearnError included) or a FileNotFoundError (a missing
    checkpoint file) becomes `error: <message>` on stderr (one line) and exit status 2, instead of a traceback."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def listing(values, total=None) -> str:
    """'a, b, c (and 7 more)' for error messages."""
    values = [str(v) for v in values]
    total = len(values) if total is None else total
    head = ", ".join(values[:SHOW])
    return head + (f" (and {total - SHOW} more)" if total > SHOW else "")


def csv_rows(index) -> str:
    """Data rows as the user sees them in a spreadsheet: row i is line i+2 of the CSV."""
    return listing([f"row {i} (line {i + 2})" for i in index])


def check_choice(name: str, value, choices) -> None:
    """ValueError naming `value` and the valid `choices` unless `value` is one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


def check_number(name: str, value, low: float = 0.0, strict: bool = False, integer: bool = False):
    """ValueError naming `value` unless it is a finite number >= low (> low when strict)."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: need a finite number {'>' if strict else '>='} {low:g} (not inf or NaN)")
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name}={value!r}: need {'an integer' if integer else 'a number'} "
                         f"{'>' if strict else '>='} {low:g}")
    return value


def check_side(name: str, value) -> int:
    """`value` as an int image side of at least MIN_SIDE pixels, else ValueError naming it."""
    check_number(name, value, low=MIN_SIDE, integer=True)
    return int(value)


def check_fraction(name: str, value, low_inclusive: bool = True) -> float:
    """`value` as a float in [0, 1) (or (0, 1)), else ValueError naming it."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and (value >= 0 if low_inclusive else value > 0) and value < 1)
    if not ok:
        bounds = "[0, 1)" if low_inclusive else "(0, 1)"
        raise ValueError(f"{name}={value!r}: need a number in {bounds}")
    return float(value)
