"""COCO's box evaluation (pycocotools) of detections against a COCO ground truth, with the per-class AP table.

Default COCO parameters: IoU 0.50:0.95, areas small / medium / large, at most 100 detections per image (what the
DEIM / D-FINE authors report through faster-coco-eval). Crowd boxes (`iscrowd=1`) of the ground truth are COCO's
crowd regions: a detection on one is neither a true nor a false positive.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats, in order: AP over IoU 0.50:0.95, at 0.50 and 0.75, per area, then AR at 1 / 10 / 100 detections
# and per area.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class CocoScores:
    """COCO's evaluation of one set of detections.

    Attributes:
        stats: STAT_NAMES -> value (-1 where the ground truth has no box of that kind, as COCO prints it).
        per_class: category id -> (AP50-95, AP50), NaN for a category without ground-truth boxes.
        summary: COCO's twelve printed lines.
    """

    stats: dict[str, float]
    per_class: dict[int, tuple[float, float]]
    summary: str


def ground_truth_index(ground_truth: dict) -> COCO:
    """A pycocotools index of a COCO dict (images, annotations, categories), without its console output."""
    index = COCO()
    index.dataset = copy.deepcopy(ground_truth)
    with contextlib.redirect_stdout(io.StringIO()):
        index.createIndex()
    return index


def mean_set(precision: np.ndarray) -> float:
    """Mean of COCOeval precisions, skipping its -1 (no ground truth); NaN if none is set."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")


def class_ap(precision: np.ndarray) -> tuple[float, float]:
    """AP50-95 and AP50 of one category from COCOeval's precision[T, R] (all areas, 100 detections)."""
    return mean_set(precision), mean_set(precision[0])


def evaluate_boxes(
    ground_truth: dict, detections: list[dict], image_ids: list, class_agnostic: bool = False
) -> CocoScores:
    """COCO box evaluation of `detections` on the images `image_ids` of `ground_truth`.

    Args:
        ground_truth: COCO dict; annotations need `bbox`, `area`, `iscrowd`, `category_id`, `image_id`, `id`.
        detections: COCO results, dicts with `image_id`, `category_id`, `bbox` (pixel x, y, w, h) and `score`.
        image_ids: the images evaluated (those the detections were computed on).
        class_agnostic: ignore categories (COCO's `useCats=0`), for a model trained with `single_cls`.

    Returns:
        The twelve COCO numbers, AP per category and COCO's printed summary; all zero without any detection.
    """
    gt = ground_truth_index(ground_truth)
    categories = gt.getCatIds()
    if not detections:
        zeros = dict.fromkeys(STAT_NAMES, 0.0)
        return CocoScores(zeros, dict.fromkeys(categories, (0.0, 0.0)), "no detections: every COCO AP and AR is 0")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.params.useCats = int(not class_agnostic)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    summary = "\n".join(line for line in printed.getvalue().splitlines() if line.lstrip().startswith("Average"))
    precision = evaluation.eval["precision"]  # [IoU thresholds T, recall R, categories K, areas A, max dets M]
    per_class = {}
    if not class_agnostic:
        per_class = {cid: class_ap(precision[:, :, k, 0, -1]) for k, cid in enumerate(evaluation.params.catIds)}
    return CocoScores(dict(zip(STAT_NAMES, map(float, evaluation.stats))), per_class, summary)


def per_class_table(scores: CocoScores, names: dict[int, str], category_ids: list[int], ultralytics_ap: dict) -> str:
    """Rows of class name, category id, COCO AP50-95 and AP50 and Ultralytics' mAP50-95, one per class.

    Args:
        scores: COCO's evaluation.
        names: class index -> name.
        category_ids: class index -> category id.
        ultralytics_ap: class index -> Ultralytics' mAP50-95 of that class (classes without boxes absent).
    """
    rows = [f"{'class':>22} {'category id':>12} {'COCO AP':>9} {'AP50':>9} {'Ultralytics mAP50-95':>21}"]
    for k, cid in enumerate(category_ids):
        ap, ap50 = scores.per_class.get(cid, (float("nan"), float("nan")))
        ours = ultralytics_ap.get(k, float("nan"))
        rows.append(f"{names[k]:>22} {cid!s:>12} {ap:>9.4f} {ap50:>9.4f} {ours:>21.4f}")
    return "\n".join(rows)
