"""Augmentation of collated batches: DEIM's batch mixup ("Dense O2O", each image blended with its neighbour, both box
sets kept) and the multi-scale resize (one size per batch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MIXUP_LOW = 0.45
MIXUP_HIGH = 0.55


def batch_mixup(
    batch: dict[str, Any],
    generator: torch.Generator | None,
    p: float,
    low: float = MIXUP_LOW,
    high: float = MIXUP_HIGH,
) -> dict[str, Any]:
    """With probability `p`, blend every image with the previous one in the batch (the batch rolled by one).

    With w ~ U(low, high), image i becomes w * img[i] + (1 - w) * img[i - 1] (image 0 takes the last one), and
    receives, after its own boxes, the boxes and classes of image i - 1. Ground truth stays grouped by image, own boxes
    first: Ultralytics' RT-DETR-style losses split targets by per-image counts in batch order.
    A batch of one image is never mixed (it would be blended with itself and get every box twice).

    Args:
        batch: Ultralytics collated batch; reads `img` (B, C, H, W) float or integer, `cls` (N, 1), `bboxes` (N, 4)
            normalised cxcywh, `batch_idx` (N,) image index of each box. Other keys are passed through.
        generator: source of the two random draws (fire?, w); torch's global generator when None.
        p: probability that the batch is mixed.
        low: smallest weight w of an image's own pixels.
        high: largest weight w.

    Returns:
        A new dict (the input and its tensors are not modified) with `img` blended (same dtype; integer images are
        rounded to the nearest value), `cls`, `bboxes` and `batch_idx` of N + N boxes when mixed, and `mixup`: the
        Python float w used, 1.0 when the batch was not mixed (then `img` and the box tensors are the input's own).
    """
    out = dict(batch)
    images = batch["img"]
    n = images.shape[0]
    if n < 2 or torch.rand((), generator=generator).item() >= p:
        out["mixup"] = 1.0
        return out
    w = low + (high - low) * torch.rand((), generator=generator).item()
    if images.is_floating_point():
        out["img"] = images * w + images.roll(1, dims=0) * (1 - w)
    else:  # blend in float, then back to the input's dtype so downstream scaling (/255) still applies
        mixed = images.float() * w + images.roll(1, dims=0).float() * (1 - w)
        out["img"] = mixed.round().to(images.dtype)
    batch_idx = batch["batch_idx"]
    target_idx = torch.cat([batch_idx, (batch_idx + 1) % n])  # the rolled copy of image j lands in image j + 1
    order = torch.sort(target_idx, stable=True).indices  # stable: own boxes (first half) precede the neighbour's
    out["batch_idx"] = target_idx[order]
    out["cls"] = torch.cat([batch["cls"], batch["cls"]])[order]
    out["bboxes"] = torch.cat([batch["bboxes"], batch["bboxes"]])[order]
    out["mixup"] = w
    return out


def resize_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """`batch` with its images (B, C, H, W) resized to (size, size), nearest as the authors' collate does
    (`F.interpolate`'s default); boxes are normalised, so they stay. Unchanged when the images have that size."""
    if size != batch["img"].shape[-1]:
        batch["img"] = nn.functional.interpolate(batch["img"], size=(size, size), mode="nearest")
    return batch
