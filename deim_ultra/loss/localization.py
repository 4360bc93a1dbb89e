"""Localization losses of D-FINE / DEIM: L1 + GIoU on boxes, FGL and DDF on the edge-distance distributions.

Boxes are normalised cxcywh unless a name says xyxy. "Corners" are the raw bin logits of the four edge distances,
laid out (..., 4 * (reg_max + 1)) as [left, top, right, bottom] blocks, as produced by the D-FINE decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from deim_ultra.nn.fdr import weighting_function


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh -> xyxy, a negative width or height taken as 0, as the authors' conversion does.

    FDR's edge distances can cross, so a predicted box may have a negative width or height. Converted as is, its area
    is negative: IoU leaves [0, 1], GIoU exceeds 1, and 1 - GIoU becomes a negative loss that rewards inverting boxes.
    As a zero-size box at its centre it is simply a miss (IoU 0), and only its centre receives a GIoU gradient.
    """
    return box_convert(torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=0.0)], dim=-1), "cxcywh", "xyxy")


def paired_iou_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalized IoU of aligned box pairs.

    Args:
        boxes1: (N, 4) xyxy boxes.
        boxes2: (N, 4) xyxy boxes, boxes2[i] paired with boxes1[i].

    Returns:
        iou: (N,) plain IoU.
        giou: (N,) generalized IoU in [-1, 1].
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou, iou - (hull - union) / hull


def paired_iou(pred_cxcywh: torch.Tensor, gt_cxcywh: torch.Tensor) -> torch.Tensor:
    """Detached IoU of aligned (N, 4) cxcywh pairs, (N,): the quality signal used as a soft target or weight."""
    return paired_iou_giou(cxcywh_to_xyxy(pred_cxcywh.detach()), cxcywh_to_xyxy(gt_cxcywh.detach()))[0]


