"""Contrastive denoising queries for DETR training: Ultralytics' `get_cdn_group` layout with the official box noise."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert
from ultralytics.models.utils.ops import get_cdn_group
from ultralytics.nn.modules.utils import inverse_sigmoid


def denoising_group(
    batch: dict,
    nc: int,
    num_queries: int,
    class_embed: torch.Tensor,
    num_denoising: int,
    label_noise_ratio: float,
    box_noise_scale: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict | None]:
    """Build the denoising queries for one training batch (all None when the batch has no targets).

    Args:
        batch (dict): Targets: `cls` (N,) long class indices, `bboxes` (N, 4) normalised cx, cy, w, h, `batch_idx`
            (N,) image index, `gt_groups` list of boxes per image.
        nc (int): Number of classes (label noise draws from [0, nc)).
        num_queries (int): Regular queries that follow the denoising ones.
        class_embed (torch.Tensor): (nc + 1, C) class embedding table, the last row being padding.
        num_denoising (int): Denoising queries per batch.
        label_noise_ratio (float): Denoising label flip probability x 2.
        box_noise_scale (float): Denoising box noise scale.

    Returns:
        dn_embed (torch.Tensor | None): (B, D, C) class embeddings of the denoising queries (padding: zeros).
        dn_bbox (torch.Tensor | None): (B, D, 4) noised boxes in logit space.
        attn_mask (torch.Tensor | None): (D + Q, D + Q) bool, True = may not attend; regular queries cannot see
            denoising ones, groups cannot see each other.
        dn_meta (dict | None): `dn_pos_idx`, `dn_gt_idx`, `dn_num_group`, `dn_num_split` ([D, Q]).
    """
    # With box noise 0, get_cdn_group returns the clean padded boxes (normalised cx, cy, w, h; all-zero padding)
    # instead of noised logits. Its own noise collapses boxes whose edges crossed to zero size where the official
    # noise keeps their magnitude, so the boxes are noised here.
    dn_embed, dn_boxes, attn_mask, dn_meta = get_cdn_group(
        batch, nc, num_queries, class_embed, num_denoising, label_noise_ratio, 0.0, training=True
    )
    if dn_meta is None:
        return None, None, None, None
    num_dn = dn_meta["dn_num_split"][0]
    slots = num_dn // (2 * dn_meta["dn_num_group"])  # one image's slots in a positive or a negative block
    negative = torch.arange(num_dn, device=dn_boxes.device) // slots % 2 == 1  # groups are [positive, negative]
    return dn_embed, noised_box_logits(dn_boxes, negative, box_noise_scale), attn_mask, dn_meta


def noised_box_logits(boxes: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Official contrastive denoising box noise.

    Every edge moves by a random sign times u * scale * (half the box size along its axis), u ~ U(0, 1) for positive
    queries and U(1, 2) for negative ones; edges are clipped to the image, sizes of boxes whose edges crossed are taken
    as magnitudes, and all-zero (padding) boxes stay zero.

    Args:
        boxes (torch.Tensor): (B, D, 4) clean boxes, normalised cx, cy, w, h (zeros in padding slots).
        negative (torch.Tensor): (D,) bool, True for negative (to be rejected) queries.
        scale (float): Box noise scale.

    Returns:
        (torch.Tensor): (B, D, 4) noised boxes in logit space (inverse sigmoid with eps 1e-5).
    """
    half = boxes[..., 2:].repeat(1, 1, 2) * (0.5 * scale)
    sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
    part = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
    xyxy = (box_convert(boxes, "cxcywh", "xyxy") + sign * part * half).clip(0.0, 1.0)
    return inverse_sigmoid(box_convert(xyxy, "xyxy", "cxcywh").abs())
