"""Refusing checkpoints whose pickle could run code, before anything unpickles them.

An Ultralytics `.pt` checkpoint pickles whole `nn.Module` objects, so Ultralytics loads it with
`torch.load(weights_only=False)`: any callable the file names (`os.system`, `builtins.exec`, ...) would run. Before
such a load, `check_checkpoint` lists the globals the file references beyond torch's weights-only allow-list
(`torch.serialization.get_unsafe_globals_in_checkpoint`, which reads the pickle without executing it) and accepts only
`nn.Module` classes of torch, torchvision (FrozenBatchNorm2d, under `freeze_norm`), Ultralytics and deim-ultra plus
the few plain types Ultralytics stores. Official `.pth` files hold tensors only and are read with `weights_only=True`
(`deim_ultra.checkpoints.read.read_checkpoint`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn
from torch.serialization import get_unsafe_globals_in_checkpoint

MODULE_PACKAGES = ("torch", "torchvision", "ultralytics", "deim_ultra")
PLAIN_TYPES = {  # what Ultralytics' checkpoints hold besides modules and tensors (arguments, metrics)
    "ultralytics.utils.IterableSimpleNamespace",
    "types.SimpleNamespace",
    "argparse.Namespace",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that names callables which could execute code when unpickled."""


def is_trusted_global(name: str) -> bool:
    """Whether a pickled global "module.Name" is a plain type or an nn.Module class of MODULE_PACKAGES.

    Only modules of those installed packages are imported to check, so the check itself runs no code of the file.
    """
    if name in PLAIN_TYPES or name.startswith("numpy.dtypes."):
        return True
    module, _, attr = name.rpartition(".")
    if module.split(".")[0] not in MODULE_PACKAGES:
        return False
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def pickled_globals(path: str | Path) -> list[str]:
    """The globals beyond torch's weights-only allow-list that the pickle of checkpoint `path` references, read
    without running it.

    Raises:
        ValueError: When `path` is not a zip-format PyTorch checkpoint.
    """
    try:
        return get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a zip archive, no data.pkl, a corrupt pickle stream
        raise ValueError(f"'{path}' is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def untrusted_globals(path: str | Path) -> list[str]:
    """The globals of `pickled_globals(path)` that `is_trusted_global` rejects (a `.pt` may name module classes)."""
    return sorted(n for n in pickled_globals(path) if not is_trusted_global(n))


def check_checkpoint(path: str | Path) -> None:
    """Raise unless `path` is a zip-format PyTorch checkpoint whose pickle references only trusted globals.

    Raises:
        ValueError: When `path` is not a PyTorch checkpoint at all.
        UnsafeCheckpointError: Naming the untrusted globals, when it could run code on loading.
    """
    untrusted = untrusted_globals(path)
    if untrusted:
        raise UnsafeCheckpointError(
            f"'{path}' refused: loading it would call {', '.join(untrusted)}, which can run arbitrary code. A DEIM, "
            "Ultralytics or official checkpoint names only modules and tensors; use a file from a source you trust"
        )
