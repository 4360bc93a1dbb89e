"""Ultralytics' flat batch labels as the per-image targets the criterion and the denoising queries read."""

from __future__ import annotations

import torch


def batch_targets(batch: dict, device: torch.device) -> tuple[dict[str, torch.Tensor | list[int]], int]:
    """The labels of an Ultralytics batch, zero-area boxes dropped, grouped per image.

    Ultralytics keeps zero-area labels; as targets they would only add noise to the matching.

    Args:
        batch (dict): Ultralytics batch: `img` (B, 3, H, W), `cls` (N, 1), `bboxes` (N, 4) normalised cxcywh,
            `batch_idx` (N,) image index of each box.
        device (torch.device): Where the targets go (the images' device).

    Returns:
        (dict): `cls` (M,) long, `bboxes` (M, 4), `batch_idx` (M,) long and `gt_groups` (B boxes per image), the
            M boxes of non-zero area in batch order: the denoising queries' input.
        (int): N - M, the zero-area boxes dropped.
    """
    batch_idx = batch["batch_idx"].to(device, dtype=torch.long).view(-1)
    cls = batch["cls"].to(device, dtype=torch.long).view(-1)
    bboxes = batch["bboxes"].to(device)
    valid = (bboxes[:, 2] > 0) & (bboxes[:, 3] > 0)
    kept = {"cls": cls[valid], "bboxes": bboxes[valid], "batch_idx": batch_idx[valid]}
    kept["gt_groups"] = torch.bincount(kept["batch_idx"], minlength=batch["img"].shape[0]).tolist()
    return kept, int((~valid).sum())


def per_image(targets: dict) -> list[dict[str, torch.Tensor]]:
    """`batch_targets`' boxes as the criterion's B dicts: `labels` (n_i,) long, `boxes` (n_i, 4) cxcywh."""
    groups = targets["gt_groups"]
    return [{"labels": c, "boxes": b} for c, b in zip(targets["cls"].split(groups), targets["bboxes"].split(groups))]
