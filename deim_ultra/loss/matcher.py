"""Query-to-GT assignment: Hungarian one-to-one matching, the union ("GO") set over layers, the fixed denoising
assignment (one-to-many: `one_to_many.py`).

An assignment for a batch is a list with one (query_idx, gt_idx) pair of int64 tensors per image, query_idx indexing
the image's queries and gt_idx its GT boxes (same length; as in DETR's matcher).

Targets are dicts with "labels" (n_i,) long and "boxes" (n_i, 4) normalised cxcywh.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou

from .localization import cxcywh_to_xyxy

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def focal_class_cost(prob: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal-style classification cost: focal loss of predicting the GT class minus that of predicting background.

    Args:
        prob: (N, M) sigmoid probability of each prediction for each GT's class.

    Returns:
        (N, M) cost, lower for confident predictions of the GT class.
    """
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment minimising cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU), or, late in
    a DEIMv2 run (`by_quality`), the matching quality -p * IoU**iou_order alone.

    Costs are computed for all (query, GT) pairs of the whole batch in one shot, then each image's diagonal block is
    solved with scipy's linear_sum_assignment.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        iou_order: float = 4.0,
    ):
        """Store the cost coefficients, the focal alpha/gamma of the class cost and DEIMv2's IoU exponent."""
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma
        self.iou_order = iou_order

    @torch.no_grad()
    def forward(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        by_quality: bool = False,
    ) -> Indices:
        """Match queries to GTs.

        Args:
            logits: (B, Q, C) class logits.
            boxes: (B, Q, 4) predicted normalised cxcywh boxes.
            targets: B dicts with "labels" (n_i,) and "boxes" (n_i, 4).
            by_quality: cost -p * IoU**iou_order (p the GT class's probability, plain IoU) instead of the weighted
                sum: DEIMv2's matcher from its `matcher_change_epoch` on.

        Returns:
            B pairs (query_idx, gt_idx), each (min(Q, n_i),) int64 on the CPU.
        """
        bs, nq = logits.shape[:2]
        logits, boxes = logits.float(), boxes.float()  # in fp16 the focal cost's 1e-8 guard is 0 and -log(p) saturates
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)) for _ in sizes]
        gt_labels = torch.cat([t["labels"] for t in targets])
        gt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        prob = logits.flatten(0, 1).sigmoid()[:, gt_labels]
        pred = boxes.flatten(0, 1)
        if by_quality:
            cost = -prob * box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt_boxes)) ** self.iou_order
        else:
            cost = (
                self.cost_class * focal_class_cost(prob, self.alpha, self.gamma)
                + self.cost_bbox * torch.cdist(pred, gt_boxes, p=1)
                - self.cost_giou * generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt_boxes))
            )
        cost = cost.nan_to_num(nan=1.0).view(bs, nq, -1).cpu()
        matches = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(g, dtype=torch.int64)) for q, g in matches]


def union_indices(matchings: list[Indices], num_gts: list[int]) -> Indices:
    """The union ("GO") assignment over several layers' matchings.

    Every (query, GT) pair matched in any layer is kept, but a query matched to different GTs in different layers
    keeps only its most frequent GT (ties go to the lowest GT index), so each query supervises one box.

    Args:
        matchings: L assignments of the same batch (e.g. final, aux, pre and encoder layers).
        num_gts: number of GTs per image.

    Returns:
        B pairs (query_idx, gt_idx), query_idx ascending and unique per image.
    """
    result = []
    for i, n in enumerate(num_gts):
        q = torch.cat([m[i][0] for m in matchings])
        g = torch.cat([m[i][1] for m in matchings])
        if n == 0 or q.numel() == 0:
            result.append((q[:0], g[:0]))
            continue
        counts = torch.bincount(q * n + g, minlength=(int(q.max()) + 1) * n).view(-1, n)
        best_count, best_gt = counts.max(1)
        rows = best_count.nonzero().squeeze(1)
        result.append((rows, best_gt[rows]))
    return result


def denoising_indices(dn_meta: dict, num_gts: list[int]) -> Indices:
    """Fixed assignment of contrastive-denoising queries to the GTs they were built from.

    Args:
        dn_meta: Ultralytics get_cdn_group meta. "dn_pos_idx": per image (num_group * k_i,) indices of the positive
            denoising queries, group-major (group 0's k_i queries, then group 1's, ...); "dn_num_group": int;
            optional "dn_gt_idx": per image (k_i,) batch-global indices of the GTs those queries reconstruct, present
            when an image with too many boxes was subsampled (otherwise the image's GTs 0..n_i-1 in order).
        num_gts: number of GTs per image.

    Returns:
        B pairs (dn_query_idx, gt_idx) on the CPU.
    """
    groups = dn_meta["dn_num_group"]
    gt_idx = dn_meta.get("dn_gt_idx")
    offsets = [0, *torch.tensor(num_gts).cumsum(0).tolist()]
    result = []
    for i, n in enumerate(num_gts):
        local = gt_idx[i].long().cpu() - offsets[i] if gt_idx is not None else torch.arange(n)
        result.append((dn_meta["dn_pos_idx"][i].long().cpu(), local.repeat(groups)))
    return result
