"""AdamW parameter groups following the authors' DEIM-N rules, decided by module type and parameter name.

The official config selects groups with regexes on parameter names, `^(?=.*backbone)(?!.*norm|bn).*$` (backbone
lr), `^(?=.*backbone)(?=.*norm|bn).*$` (backbone lr, no decay) and `^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias))
.*$` (no decay). Alternation binds loosest, so the lookaheads read `(?!.*norm)|bn` rather than "neither norm nor
bn": on the official names, whose backbone BatchNorms are called `bn`, the first regex takes every backbone
parameter and the second none. Reproduced here, the official training therefore decays all backbone parameters,
BatchNorm and LAB (`lab.scale`, `lab.bias`) included, at the backbone lr; outside the backbone, norm-layer
parameters and every bias (`bias`, `in_proj_bias`) are not decayed. The S/M/L/X configs differ slightly (S: backbone
BatchNorm at the base lr without decay, encoder/decoder biases decayed; M/L/X: encoder/decoder biases decayed);
these functions apply the N partition to every size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


def _is_bias(name: str) -> bool:
    """Whether a module's own parameter `name` is a bias (`bias`, or e.g. MultiheadAttention's `in_proj_bias`)."""
    return name == "bias" or name.endswith("_bias")


def param_groups(
    model: nn.Module, lr: float, backbone_lr: float, weight_decay: float, backbone: Iterable[nn.Module]
) -> list[dict]:
    """Split the trainable parameters of `model` into AdamW groups.

    Groups (empty ones dropped), each with explicit `lr` and `weight_decay` and a `name` for logging:
    'backbone' (every parameter inside `backbone`: `backbone_lr`, `weight_decay`), 'no_decay' (outside the backbone,
    parameters of norm layers and biases: `lr`, 0) and 'default' (the rest: `lr`, `weight_decay`). Parameters with
    `requires_grad` False are skipped, and a parameter shared by several modules is placed once, so each trainable
    parameter is in exactly one group.

    Args:
        model (nn.Module): The whole model.
        lr (float): Base learning rate.
        backbone_lr (float): Learning rate of the backbone parameters.
        weight_decay (float): Weight decay of the decaying groups.
        backbone (Iterable[nn.Module]): The backbone's modules within `model`, e.g. a DEIM model's HGStem and
            HGStage layers, or the layers of an Ultralytics RT-DETR model before the head's encoder.
    """
    in_backbone = {id(p) for m in backbone for p in m.parameters()}
    groups = {
        "backbone": {"name": "backbone", "params": [], "lr": backbone_lr, "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "lr": lr, "weight_decay": 0.0},
        "default": {"name": "default", "params": [], "lr": lr, "weight_decay": weight_decay},
    }
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in in_backbone:
                key = "backbone"
            elif isinstance(module, NORM_TYPES) or _is_bias(name):
                key = "no_decay"
            else:
                key = "default"
            groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_adamw(
    model: nn.Module,
    lr: float,
    backbone_lr: float,
    weight_decay: float,
    backbone: Iterable[nn.Module],
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, lr, backbone_lr, weight_decay, backbone)` with the authors' betas."""
    return torch.optim.AdamW(
        param_groups(model, lr, backbone_lr, weight_decay, backbone), lr=lr, betas=betas, weight_decay=weight_decay
    )
