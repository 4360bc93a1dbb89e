"""AdamW parameter groups: the authors' per-size rules for DEIM models, a module-type rule for other models.

The official configs select groups with regexes on the official parameter names (`deim_hgnetv2_<size>_coco.yml`);
a parameter joins the group whose regex finds a match, and parameters no regex matches form the default group (base
lr, weight decay). `official_param_groups` applies them to a DEIM model through its official names. Two quirks are
reproduced, not corrected: in N's (and L/X's) first regex, `^(?=.*backbone)(?!.*norm|bn).*$`, alternation binds
loosest, so the lookahead reads `(?!.*norm)|bn` and the group takes every backbone parameter, BatchNorm and LAB
included (the backbone's norms are named `bn`): N's second group, meant for backbone norms, stays empty. S and M put
every norm, backbone BatchNorm included, at the base lr without decay and decay the encoder/decoder biases; L and X
decay the biases too.

Ultralytics' RT-DETR models have no official names; `param_groups` splits them by module type with N's partition:
their backbone layers at the backbone lr, norms and biases elsewhere without decay.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from deim_ultra.recipe.tables import OFFICIAL_GROUPS

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


def official_param_groups(
    model: nn.Module,
    official_name: Callable[[str], str],
    recipe: str,
    lr: float,
    backbone_lr: float,
    weight_decay: float,
) -> list[dict]:
    """Split the trainable parameters of a DEIM model into the AdamW groups of the authors' `recipe` config.

    Args:
        model (nn.Module): A DEIM model.
        official_name (Callable[[str], str]): Maps a parameter name of `model` to the authors' name for it.
        recipe (str): One of `tables.OFFICIAL_GROUPS` ('n', 's', 'm', 'l', 'x').
        lr (float): Base learning rate.
        backbone_lr (float): Learning rate of the groups the config gives the backbone lr.
        weight_decay (float): Weight decay of the decaying groups.

    Returns:
        (list[dict]): Non-empty groups in the config's order, then the default group, each with `name`, `params`, `lr`
            and `weight_decay`; every trainable parameter is in exactly one group.
    """
    rules = OFFICIAL_GROUPS[recipe]
    groups = [
        {
            "name": ("backbone_lr" if at_backbone_lr else "lr") + ("" if decays else "_no_decay"),
            "params": [],
            "lr": backbone_lr if at_backbone_lr else lr,
            "weight_decay": weight_decay if decays else 0.0,
        }
        for _, at_backbone_lr, decays in rules
    ]
    groups.append({"name": "default", "params": [], "lr": lr, "weight_decay": weight_decay})
    for name, p in model.named_parameters():  # each shared parameter once
        if p.requires_grad:
            official = official_name(name)
            index = next((i for i, (pattern, _, _) in enumerate(rules) if re.search(pattern, official)), len(rules))
            groups[index]["params"].append(p)
    return [g for g in groups if g["params"]]


def adamw_eps(groups: list[dict]) -> float:
    """AdamW's epsilon for the parameters of `groups`: the authors' 1e-8, raised for float16 parameters.

    Ultralytics' AMP keeps parameters and optimizer state in float32, where 1e-8 is safe. A model whose parameters are
    float16 keeps its Adam state in float16 too: 1e-8 rounds to 0 there, and a parameter whose second moment is 0
    (a zero or underflowed gradient) is updated by 0 / 0 = NaN. Such models get float16's smallest normal number.
    """
    dtypes = {p.dtype for g in groups for p in g["params"]}
    return max([1e-8] + [torch.finfo(d).tiny for d in dtypes if d == torch.float16])


def build_adamw(
    groups: list[dict], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over parameter `groups` (from `param_groups` or `official_param_groups`), the authors' betas by default,
    epsilon from `adamw_eps`."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=adamw_eps(groups))
