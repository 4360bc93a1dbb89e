"""DEIM's layers on torch's allow-list for `weights_only` loading.

Ultralytics' restricted checkpoint loading (`ULTRALYTICS_SAFE_LOAD=1`) unpickles with `torch.load(weights_only=True)`
and allows only torch's and Ultralytics' own classes, so it refused every DEIM checkpoint. Registering DEIM's layer
classes (and torchvision's FrozenBatchNorm2d, used by `freeze_norm`) with torch's `add_safe_globals` lets it load them,
while anything else a checkpoint names is still refused. The registration is process-wide, as Ultralytics' own is, and
happens when `deim_ultra` is imported.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from deim_ultra.nn import (
    activations,
    decoder,
    decoder_layers,
    deformable_attention,
    deimv2_decoder,
    encoder,
    encoder_blocks,
    fdr,
    hgnetv2,
    lite_encoder,
    spatial_adapter,
    tasks,
    vit,
)

LAYER_MODULES = (
    activations, decoder, decoder_layers, deformable_attention, deimv2_decoder, encoder, encoder_blocks, fdr, hgnetv2,
    lite_encoder, spatial_adapter, tasks, vit,
)  # fmt: skip


def layer_classes() -> list[type[nn.Module]]:
    """Every nn.Module class defined in DEIM's layer modules."""
    return [
        obj
        for module in LAYER_MODULES
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
    ]


def allow_weights_only_loading() -> None:
    """Put DEIM's layer classes and FrozenBatchNorm2d on torch's `weights_only` allow-list."""
    torch.serialization.add_safe_globals([*layer_classes(), FrozenBatchNorm2d])
