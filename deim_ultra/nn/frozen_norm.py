"""Frozen BatchNorm for the backbone, as the authors' L and X recipes train it (`freeze_norm: True`)."""

from __future__ import annotations

from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d below `module` by a FrozenBatchNorm2d holding its statistics and affine, in place.

    FrozenBatchNorm2d normalises with the running statistics in training as well and has no parameters, so
    neither the statistics nor the affine change while training; its output is the BatchNorm's output in eval mode.

    Args:
        module (nn.Module): Module whose descendants are replaced (`module` itself is left as it is).

    Returns:
        (int): Number of layers replaced.
    """
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.running_mean.device)
            frozen.load_state_dict(child.state_dict())  # FrozenBatchNorm2d drops `num_batches_tracked` itself
            setattr(module, name, frozen)
            replaced += 1
        else:
            replaced += freeze_batchnorm(child)
    return replaced
