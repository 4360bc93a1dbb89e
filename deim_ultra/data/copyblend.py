"""DEIMv2's CopyBlend on collated batches: objects drawn from the whole batch are pasted, semi-transparently, at random
places in every image and become new ground truth there.

Behaviour follows the authors' `BatchImageCollateFunction.apply_mixup` (Intellindust-AI-Lab/DEIMv2 @0fff8d4,
engine/data/dataloader.py, CopyBlend branch, about lines 197-315) in its 'blend' mode with `with_expand=True` and
`random_num_objects=False`, as their COCO configs set it. Written independently; see `batch_copyblend` for the two
places where this version differs.
"""

from __future__ import annotations

from typing import Any

import torch

# Defaults of the authors' BatchImageCollateFunction and their configs (DEIMv2 @0fff8d4: engine/data/dataloader.py
# __init__ and apply_mixup, configs/base/deimv2.yml `area_threshold: 100`, `num_objects: 3`, `with_expand: True`,
# `expand_ratios: [0.1, 0.25]`; the blend weight is drawn from U(0.45, 0.55) like mixup's).
AREA_THRESHOLD = 100.0  # smallest object area (px^2) that may be copied
NUM_OBJECTS = 3  # objects pasted into each image (fewer when the batch has fewer eligible ones)
EXPAND_RATIOS = (0.1, 0.25)  # range of the margin added around a copied object, as a fraction of its width/height
BLEND_LOW = 0.45  # smallest weight of the destination pixels
BLEND_HIGH = 0.55  # largest weight of the destination pixels

