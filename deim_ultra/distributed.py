"""Training in several processes: DDP on CPU (gloo) under torchrun, and decisions every process must share.

Ultralytics runs DDP on accelerators only: its trainer counts no devices on CPU, and its `_setup_train` wraps the
model with `device_ids=[device.index]`, which DistributedDataParallel refuses for a CPU model. `DEIMTrainer` therefore
starts a gloo process group itself when torchrun starts it on CPU, and wraps the model itself (see
`DEIMTrainer._setup_ddp` and `_build_train_pipeline`). Either way, a decision one process takes alone and the others
do not (skipping an optimizer step) desynchronises the job or hangs it at the next collective call; `any_process`
makes such a decision together.
"""

from __future__ import annotations

import torch
from torch import distributed as dist


def in_process_group() -> bool:
    """Whether this process is one of several training together."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_process(flag: bool, device: torch.device) -> bool:
    """`flag` of this process, or-ed with every other process's (one all-reduce); `flag` itself when alone.

    Args:
        flag: this process's decision.
        device: where the collective's tensor lives (the backend's device: CPU for gloo, the GPU for NCCL).
    """
    if not in_process_group():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
