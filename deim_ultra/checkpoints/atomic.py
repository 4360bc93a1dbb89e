"""Writing checkpoints so that a process killed while saving never leaves a truncated file behind.

Every file is written under a temporary name in its destination folder, flushed to disk, and renamed over the old
file: a rename within one filesystem is atomic, so a reader (or `resume=True` after a crash) sees either the previous
complete checkpoint or the new complete one. results.csv is cut back to the checkpoint's epochs on resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import strip_optimizer


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` for a temporary file beside `path`, then move the finished file to `path` in one rename.

    A `write` that creates no file (it declined) leaves `path` as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if not tmp.exists():
            return
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomically(obj: object, path: Path) -> None:
    """`torch.save(obj, path)`, atomically."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def publish(staging: Path, folder: Path) -> None:
    """Move every file written in `staging` into `folder` (atomically, one rename each), then remove `staging`."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in sorted(staging.iterdir()):
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(file, folder / file.name)
    staging.rmdir()


def drop_results_after(csv: Path, epoch: int) -> int:
    """Remove the rows of Ultralytics' results.csv after 1-based `epoch`, atomically; return how many went.

    A run killed after writing an epoch's row but before saving its checkpoint resumes at that epoch and would log
    it twice; a row cut short by the kill (fewer fields than the header) goes too. A file without a complete header
    line is removed, so that Ultralytics starts it anew with one.
    """
    text = csv.read_text() if csv.is_file() else ""
    header, newline, body = text.partition("\n")
    if not newline:
        csv.unlink(missing_ok=True)
        return 0
    rows = body.splitlines()
    kept = [row for row in rows if row.count(",") == header.count(",") and float(row.split(",", 1)[0]) <= epoch]
    if kept != rows or not text.endswith("\n"):
        replace_atomically(csv, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in (header, *kept))))
    return len(rows) - len(kept)


def strip_atomically(path: Path, updates: dict | None = None) -> dict:
    """Ultralytics' `strip_optimizer` of `path` (the end-of-training checkpoint), written atomically.

    Ultralytics' own log line would name the temporary file it writes, which is gone once renamed; this one names
    `path`.
    """
    result = {}
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        replace_atomically(path, lambda tmp: result.update(strip_optimizer(path, s=str(tmp), updates=updates)))
    finally:
        LOGGER.setLevel(level)
    LOGGER.info(f"Optimizer stripped from {path}, {path.stat().st_size / 1e6:.1f}MB")
    return result
