"""Ultralytics datasets whose labels come from a COCO json file instead of YOLO label files.

`COCOLabels` fills the hooks of Ultralytics' label scan (`YOLODataset.cache_labels`: `get_img_files`,
`get_label_files`, `get_cache_hash`, `verify_args`) from a `deim_ultra.data.coco_json.CocoSplit`, so loading, caching,
augmentation and the training-set audit are Ultralytics' and DEIM's own. Images are read where they are. The label
cache is written beside the json (`instances_train2017.json` -> `instances_train2017.cache`), keyed on the json's
bytes and the image files, so a changed json is scanned again.
"""

from __future__ import annotations

from itertools import repeat
from pathlib import Path

import numpy as np
from ultralytics.data.utils import check_file_speeds, check_image, get_hash
from ultralytics.models.rtdetr.val import RTDETRDataset

from deim_ultra.data.coco_json import CocoSplit, read_coco_json
from deim_ultra.data.dataset import DEIMDataset


def is_coco_split(data: dict, img_path: str | list) -> bool:
    """Whether `img_path` (a split of Ultralytics' data dict) is a COCO json of `deim_ultra.data.coco_layout`."""
    return isinstance(img_path, str) and img_path in data.get("coco_images", {})


def verify_coco_image(args: tuple) -> tuple | list:
    """Check one image and normalise its boxes, returning what Ultralytics' `verify_image_label` returns.

    Args:
        args: (image file, (n, 5) pixel [class, x, y, w, h] boxes, (width, height) the json gives or None, image id,
            json file, log prefix).

    Returns:
        (image file, (n, 5) float32 [class, cx, cy, w, h] normalised, (h, w), [], None, missing, found, empty,
        corrupt, message); for an image that cannot be read, the first five items are None.
    """
    im_file, boxes, json_size, image_id, json_file, prefix = args
    try:
        msg, shape = check_image(im_file)
    except Exception as e:  # missing, truncated, not an image: Ultralytics' scan catches everything here too
        msg = f"{prefix}{im_file}: ignoring corrupt image/label: image id {image_id!r} of {json_file}: {e}"
        return [None] * 5 + [0, 0, 0, 1, msg]
    if json_size and json_size != (shape[1], shape[0]):  # resized after annotation, EXIF-rotated, or a wrong entry
        msg = (
            f"{prefix}{im_file}: ignoring corrupt image/label: image id {image_id!r} of {json_file} gives "
            f"{json_size[0]}x{json_size[1]}, the file is {shape[1]}x{shape[0]}, so its boxes may not fit the pixels. "
            "Fix: the image's true width and height in the json (boxes in those pixels)"
        )
        return [None] * 5 + [0, 0, 0, 1, msg]
    msg = f"{prefix}{msg}" if msg else ""
    width, height = json_size or (shape[1], shape[0])
    label = np.zeros((len(boxes), 5), np.float32)
    if len(boxes):
        label[:, 0] = boxes[:, 0]
        size = np.array([width, height])
        label[:, 1:3] = (boxes[:, 1:3] + boxes[:, 3:5] / 2) / size  # top-left xywh -> normalised centre xywh
        label[:, 3:5] = boxes[:, 3:5] / size
        _, first = np.unique(label, axis=0, return_index=True)
        if len(first) < len(label):  # as Ultralytics' scan does for YOLO label files
            msg = f"{prefix}{im_file}: {len(label) - len(first)} duplicate labels removed"
            label = label[np.sort(first)]
    return im_file, label, shape, [], None, 0, int(len(label) > 0), int(len(label) == 0), 0, msg


class COCOLabels:
    """Mixin for Ultralytics' YOLODataset family: images and boxes from the COCO json that `img_path` names.

    The dataset's `data` dict must map that json to its image folder in `coco_images` (see
    `deim_ultra.data.coco_layout.coco_data`).

    Attributes:
        coco: the json, read.
        image_dir: the folder its `file_name`s are relative to.
    """

    coco: CocoSplit
    image_dir: Path

    def get_img_files(self, img_path: str) -> list[str]:
        """The json's usable entries' image files, sorted and cut to `fraction` as in `BaseDataset.get_img_files`,
        whose read-speed check runs too (it also draws from `random`, so a seed gives the batches of YOLO labels)."""
        self.coco = read_coco_json(img_path)
        self.image_dir = Path(self.data["coco_images"][img_path])
        files = sorted(self.coco.image_ids(self.image_dir))
        count = self.fraction if isinstance(self.fraction, int) else max(1, round(len(files) * self.fraction))
        files = files[:count]
        check_file_speeds(files, prefix=self.prefix)
        return files

    def get_label_files(self) -> list[str]:
        """One pseudo label file per image inside a folder named after the json, which places Ultralytics' label
        cache beside the json (`<json stem>.cache`); no such file is read."""
        folder = self.coco.json_file.with_suffix("")
        self.label_files = [str(folder / Path(f).name) for f in self.im_files]
        return self.label_files

    def get_cache_hash(self) -> str:
        """Keyed on the json's bytes, the image folder, the image files and the scan settings."""
        settings = (self.coco.digest, str(self.image_dir), len(self.data["names"]), self.single_cls)
        return get_hash(self.im_files + [str(settings)])

    def verify_args(self) -> tuple:
        """`verify_coco_image` and its arguments per image, for Ultralytics' threaded scan."""
        ids = self.coco.image_ids(self.image_dir)
        images = {image.id: image for image in self.coco.images}
        entries = [images[ids[f]] for f in self.im_files]
        empty = np.zeros((0, 5))
        return verify_coco_image, zip(
            self.im_files,
            [self.coco.boxes.get(image.id, empty) for image in entries],
            [(image.width, image.height) if image.width else None for image in entries],
            [image.id for image in entries],
            repeat(self.coco.json_file),
            repeat(self.prefix),
        )


class COCODEIMDataset(COCOLabels, DEIMDataset):
    """DEIM's staged training set, labels from COCO json."""


class COCORTDETRDataset(COCOLabels, RTDETRDataset):
    """Ultralytics' RT-DETR dataset (validation, and training with `recipe=none`), labels from COCO json."""
