"""MS-DETR's one-to-many assignment (Zhao et al., CVPR 2024, "Efficient DETR Training with Mixed Supervision"), as the
authors' `Stage2Assigner` assigns: several queries per ground-truth box, each pair scored by box quality and class.

Per image, with G ground truths and Q queries:

1. quality (G, Q) = BOX_WEIGHT * IoU(query box, GT box) + CLASS_WEIGHT * sigmoid(query logit of the GT's class);
2. each query's best GT is its argmax over G; the query is positive when that quality is >= THRESHOLD, and each GT's
   single best query is positive too, whatever its quality (low-quality matches are kept, still counted for the
   query's own best GT);
3. when more than POSITIVE_FRACTION * Q queries are positive, that many are kept at random (`torch.randperm` on the
   global generator: the only randomness);
4. a GT that is the best GT of c kept positives takes its top min(c, K) queries by quality, over all queries.

A query may be taken by several GTs. Pairs come sorted by quality, lowest first, so that where one query has several
GTs the last pair is its best one (the criterion's class term keeps that one).
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from .localization import cxcywh_to_xyxy
from .matcher import Indices

THRESHOLD = 0.4
K = 6
BOX_WEIGHT = 0.7
CLASS_WEIGHT = 0.3
POSITIVE_FRACTION = 0.25


def assignment_quality(
    logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, gt_boxes: torch.Tensor
) -> torch.Tensor:
    """(G, Q) quality of every (GT, query) pair of one image (step 1).

    Args:
        logits (torch.Tensor): (Q, C) class logits.
        boxes (torch.Tensor): (Q, 4) predicted boxes, normalised cxcywh.
        labels (torch.Tensor): (G,) GT classes.
        gt_boxes (torch.Tensor): (G, 4) GT boxes, normalised cxcywh.
    """
    iou = box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt_boxes.to(boxes)))  # (Q, G)
    return (BOX_WEIGHT * iou + CLASS_WEIGHT * logits.sigmoid()[:, labels]).T


def positive_queries(quality: torch.Tensor) -> torch.Tensor:
    """(Q,) bool: queries whose best quality reaches THRESHOLD, and each GT's best query (step 2)."""
    positive = quality.max(0).values >= THRESHOLD
    positive[quality.topk(1, dim=1).indices.flatten()] = True
    return positive


@torch.no_grad()
def one_to_many_assign(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> Indices:
    """MS-DETR's one-to-many pairs of every image (see the module docstring).

    Args:
        logits (torch.Tensor): (B, Q, C) class logits.
        boxes (torch.Tensor): (B, Q, 4) predicted boxes, normalised cxcywh.
        targets (list[dict]): B dicts with `labels` (G_i,) and `boxes` (G_i, 4) normalised cxcywh.

    Returns:
        (Indices): B pairs (query_idx, gt_idx), (M_i,) each, on the predictions' device, lowest quality first.
    """
    result = []
    for logit, box, t in zip(logits, boxes, targets):
        num_queries = box.shape[0]
        if len(t["labels"]) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=box.device)
            result.append((empty, empty))
            continue
        quality = assignment_quality(logit, box, t["labels"], t["boxes"])
        best_gt = quality.argmax(0)
        positive = positive_queries(quality).nonzero().flatten()
        kept = positive[torch.randperm(len(positive), device=box.device)[: int(POSITIVE_FRACTION * num_queries)]]
        gts, counts = best_gt[kept].unique(return_counts=True)
        top_quality, top_query = quality[gts].topk(min(K, num_queries), dim=1)
        take = torch.arange(top_query.shape[1], device=box.device) < counts[:, None]  # the first c of each row
        order = top_quality[take].argsort(stable=True)
        result.append((top_query[take][order], gts[:, None].expand_as(take)[take][order]))
    return result
