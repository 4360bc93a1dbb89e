"""Classification losses for DETR queries: MAL (DEIM), VFL (D-FINE / RT-DETR) and sigmoid focal loss.

All three share one signature so the criterion can swap them by name:

    loss_fn(logits, onehot, iou, gamma, alpha) -> Tensor

    logits: (B, Q, C) raw class logits.
    onehot: (B, Q, C) 1.0 at (image, matched query, GT class), 0.0 elsewhere.
    iou:    (B, Q) IoU of each matched query with its GT (detached), 0.0 for unmatched queries.
    gamma:  focusing exponent.
    alpha:  negative-term weight (MAL: optional, None means 1; VFL/focal: required).

Each returns the un-normalised sum over images, queries and classes (a scalar); the caller divides by num_boxes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

ClassLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, "float | None"], torch.Tensor]


def mal_loss(
    logits: torch.Tensor, onehot: torch.Tensor, iou: torch.Tensor, gamma: float, alpha: float | None = None
) -> torch.Tensor:
    """Matchability-aware loss: target iou**gamma on the matched class, positives weighted 1.

    Raising the IoU target to gamma softens the target of low-quality matches, and positives are not scaled by their
    own IoU (unlike VFL), so a confident query matched with low IoU still gets a full-strength gradient to q**gamma.
    """
    target = onehot * iou.unsqueeze(-1).pow(gamma)
    neg_weight = torch.sigmoid(logits).detach().pow(gamma) * (1 - onehot)
    if alpha is not None:
        neg_weight = alpha * neg_weight
    return F.binary_cross_entropy_with_logits(logits, target, weight=neg_weight + onehot, reduction="sum")


def vfl_loss(
    logits: torch.Tensor, onehot: torch.Tensor, iou: torch.Tensor, gamma: float, alpha: float | None
) -> torch.Tensor:
    """Varifocal loss: target iou on the matched class, positives weighted by that iou, negatives alpha * p**gamma."""
    target = onehot * iou.unsqueeze(-1)
    neg_weight = alpha * torch.sigmoid(logits).detach().pow(gamma) * (1 - onehot)
    return F.binary_cross_entropy_with_logits(logits, target, weight=neg_weight + target, reduction="sum")


def focal_loss(
    logits: torch.Tensor, onehot: torch.Tensor, iou: torch.Tensor, gamma: float, alpha: float | None
) -> torch.Tensor:
    """Sigmoid focal loss on hard one-hot targets; iou is accepted for the shared signature but carries no signal."""
    return sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum")


CLASS_LOSSES: dict[str, ClassLoss] = {"mal": mal_loss, "vfl": vfl_loss, "focal": focal_loss}
