"""Reading weight files from disk with errors that name the file, shared by the converter and the backbone loader."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

from deim_ultra.checkpoint_safety import UnsafeCheckpointError


def pickled_globals(path: Path) -> list[str]:
    """Globals beyond torch's weights-only allow-list that the pickle of `path` names ([] for an unreadable file)."""
    try:
        return get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip-format checkpoint: the caller reports it as unreadable
        return []


def read_checkpoint(path: str | Path) -> dict:
    """Load a `.pth`/`.pt` file of tensors with `weights_only=True` and return its top-level dict.

    Raises:
        FileNotFoundError: When `path` does not exist.
        ValueError: Naming the file, when it is not a readable PyTorch file or does not hold a dict.
        UnsafeCheckpointError: Naming what the pickle would call, when it holds anything but tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises unpickling, zip and runtime errors alike for a bad file
        names = pickled_globals(path)
        if names:  # weights_only refused them before calling any
            raise UnsafeCheckpointError(
                f"'{path}' refused: a weights file holds tensors only, but its pickle names {', '.join(names)}, which "
                "could run code when loaded. Use a file from a source you trust"
            ) from e
        raise ValueError(f"'{path}' is not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint or state dict")
    return checkpoint


def listing(items: list[str], limit: int = 12) -> str:
    """The first `limit` items comma-separated, then how many more, to keep error messages readable."""
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
