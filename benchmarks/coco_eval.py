"""Ultralytics' val mAP against pycocotools' COCO mAP, on the same checkpoints and the same val images.

Our per-epoch curves come from Ultralytics' validator (confidence threshold 0.001, up to 300 detections, its own
matching and AP); the authors' (../shared/reference/) from COCO's evaluation of the boxes per image their
post-processor keeps (300, or queries x classes where fewer; COCO's maxDets 100 scores the best 100). On a trained
DEIM-N the two give the same mAP (docs/benchmarks.md); this checks the weak models of mid-run, where the curves are
compared. For each checkpoint it prints mAP50-95 / mAP50 from Ultralytics' validator, then from pycocotools (default
parameters, maxDets 100, as in the authors' faster-coco-eval) on the model's detections predicted with no confidence
threshold, and the COCO AP that the validator itself computes with `save_json=True` (`deim_ultra.val`, from the
detections it validated, confidence >= 0.001), so the three can be compared. Ultralytics stores a checkpoint's EMA in
fp16, so its val mAP can differ from the one the training run logged for that epoch in the fourth decimal.

    python benchmarks/coco_eval.py runs/x/weights/epoch*.pt --data DATA.yaml --imgsz 128
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from ultralytics.data import YOLODataset  # noqa: E402
from ultralytics.data.utils import check_det_dataset  # noqa: E402

from deim_ultra import DEIM  # noqa: E402
from deim_ultra.cfg import resolve_data_yaml  # noqa: E402


def ground_truth(data: dict) -> tuple[COCO, list[str]]:
    """The val split as a COCO index (pixel xywh boxes) and its image paths (image id = index). The labels come from
    Ultralytics' own dataset scan, so both evaluations see the same boxes (corrupt files skipped, duplicates
    dropped)."""
    labels = YOLODataset(img_path=data["val"], data=data, augment=False).labels
    images, annotations = [], []
    for i, label in enumerate(labels):
        height, width = label["shape"]
        images.append(dict(id=i, width=width, height=height, file_name=Path(label["im_file"]).name))
        for cls, (cx, cy, w, h) in zip(label["cls"].ravel().tolist(), label["bboxes"].tolist()):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append(dict(id=len(annotations) + 1, image_id=i, category_id=int(cls), bbox=box,
                                    area=box[2] * box[3], iscrowd=0))  # fmt: skip
    coco = COCO()
    coco.dataset = dict(images=images, annotations=annotations, categories=[dict(id=k) for k in data["names"]])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, [label["im_file"] for label in labels]


def coco_map(model: DEIM, coco: COCO, paths: list[str], imgsz: int, batch: int) -> tuple[float, float]:
    """COCO mAP50-95 and mAP50 of `model`'s detections on `paths` (no confidence threshold, up to 300 per image)."""
    detections = []
    for start in range(0, len(paths), batch):
        results = model.predict(paths[start : start + batch], imgsz=imgsz, conf=0.0, max_det=300, verbose=False)
        for i, result in enumerate(results, start):
            for (x0, y0, x1, y1), score, cls in zip(
                result.boxes.xyxy.tolist(), result.boxes.conf.tolist(), result.boxes.cls.tolist()
            ):
                detections.append(dict(image_id=i, category_id=int(cls), bbox=[x0, y0, x1 - x0, y1 - y0], score=score))
    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


def epoch_of(path: Path) -> str:
    """The epoch, counted from 1, of a `save_period` checkpoint (Ultralytics names epoch k's `epoch{k-1}.pt`), else
    the file name."""
    match = re.fullmatch(r"epoch(\d+)", path.stem)
    return str(int(match.group(1)) + 1) if match else path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.data = str(resolve_data_yaml(args.data))  # a shipped name such as deepforest.yaml
    data = check_det_dataset(args.data)
    coco, paths = ground_truth(data)
    weights = sorted(args.weights, key=lambda p: int(epoch_of(p)) if epoch_of(p).isdigit() else float("inf"))

    print(f"{len(paths)} val images, {len(coco.getAnnIds())} boxes")
    print("| checkpoint | Ultralytics mAP50-95 | COCO mAP50-95 | difference | Ultralytics mAP50 | COCO mAP50 | "
          "validator's COCO AP |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for path in weights:
        model = DEIM(path)
        metrics = model.val(data=args.data, imgsz=args.imgsz, batch=args.batch, device=args.device, plots=False,
                            save_json=True, verbose=False)  # fmt: skip
        ours, ours50 = metrics.box.map, metrics.box.map50
        theirs, theirs50 = coco_map(model, coco, paths, args.imgsz, args.batch)
        cells = [f"{ours:.4f}", f"{theirs:.4f}", f"{ours - theirs:+.4f}", f"{ours50:.4f}", f"{theirs50:.4f}",
                 f"{metrics.coco['AP']:.4f}"]  # fmt: skip
        print(f"| {epoch_of(path)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
