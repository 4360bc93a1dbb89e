"""Running a step of the training loop without consuming the random numbers that the training data draws.

On CPU Ultralytics loads data in the main process (`workers=0`), so the training augmentations (flips, mosaic coins
and picks, Ultralytics' `Format` colour-order coin) draw from the same global `random`, NumPy and torch streams as
everything else the process runs. Validation draws from them too (one `Format` coin per image), so with a fixed seed
the images a run trains on would depend on whether and how often it validates: `val=False` and `val=True` would not
train alike, and neither would two runs differing only in the validation set's size.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def untouched_random_streams(device: torch.device) -> Iterator[None]:
    """Leave Python's, NumPy's and torch's global random states (CPU, and `device` if CUDA) as the block found them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