def box_losses(pred_cxcywh: torch.Tensor, gt_cxcywh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed L1 (on cxcywh) and GIoU losses of aligned pairs.

    Args:
        pred_cxcywh: (N, 4) predicted boxes of the matched queries.
        gt_cxcywh: (N, 4) their GT boxes.

    Returns:
        l1: scalar, sum of |pred - gt| over pairs and coordinates.
        giou: scalar, sum of 1 - GIoU over pairs.
    """
    giou = paired_iou_giou(cxcywh_to_xyxy(pred_cxcywh), cxcywh_to_xyxy(gt_cxcywh))[1]
    return (pred_cxcywh - gt_cxcywh).abs().sum(), (1 - giou).sum()


def distance_bins(
    ref_cxcywh: torch.Tensor, gt_cxcywh: torch.Tensor, reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode each GT edge as a left bin index and the interpolation weight of the bin to its right.

    The distance of an edge from the reference box centre is expressed in the decoder's units
    (d = dist * reg_scale / ref_size - reg_scale / 2, the inverse of the decoder's box decoding). A value between
    bins W[i] and W[i+1] puts weight (d - W[i]) / (W[i+1] - W[i]) on bin i+1 and the rest on bin i; values beyond the
    outermost bins put all weight on the outermost bin.

    Args:
        ref_cxcywh: (N, 4) reference boxes (the decoder's initial reference points, detached).
        gt_cxcywh: (N, 4) their GT boxes.
        reg_max, up, reg_scale: bin layout of the decoder, see deim_ultra.nn.fdr.weighting_function.

    Returns:
        left: (N * 4,) long, left bin index in [0, reg_max - 1], edges ordered [left, top, right, bottom] per box.
        weight_right: (N * 4,) weight of bin left + 1 in [0, 1]; bin left gets 1 - weight_right.
    """
    scale = reg_scale.abs()
    gt = cxcywh_to_xyxy(gt_cxcywh)
    centre, size = ref_cxcywh[:, :2].repeat(1, 2), ref_cxcywh[:, 2:].repeat(1, 2)
    dist = torch.cat([centre[:, :2] - gt[:, :2], gt[:, 2:] - centre[:, 2:]], 1)
    d = (dist / (size / scale + 1e-16) - 0.5 * scale).reshape(-1)
    values = weighting_function(reg_max, up, reg_scale).to(d)
    left = (torch.searchsorted(values, d.contiguous(), right=True) - 1).clamp(0, reg_max - 1)
    weight_right = ((d - values[left]) / (values[left + 1] - values[left])).clamp(0, 1)
    return left.detach(), weight_right.detach()


def fgl_loss(corners: torch.Tensor, left: torch.Tensor, weight_right: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """Fine-grained localization loss: IoU-weighted cross-entropy towards the two bins around each GT edge.

    Args:
        corners: (N, 4 * (reg_max + 1)) bin logits of the matched queries.
        left, weight_right: (N * 4,) from distance_bins.
        iou: (N,) detached IoU of each matched prediction with its GT; well-localised matches weigh more.

    Returns:
        Scalar, un-normalised sum over matches and edges.
    """
    logp = F.log_softmax(corners.reshape(-1, corners.shape[-1] // 4), dim=-1)
    nll_left = -logp.gather(1, left[:, None]).squeeze(1)
    nll_right = -logp.gather(1, left[:, None] + 1).squeeze(1)
    per_edge = nll_left * (1 - weight_right) + nll_right * weight_right
    return (per_edge * iou.repeat_interleave(4)).sum()


def ddf_loss(
    corners: torch.Tensor,
    teacher_corners: torch.Tensor,
    weight: torch.Tensor,
    pos_mask: torch.Tensor,
    balance: tuple[float, float],
    temperature: float = 5.0,
) -> torch.Tensor:
    """Decoupled distillation focal loss from the final layer's distributions into an earlier layer's.

    Per edge KL(softmax(teacher / T) || softmax(student / T)) * T**2, weighted per query; matched and unmatched edges
    are averaged separately and mixed by `balance`, so the few matched queries are not drowned by the background.

    Args:
        corners: (B, Q, 4 * (reg_max + 1)) student bin logits.
        teacher_corners: (B, Q, 4 * (reg_max + 1)) final-layer bin logits (detached here).
        weight: (B, Q) per-query weight: IoU for matched queries, the teacher's max class probability otherwise.
        pos_mask: (B, Q) bool, True for matched queries.
        balance: (pos_scale, neg_scale) mixing weights of the matched / unmatched means.
        temperature: distillation temperature T.

    Returns:
        Scalar loss (exactly 0, still attached to the graph, when student and teacher are identical).
    """
    bins = teacher_corners.shape[-1] // 4
    student = corners.reshape(-1, bins)
    teacher = teacher_corners.reshape(-1, bins).detach()
    if torch.equal(student, teacher):
        return student.sum() * 0
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="none")
    per_edge = kl.sum(-1) * temperature**2 * weight.detach().repeat_interleave(4)
    mask = pos_mask.reshape(-1).repeat_interleave(4)
    pos = per_edge[mask].mean() if mask.any() else per_edge.new_zeros(())
    neg = per_edge[~mask].mean() if (~mask).any() else per_edge.new_zeros(())
    pos_scale, neg_scale = balance
    return (pos * pos_scale + neg * neg_scale) / (pos_scale + neg_scale)


def ddf_balance(num_pos: int, num_queries: int) -> tuple[float, float]:
    """Mixing weights (pos_scale, neg_scale) for ddf_loss: square roots of the matched / unmatched query counts.

    The square root damps the imbalance (a few matches against hundreds of background queries) without ignoring it.
    Any common factor (the official code scales counts by 4 edges and 8 / batch size) cancels in ddf_loss.

    Args:
        num_pos: matched (positive) queries in the batch.
        num_queries: all queries in the batch (B * Q).
    """
    return num_pos**0.5, (num_queries - num_pos) ** 0.5
