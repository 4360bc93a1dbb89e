"""Writing a YOLO-label dataset's annotations as COCO json, beside it (for COCO tools, and to test the COCO reader).

`yolo_to_coco("data.yaml")` writes `annotations/instances_<split>.json` into the dataset's root for each split whose
images are the folder `<root>/images/<split>`, the COCO 2017 layout that `deim_ultra.data.coco_layout` reads; the
images stay where they are, so the root is then both a YOLO and a COCO dataset (`data=<root>/data.yaml` reads the
labels, `data=<root>` the json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from ultralytics.data.utils import IMG_FORMATS, check_det_dataset, img2label_paths


def read_yolo_labels(label_file: str) -> np.ndarray:
    """(n, 5) [class, cx, cy, w, h] rows of a YOLO label file (normalised), empty if the file is missing."""
    path = Path(label_file)
    rows = path.read_text().split("\n") if path.is_file() else []
    return np.asarray([line.split() for line in rows if line.strip()], np.float64).reshape(-1, 5)


def split_to_coco(image_dir: Path, names: dict[int, str], category_ids: list[int]) -> dict:
    """The COCO dict of one folder of images with YOLO labels: image ids 1.., `file_name` relative to `image_dir`,
    class k written as category `category_ids[k]`."""
    files = sorted(f for f in image_dir.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
    images, annotations = [], []
    for image_id, (file, label_file) in enumerate(zip(files, img2label_paths([str(f) for f in files])), 1):
        with Image.open(file) as im:
            width, height = im.size
        images.append(dict(id=image_id, file_name=file.relative_to(image_dir).as_posix(), width=width, height=height))
        for cls, cx, cy, w, h in read_yolo_labels(label_file):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append(
                dict(id=len(annotations) + 1, image_id=image_id, category_id=category_ids[int(cls)], bbox=box,
                     area=box[2] * box[3], iscrowd=0)
            )  # fmt: skip
    categories = [dict(id=cid, name=names[k], supercategory="none") for k, cid in enumerate(category_ids)]
    return dict(images=images, annotations=annotations, categories=categories)


def yolo_to_coco(data_yaml: str | Path, category_ids: list[int] | None = None) -> Path:
    """Write each `<root>/images/<split>` split of `data_yaml` as `<root>/annotations/instances_<split>.json`.

    Args:
        data_yaml: an Ultralytics data YAML whose splits are image folders.
        category_ids: the category id of each class (default 1..nc, COCO's usual numbering).

    Returns:
        The dataset root, now also a COCO 2017 layout folder.
    """
    data = check_det_dataset(str(data_yaml))
    root, names = Path(data["path"]), data["names"]
    category_ids = category_ids or list(range(1, len(names) + 1))
    if len(category_ids) != len(names) or len(set(category_ids)) != len(names):
        raise ValueError(f"category_ids {category_ids}: give {len(names)} distinct ids, one per class")
    for split in ("train", "val", "test"):
        if isinstance(data.get(split), str) and Path(data[split]) == root / "images" / split:
            coco = split_to_coco(Path(data[split]), names, category_ids)
            (root / "annotations").mkdir(exist_ok=True)
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root
