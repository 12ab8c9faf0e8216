"""A run's config.json: its format and version, reading it, what a key absent from an older run means, and the run's
identity (which every fold's meta.json records). Below `run` and `checkpoint`, which both read it."""
import hashlib
import json
from pathlib import Path

from .files import read_json
from .recipe import IDENTITY_SETTINGS, absent_means

CONFIG_NAME, FOLDS_NAME = "config.json", "folds.csv"  # the run directory files a fold folder checks itself against
RUN_FORMAT, RUN_FORMAT_VERSION = "artlearn-run", 3
# what each config.json key absent from an older run means: every recipe setting's field metadata, and budget
ABSENT_MEANS = {**absent_means(), "budget": None}
# config.json values whose spelling changed, old -> now (tta was a train_kfold argument, None for no TTA)
OLD_SPELLINGS = {"tta": {None: "none"}}
# settings of a run that may differ between a run and its resume
RUNTIME_KEYS = ("folds", "library_version", "format", "format_version", "budget")  # budget: how long, not what


def run_format_version(config: dict) -> int | None:
    """The format version of a config.json (1 for runs written before versions), None when not artlearn's."""
    if config.get("format") == RUN_FORMAT:
        version = config.get("format_version", 0)
        return version if isinstance(version, int) and not isinstance(version, bool) else 0
    return 1 if "library_version" in config and "format" not in config else None


def read_config(path) -> dict:
    """config.json of a run directory, refused when it is not artlearn's or of a newer format."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{path}: not an artlearn run directory (no {CONFIG_NAME}); train one with train_kfold")
    config = read_json(path / CONFIG_NAME, fix="restore it, or use another --out folder")
    version = run_format_version(config) if isinstance(config, dict) else None
    if version is None:
        raise ValueError(f"{path / CONFIG_NAME} is not an artlearn run config (no 'format': '{RUN_FORMAT}'); "
                         "use another --out folder")
    if version > RUN_FORMAT_VERSION:
        raise ValueError(f"{path} has run format version {version}, newer than this artlearn reads "
                         f"({RUN_FORMAT_VERSION}); upgrade artlearn")
    return config


def config_as_now(config: dict) -> dict:
    """A run's config in today's terms: settings added since it was written get what their absence meant
    (ABSENT_MEANS), values spelled the old way get today's spelling (OLD_SPELLINGS)."""
    config = {**ABSENT_MEANS, **config}
    return {k: OLD_SPELLINGS.get(k, {}).get(v, v) if isinstance(v, (str, type(None))) else v
            for k, v in config.items()}


def run_identity(config: dict) -> str:
    """A run's identity, which every fold's meta.json records as run_id: a sha256 (32 hex digits) of its config in
    today's terms, without the runtime keys and without settings that hold what their absence means (so a library
    that adds a setting, or a config with an old spelling, keeps the identity; any other change does not)."""
    settings = {k: v for k, v in config_as_now(config).items() if k not in RUNTIME_KEYS
                and not (k in ABSENT_MEANS and k not in IDENTITY_SETTINGS and v == ABSENT_MEANS[k])}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]