# Normalised float32 box edges that sit on a pixel boundary can land a hair below it once scaled to pixels; the snap
# keeps such an edge from losing a whole row or column to the floor.
_PIXEL_SNAP = 1e-3


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """An integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def batch_copyblend(
    batch: dict[str, Any],
    generator: torch.Generator | None,
    p: float,
    area_threshold: float = AREA_THRESHOLD,
    num_objects: int = NUM_OBJECTS,
    expand: tuple[float, float] | None = EXPAND_RATIOS,
    low: float = BLEND_LOW,
    high: float = BLEND_HIGH,
) -> dict[str, Any]:
    """With probability `p`, paste up to `num_objects` objects of the batch into every image, blended.

    The pool is every ground-truth box of the batch whose area, in pixels of the batch's images, is at least
    `area_threshold`. Each image draws k = min(num_objects, pool size) pool objects without replacement (its own
    objects included). Each one's pixel box (edges floored, clipped to the image) is placed at a uniformly drawn
    position that keeps it fully inside the image. With `expand`, the copied rectangle is grown on every side by
    int(size * a), a ~ U(*expand) drawn per object, limited on each side by the room left in both the source and the
    destination image, so the region around the object blends in too. Inside the region the destination becomes
    dst * beta + src * (1 - beta), with beta ~ U(low, high) drawn once per batch; sources are read from the input batch,
    destinations from the image being built, so overlapping pastes compound. The unexpanded pasted box is appended to
    the image's ground truth with the source's class; existing boxes are left as they are, even where covered.

    Differences from the authors' code: (1) their threshold compares each object's `area` target field, the COCO
    annotation area (the segmentation's, at the original image resolution, which their transforms never rescale);
    Ultralytics batches carry no such field, so the area here is that of the box at the batch's pixel size.
    (2) Box edges are snapped to the pixel grid within 1e-3 px before flooring (see `_PIXEL_SNAP`).
    Their per-box `mixup` weights are not produced: their criterion never reads them.

    Args:
        batch: Ultralytics collated batch; reads `img` (B, C, H, W) float or integer, `cls` (N, 1), `bboxes` (N, 4)
            normalised cxcywh, `batch_idx` (N,) image index of each box. Other keys are passed through.
        generator: source of every random draw (fire?, beta, the objects, positions, margins); torch's global
            generator when None. Draws are made on the CPU, whatever device the batch is on.
        p: probability that the batch is augmented.
        area_threshold: smallest box area in px^2 of an object that may be copied.
        num_objects: objects pasted into each image, fewer when the pool is smaller.
        expand: (low, high) range of the margin ratio, or None to copy the bare box.
        low: smallest weight beta of the destination pixels.
        high: largest weight beta.

    Returns:
        A new dict (the input and its tensors are not modified) with `img` (B, C, H, W) blended (same dtype; integer
        images are blended in float and rounded to the nearest value once, at the end), `cls` (N + M, 1), `bboxes`
        (N + M, 4) and `batch_idx` (N + M,) with the M pasted boxes after each image's own ones, and `copyblend`: the
        Python float beta used, 1.0 when nothing was pasted (then `img` and the box tensors are the input's own).
    """
    out = dict(batch)
    out["copyblend"] = 1.0
    if torch.rand((), generator=generator).item() >= p:
        return out
    beta = _uniform(generator, low, high)

    images = batch["img"]
    n_images, _, height, width = images.shape
    bboxes, cls, batch_idx = batch["bboxes"], batch["cls"], batch["batch_idx"]
    boxes = bboxes.detach().to("cpu", torch.float64)  # pixel arithmetic on the host: positions are drawn there
    areas = boxes[:, 2] * width * boxes[:, 3] * height
    pool = torch.nonzero(areas >= area_threshold).flatten().tolist()
    if not pool:
        return out

    # pixel corners of every pool object, as the integer grid the paste works on
    cx, cy, bw, bh = boxes[pool].unbind(1)
    x1s = torch.floor((cx - bw / 2) * width + _PIXEL_SNAP).clamp(0, width).long().tolist()
    y1s = torch.floor((cy - bh / 2) * height + _PIXEL_SNAP).clamp(0, height).long().tolist()
    x2s = torch.floor((cx + bw / 2) * width + _PIXEL_SNAP).clamp(0, width).long().tolist()
    y2s = torch.floor((cy + bh / 2) * height + _PIXEL_SNAP).clamp(0, height).long().tolist()
    sources = batch_idx.detach().cpu()[pool].long().tolist()

    # float working copy: successive pastes into one image read its partly built state, and integer images must be
    # rounded only once
    result = images.float() if not images.is_floating_point() else images.clone()
    k = min(num_objects, len(pool))
    new_boxes: list[list[float]] = []
    new_rows: list[int] = []  # index into the input's boxes of each pasted object's source
    new_targets: list[int] = []
    for i in range(n_images):
        for j in torch.randperm(len(pool), generator=generator)[:k].tolist():
            sx1, sy1, sx2, sy2 = x1s[j], y1s[j], x2s[j], y2s[j]
            w, h = sx2 - sx1, sy2 - sy1
            if w <= 0 or h <= 0:  # under a pixel wide once floored: nothing to copy
                continue
            dx1, dy1 = _randint(generator, 0, width - w), _randint(generator, 0, height - h)
            dx2, dy2 = dx1 + w, dy1 + h
            new_boxes.append([(dx1 + w / 2) / width, (dy1 + h / 2) / height, w / width, h / height])
            new_rows.append(pool[j])
            new_targets.append(i)
            if expand is not None:
                ratio = _uniform(generator, *expand)
                mx, my = int(w * ratio), int(h * ratio)
                # one margin per side that fits both images, so source and destination rectangles keep one shape
                left, right = min(mx, sx1, dx1), min(mx, width - sx2, width - dx2)
                top, bottom = min(my, sy1, dy1), min(my, height - sy2, height - dy2)
                sx1, sx2, dx1, dx2 = sx1 - left, sx2 + right, dx1 - left, dx2 + right
                sy1, sy2, dy1, dy2 = sy1 - top, sy2 + bottom, dy1 - top, dy2 + bottom
            patch = images[sources[j], :, sy1:sy2, sx1:sx2].to(result.dtype)
            result[i, :, dy1:dy2, dx1:dx2] = result[i, :, dy1:dy2, dx1:dx2] * beta + patch * (1 - beta)

    if not new_rows:
        return out
    out["img"] = result if images.is_floating_point() else result.round().to(images.dtype)
    rows = torch.tensor(new_rows, device=bboxes.device)
    target_idx = torch.cat([batch_idx, torch.tensor(new_targets, dtype=batch_idx.dtype, device=batch_idx.device)])
    order = torch.sort(target_idx, stable=True).indices  # stable: each image's own boxes precede its pasted ones
    out["batch_idx"] = target_idx[order]
    out["cls"] = torch.cat([cls, cls[rows.to(cls.device)]])[order.to(cls.device)]
    pasted = torch.tensor(new_boxes, dtype=bboxes.dtype, device=bboxes.device)
    out["bboxes"] = torch.cat([bboxes, pasted])[order.to(bboxes.device)]
    out["copyblend"] = beta
    return out
