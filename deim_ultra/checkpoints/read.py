"""Reading weight files from disk with errors that name the file (shared by the converter and the backbone loader),
and the checks that a loaded checkpoint suits what the trainer is asked to do with it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from ultralytics.nn.tasks import RTDETRDetectionModel

from deim_ultra.checkpoints.safety import (
    PLAIN_TYPES,
    UnsafeCheckpointError,
    check_checkpoint,
    is_trusted_global,
    pickled_globals,
)


def refused_globals(path: Path) -> list[str]:
    """What a weights-only load of `path` refuses: every global its pickle names beyond torch's allow-list, since a
    weights file holds tensors only ([] for a file that is not a checkpoint; the caller reports it as unreadable)."""
    try:
        return pickled_globals(path)
    except ValueError:
        return []


def read_checkpoint(path: str | Path) -> dict:
    """Load a `.pth`/`.pt` file of tensors with `weights_only=True` and return its top-level dict.

    Raises:
        FileNotFoundError: When `path` does not exist.
        ValueError: Naming the file, when it is not a readable PyTorch file, does not hold a dict, or is an
            Ultralytics checkpoint (pickled modules) rather than weights.
        UnsafeCheckpointError: Naming what the pickle would call, when it holds anything but tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises unpickling, zip and runtime errors alike for a bad file
        names = refused_globals(path)
        modules = [n for n in names if is_trusted_global(n) and n not in PLAIN_TYPES and not n.startswith("numpy.")]
        if modules and all(is_trusted_global(n) for n in names):  # whole modules: an Ultralytics training checkpoint
            raise ValueError(
                f"'{path}' is an Ultralytics / deim-ultra checkpoint (it pickles modules such as {modules[0]}), not a "
                f"weights file: load it with DEIM('{path}')"
            ) from e
        if names:  # weights_only refused them before calling any
            raise UnsafeCheckpointError(
                f"'{path}' refused: a weights file holds tensors only, but its pickle names {', '.join(names)}, which "
                "could run code when loaded. Use a file from a source you trust"
            ) from e
        raise ValueError(f"'{path}' is not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint or state dict")
    return checkpoint


def checkpoint_model_yaml(path: str | Path) -> dict:
    """The model YAML dict an Ultralytics / DEIM checkpoint was built from ({} when it holds no model), read only
    after `check_checkpoint` has refused a pickle that could run code."""
    check_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, dict) else None
    return dict(getattr(model, "yaml", None) or {})


def check_pretrained_model(weights: nn.Module | dict, pretrained: object) -> None:
    """Refuse weights whose model is not a DEIM or RT-DETR one: Ultralytics would transfer none of their layers and
    train from random weights after logging "Transferred 0/N items"."""
    source = weights["model"] if isinstance(weights, dict) else weights
    if not isinstance(source, RTDETRDetectionModel):
        raise TypeError(
            f"pretrained={pretrained} holds a {type(source).__name__}, not a DEIM or RT-DETR model, so none of its "
            "layers fit. Fix: a DEIM checkpoint, the backbone's ImageNet .pth, pretrained=True or pretrained=False"
        )


def check_resumable(ckpt: dict, path: str | Path) -> None:
    """Raise unless checkpoint `ckpt` (read from `path`) still holds its optimizer state, i.e. its run can go on."""
    if ckpt.get("optimizer") is None:
        raise ValueError(
            f"'{path}' holds no optimizer state (a finished run's checkpoint, or a converted model): nothing to "
            f"resume. Fix: start a new run, DEIM('{path}').train(data=...), or resume an unfinished run's last.pt"
        )
