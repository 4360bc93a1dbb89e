"""Configuration shipped with deim-ultra: model YAMLs, dataset YAMLs and the DEIM default settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ultralytics.utils import DEFAULT_CFG_DICT, YAML
from ultralytics.utils.checks import check_yaml

CFG_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "deim-n.yaml"  # what `DEIM()`, `deim train` and the converter build when given no model
DEIM_DEFAULTS: dict = YAML.load(CFG_DIR / "default.yaml")
DEIM_CFG_DICT: dict = {**DEFAULT_CFG_DICT, **DEIM_DEFAULTS}
# The DEIM settings each mode reads (val, predict and track read none): `sampler` shapes exported graphs only.
MODE_SETTINGS: dict[str, frozenset] = {
    "train": frozenset(DEIM_DEFAULTS) - {"sampler"},
    "export": frozenset({"sampler"}),
    "val": frozenset(),
    "predict": frozenset(),
    "track": frozenset(),
}


def _resolve(name: str | Path, folder: Path, kind: str) -> Path:
    """Return `name` as given if it exists, else the file of that name shipped in `folder` (never the settings)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = folder / path.name
    settings = CFG_DIR / "default.yaml"
    if path.name == str(name) and shipped.is_file() and shipped != settings:  # bare names only: no mistyped path
        return shipped
    known = ", ".join(sorted(p.name for p in folder.glob("*.yaml") if p != settings))
    raise FileNotFoundError(f"{kind} '{name}' not found, neither as a path nor among the shipped ones: {known}")


def resolve_model_yaml(name: str | Path) -> Path:
    """Path of a model YAML: a file on disk, a shipped name such as 'deim-s.yaml', or an Ultralytics RT-DETR one."""
    if not Path(name).is_file() and not (CFG_DIR / str(name)).is_file() and "rtdetr" in Path(name).stem:
        return Path(check_yaml(name))  # Ultralytics' own rtdetr-*.yaml, for training them with the DEIM recipe
    return _resolve(name, CFG_DIR, "Model YAML")


def resolve_data_yaml(name: str | Path) -> str | Path:
    """Path of a dataset YAML: a shipped name such as 'deepforest.yaml' if no such file exists locally.

    Anything else (a local file, a directory, an Ultralytics dataset name) is returned unchanged for Ultralytics to
    resolve and to report on.
    """
    path = Path(str(name))
    shipped = CFG_DIR / "datasets" / path.name
    if path.suffix in {".yaml", ".yml"} and path.name == str(name) and not path.exists() and shipped.is_file():
        return shipped
    return name


def ultralytics_args(args: SimpleNamespace | dict) -> dict:
    """The subset of `args` that Ultralytics' own validator and predictor accept (no DEIM-only keys)."""
    items = vars(args) if isinstance(args, SimpleNamespace) else dict(args)
    return {k: v for k, v in items.items() if k not in DEIM_DEFAULTS}


# The types of DEIM's settings that Ultralytics' own check (`check_cfg`) does not know; None means "default".
_NUMBER = (int, float)
_NUMBER_KEYS = ("mal_gamma", "loss_mal", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf", "backbone_lr")
SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "o2m": (bool,),
    "union_set": (bool,),
    "matcher_change_epoch": (int,),
    "freeze_norm": (bool,),
    "warmup_iters": (int,),
    "base_size_repeat": (int,),
    "nonfinite_patience": (int,),
    **dict.fromkeys((*_NUMBER_KEYS, "ema_decay", "ema_tau", "clip_max_norm", "copyblend"), _NUMBER),
}


def check_setting_types(overrides: dict) -> None:
    """Raise TypeError for a DEIM setting of the wrong type, as Ultralytics does for its own: `o2m=no` reaches us as
    the string 'no', which would otherwise count as true."""
    for key, types in SETTING_TYPES.items():
        value = overrides.get(key)
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            expected = " or ".join("True / False" if t is bool else t.__name__ for t in types)
            raise TypeError(f"'{key}={value}' is of invalid type {type(value).__name__}: '{key}' takes {expected}")


def deim_arg(args: SimpleNamespace | dict | None, key: str):
    """Value of DEIM setting `key` in `args` (namespace or dict), falling back to the shipped default."""
    items = vars(args) if isinstance(args, SimpleNamespace) else (args or {})
    return items.get(key, DEIM_DEFAULTS[key])
