"""Export settings DEIM checks or fills in before Ultralytics' exporter runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ultralytics.cfg import QUANTIZE_ALIASES
from ultralytics.utils import LOGGER

from deim_ultra.cfg import resolve_data_yaml

CALIBRATED_SCHEMES = {8, "w8a16"}  # `quantize` schemes whose activation ranges are measured on images


def calibrates(kwargs: dict[str, Any]) -> bool:
    """Whether export arguments ask for static INT8 (`quantize=8`, `'int8'`, `'w8a8'`, `'w8a16'` or the legacy
    `int8=True`), which calibrates on images."""
    scheme = kwargs.get("quantize")
    if scheme is None and kwargs.get("int8"):
        scheme = 8
    return QUANTIZE_ALIASES.get(str(scheme).lower(), scheme) in CALIBRATED_SCHEMES


def with_calibration_data(kwargs: dict[str, Any], train_args: dict[str, Any] | None) -> dict[str, Any]:
    """`kwargs` with `data` for a static INT8 export: as given (a shipped name resolved), else the dataset the
    checkpoint trained on.

    Ultralytics falls back to COCO8 (a download, and images of other classes than the model's); a model fine-tuned
    on its own data is better calibrated on that data, and without any a clear error beats a COCO8 download.

    Raises:
        ValueError: INT8 asked for, no `data` given, and the checkpoint names no training data that still exists.
    """
    if kwargs.get("data"):
        return {**kwargs, "data": str(resolve_data_yaml(kwargs["data"]))}  # shipped names, as train and val take them
    if not calibrates(kwargs):
        return kwargs
    data = (train_args or {}).get("data")
    if not data or not Path(str(resolve_data_yaml(data))).exists():
        found = f"its training data {data} is not found here" if data else "the model names no training data"
        raise ValueError(
            f"INT8 export calibrates on images, and {found}. Fix: give data=<your data.yaml>, a few hundred images "
            "like those the model will see (its val split is used)"
        )
    LOGGER.info(f"INT8 calibration on the model's training data {data} (data=... calibrates on other images)")
    return {**kwargs, "data": str(resolve_data_yaml(data))}
