"""Helpers shared by several test modules: the installed `deim` command and the official backbone key layout."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn


def deim_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `deim` command from `cwd` (outside the repository, so package data must be installed)."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "PYTHONPATH"}
    cmd = [str(Path(sys.executable).with_name("deim")), *args]  # the console script `pip install .` created
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def official_state(stem: nn.Module, stages: list[nn.Module], prefix: str = "") -> dict[str, torch.Tensor]:
    """The modules' state under the official names: ``{prefix}stem.*`` and ``{prefix}stages.<i>.*``."""
    state = {f"{prefix}stem.{k}": v for k, v in stem.state_dict().items()}
    for i, stage in enumerate(stages):
        state.update({f"{prefix}stages.{i}.{k}": v for k, v in stage.state_dict().items()})
    return state
