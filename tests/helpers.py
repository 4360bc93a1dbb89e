"""Helpers shared by several test modules: the installed `deim` command and the official backbone key layout."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

EASY_IMGSZ = 96  # image size of the `easy_data` set and its `trained` model (conftest.py)


def deim_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `deim` command from `cwd` (outside the repository, so package data must be installed)."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "PYTHONPATH"}
    cmd = [str(Path(sys.executable).with_name("deim")), *args]  # the console script `pip install .` created
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def run_safe_loaded(script: str) -> None:
    """Run `script` in a fresh Python with ULTRALYTICS_SAFE_LOAD=1 (weights-only unpickling with an allow-list);
    fail with its stderr if it fails."""
    env = {**os.environ, "ULTRALYTICS_SAFE_LOAD": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def official_state(stem: nn.Module, stages: list[nn.Module], prefix: str = "") -> dict[str, torch.Tensor]:
    """The modules' state under the official names: ``{prefix}stem.*`` and ``{prefix}stages.<i>.*``."""
    state = {f"{prefix}stem.{k}": v for k, v in stem.state_dict().items()}
    for i, stage in enumerate(stages):
        state.update({f"{prefix}stages.{i}.{k}": v for k, v in stage.state_dict().items()})
    return state


def official_weights(yaml: str = "deim-n.yaml", nc: int = 80, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the authors' layout (their key names) for `yaml`, as their `.pth` files hold it.

    The model's own initialisation with every parameter moved by 0.02 * N(0, 1) from `seed`, so that no two class
    rows are alike (fresh score heads all share one bias) and zero-initialised heads are live.
    """
    from deim_ultra.nn.tasks import DEIMDetectionModel
    from deim_ultra.official_names import official_namer

    torch.manual_seed(seed)
    model = DEIMDetectionModel(yaml, nc=nc, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    namer = official_namer(model)
    return {namer(k): v for k, v in model.state_dict().items()}


def hugging_face_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `safetensors` writes for a state dict with tied tensors (DEIMv2's FDR constants, the small sizes' shared
    box head): each shared tensor under the first of its names only."""
    kept, seen = {}, set()
    for key, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            kept[key] = tensor.contiguous()
    return kept


def match_queries(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """For (Q, D) rows of `ours`, the index of the closest row of `ref`; asserts the matching is a permutation."""
    index = torch.cdist(ours, ref, p=float("inf")).argmin(1)
    assert len(set(index.tolist())) == len(index), "query matching is not one to one"
    return index


def assert_same_queries(logits, boxes, ref_logits, ref_boxes, atol=1e-4):
    """Per image, every query's (logits, box) row equals the reference's closest row within `atol` (near-tied
    encoder scores may select the same queries in another order)."""
    for i in range(logits.shape[0]):
        ours, ref = torch.cat([logits[i], boxes[i]], -1), torch.cat([ref_logits[i], ref_boxes[i]], -1)
        assert (ours - ref[match_queries(ours, ref)]).abs().max() <= atol
