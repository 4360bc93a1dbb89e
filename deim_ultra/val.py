"""`DEIMValidator`: Ultralytics' RT-DETR validator reading COCO json datasets and reporting COCO's AP.

On top of RTDETRValidator:

- `data=` may be a COCO dataset (`deim_ultra.data.coco_layout`); its splits are read from the json;
- predictions.json (`save_json=True`, always on for COCO json data, as Ultralytics does for COCO itself) carries the
  dataset's own category ids (from the data, or from the checkpoint trained on it) and, for COCO json data, its image
  ids;
- with `save_json`, COCO's evaluation (pycocotools, `deim_ultra.coco_eval`) runs on any dataset: against the json
  itself for COCO json data (crowd regions included), against the YOLO labels otherwise. Its twelve numbers and a
  per-class table are logged beside Ultralytics' mAP, added to the returned stats as `coco/<name>` and kept as
  `metrics.coco` on what `DEIM.val()` returns.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import torch
from ultralytics.models.rtdetr.val import RTDETRValidator
from ultralytics.utils import LOGGER

from deim_ultra.coco_eval import evaluate_boxes, per_class_table
from deim_ultra.data.coco_dataset import COCORTDETRDataset, is_coco_split
from deim_ultra.data.coco_json import CocoSplit
from deim_ultra.data.coco_layout import coco_data, data_yaml
from deim_ultra.data.dataset import rtdetr_style_dataset


def model_category_ids(model: torch.nn.Module) -> list[int] | None:
    """The category ids a model was trained with (a checkpoint, or an export's metadata), if it records them."""
    sources = (model, getattr(model, "model", None), getattr(model, "metadata", None) or {})
    for source in sources:
        ids = source.get("category_ids") if isinstance(source, dict) else getattr(source, "category_ids", None)
        if isinstance(ids, str):  # exports keep metadata as text, which Ultralytics parses for its own keys only
            ids = ast.literal_eval(ids)
        if ids:
            return list(ids)
    return None


class DEIMValidator(RTDETRValidator):
    """Validates DEIM models on YOLO or COCO json data; COCO's AP with `save_json` (see the module docstring).

    Attributes:
        image_ids: for COCO json data, image file -> the json's image id (set by `init_metrics`).
    """

    image_ids: dict[str, int | str]

    def __call__(self, trainer=None, model=None, **kwargs: Any):
        """Ultralytics' validation; a COCO `data` outside training is handed to it as a temporary data YAML, since
        Ultralytics reads its dataset from a YAML path at this point (the training run passes its own data dict)."""
        coco = None if trainer is not None else coco_data(self.args.data, needed=(self.args.split or "val",))
        if coco is None:
            return super().__call__(trainer, model, **kwargs)
        source = self.args.data
        with data_yaml(coco) as file:
            self.args.data = file
            try:
                return super().__call__(trainer, model, **kwargs)
            finally:
                self.args.data = source

    def build_dataset(self, img_path: str, mode: str = "val", batch: int | None = None):
        """RTDETRValidator's dataset, reading labels from the json for a COCO split."""
        if not is_coco_split(self.data, img_path):
            return super().build_dataset(img_path, mode, batch)
        split = self.args.split or "val"
        return rtdetr_style_dataset(COCORTDETRDataset, img_path, self.args, self.data, mode, batch, split)

    @property
    def coco_split(self) -> CocoSplit | None:
        """The COCO json being validated, None for YOLO labels."""
        return getattr(self.dataloader.dataset, "coco", None)

    def init_metrics(self, model: torch.nn.Module) -> None:
        """Ultralytics' set-up; then the dataset's category ids for predictions.json, and for COCO json data the
        json itself as COCO's ground truth instead of one rebuilt from the labels."""
        super().init_metrics(model)
        ids = self.data.get("category_ids") or model_category_ids(model)
        if ids and len(ids) == self.nc:
            self.class_map = ids
            if self.build_gdict:  # Ultralytics listed its default ids as the ground truth's categories
                self.gdict["categories"] = [{"id": x} for x in self.class_map]
        if self.coco_split is not None:
            self.args.save_json |= not self.training
            self.is_custom_json = self.build_gdict = False
            self.gdict = self.eval_ids = None
            self.image_ids = self.coco_split.image_ids(self.dataloader.dataset.image_dir)

    def pred_to_json(self, predn: dict[str, torch.Tensor], pbatch: dict[str, Any]) -> None:
        """Ultralytics' COCO results of one image, with the json's image id for COCO json data (Ultralytics takes
        the file name's number)."""
        start = len(self.jdict)
        super().pred_to_json(predn, pbatch)
        if self.coco_split is not None:
            image_id = self.image_ids[pbatch["im_file"]]
            for detection in self.jdict[start:]:
                detection["image_id"] = image_id

    def eval_json(self, stats: dict[str, Any]) -> dict[str, Any]:
        """COCO's evaluation against the json for COCO json data; Ultralytics' own (labels as ground truth)
        otherwise."""
        if self.coco_split is None:
            return super().eval_json(stats)
        return self.coco_evaluate(stats, self.jdict, self.coco_split.ground_truth)

    def coco_evaluate(
        self,
        stats: dict[str, Any],
        pred_json: str | Path | list,
        anno_json: str | Path | dict,
        iou_types: str | list[str] = "bbox",
        suffix: str | list[str] = "Box",
    ) -> dict[str, Any]:
        """COCO's box evaluation through pycocotools, replacing Ultralytics' (faster-coco-eval, installed at run
        time). `pred_json` is the predictions list (Ultralytics passes the file it wrote, with the same content);
        `anno_json` the ground-truth dict. Ultralytics' own mAP keeps its keys; COCO's numbers are added."""
        if self.is_lvis:  # LVIS' federated evaluation is not COCO's
            return super().coco_evaluate(stats, pred_json, anno_json, iou_types, suffix)
        if not (self.args.save_json and self.jdict):
            return stats
        detections = pred_json if isinstance(pred_json, list) else self.jdict
        files = self.dataloader.dataset.im_files
        if self.coco_split is not None:
            image_ids = [self.image_ids[f] for f in files]
        elif isinstance(anno_json, dict):  # Ultralytics' ground truth rebuilt from YOLO labels, image ids its own
            image_ids = [image["id"] for image in anno_json["images"]]
        else:  # COCO itself in YOLO format: Ultralytics names the official json; image ids are the file names
            anno_json = json.loads(Path(anno_json).read_text())
            image_ids = [int(Path(f).stem) for f in files]
        scores = evaluate_boxes(anno_json, detections, image_ids, class_agnostic=bool(self.args.single_cls))
        box = self.metrics.box
        ultralytics_ap = {int(c): float(ap) for c, ap in zip(box.ap_class_index, box.ap)}
        LOGGER.info(f"\nCOCO evaluation (pycocotools), {len(image_ids)} images:\n{scores.summary}")
        if scores.per_class:
            LOGGER.info(per_class_table(scores, self.names, self.class_map, ultralytics_ap))
        LOGGER.info(f"COCO AP50-95 {scores.stats['AP']:.4f}, Ultralytics mAP50-95 {box.map:.4f}")
        self.metrics.coco = scores.stats
        return {**stats, **{f"coco/{k}": v for k, v in scores.stats.items()}}
