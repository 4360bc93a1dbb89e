"""Reading one COCO json split: categories to contiguous classes, boxes per image, and the entries that cannot be used.

Category ids of any form (1-based, sparse, COCO's 91-id scheme, large integers) become class indices 0..nc-1 in the
order of `categories`, named by `categories`. Every entry that cannot be used is reported once, by kind, naming the
entries (see `SKIPPED`), and the rest is read:

- a category whose name is numeric, missing or a repeat of an earlier one keeps its class, with its name made usable;
- an image without `file_name`, or repeating an earlier image id or file name, is skipped;
- an annotation whose image or category is not listed, or whose `bbox` is missing, malformed, of zero or negative size
  or entirely outside the image, is skipped; a box crossing the image border is clipped to it;
- `iscrowd=1` boxes are no training targets but stay in the evaluation ground truth, where COCO's evaluation treats
  them as crowd regions; segmentation is not read (boxes only); images without annotations are backgrounds.

Problems that leave no sensible reading (not a json object, no `images` or `categories` list, a category id that is
not an integer or is listed twice) raise `DatasetError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from ultralytics.utils import LOGGER

from deim_ultra.data.audit import DatasetError
from deim_ultra.messages import listing

SKIPPED = {  # kind: what the log line says about the entries of that kind
    "numeric_name": "categories with a numeric name (kept as the class name; it is not the class index)",
    "missing_name": "categories without a name (named category_<id>)",
    "placeholder": "categories that are Roboflow's dataset-name placeholder (no box, the supercategory of every other "
    "category), not made a class",
    "duplicate_name": "categories repeating an earlier name (renamed <name>_<id>)",
    "no_file_name": "images without file_name, skipped",
    "bad_image_id": "images whose id is neither an integer nor a string, skipped",
    "duplicate_image": "images repeating an earlier image id, skipped (their annotations go to the first)",
    "duplicate_file": "images repeating an earlier file_name, skipped",
    "unknown_image": "annotations of an image id not in images, skipped",
    "unknown_category": "annotations of a category id not in categories, skipped",
    "bad_bbox": "annotations whose bbox is missing, not 4 numbers, or of negative size, skipped",
    "empty_bbox": "annotations whose bbox has zero width or height, or lies outside the image, skipped",
    "clipped": "boxes crossing the image border, clipped to it",
}


@dataclass(frozen=True)
class CocoImage:
    """One image entry: its json id, `file_name` (relative to the split's image folder) and the size the json gives,
    if any."""

    id: int | str
    file_name: str
    width: int | None
    height: int | None


@dataclass
class CocoSplit:
    """One COCO json file, read.

    Attributes:
        json_file: the annotation file.
        digest: SHA-256 of the file's bytes (label caches are keyed on it).
        category_ids: class index -> the dataset's category id, (nc,).
        names: class index -> class name.
        images: usable image entries, in the file's order.
        boxes: image id -> (n, 5) float64 array of [class, x, y, w, h], pixel top-left xywh, non-crowd boxes only.
        ground_truth: the usable entries as a COCO dict (images, annotations with crowd boxes and area, categories)
            for COCO evaluation.
        problems: kind (a key of SKIPPED) -> the entries of that kind, as text.
    """

    json_file: Path
    digest: str
    category_ids: list[int]
    names: dict[int, str]
    images: list[CocoImage]
    boxes: dict[int | str, np.ndarray]
    ground_truth: dict
    problems: dict[str, list[str]] = field(default_factory=dict)

    def image_ids(self, image_dir: Path | str) -> dict[str, int | str]:
        """Image file (in `image_dir`) -> json image id."""
        return {str(Path(image_dir) / image.file_name): image.id for image in self.images}


def is_integer(value: object) -> bool:
    """An int that is not a bool (json `true` would pass isinstance(int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_numeric_name(name: str) -> bool:
    """A name that reads as a number, e.g. '3' or '2.5', easy to mistake for a class index."""
    try:
        float(name)
    except ValueError:
        return False
    return True


def load_json(json_file: Path) -> tuple[dict, str]:
    """The parsed file and the SHA-256 of its bytes; a file that is not a json object raises `DatasetError`."""
    raw = json_file.read_bytes()
    try:
        content = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_file} is not valid json ({e}). Fix: export the annotations again") from e
    if not isinstance(content, dict):
        raise DatasetError(f"{json_file} holds a json {type(content).__name__}, not a COCO object with 'images'")
    return content, hashlib.sha256(raw).hexdigest()


def roboflow_placeholder(categories: list, annotations: list) -> dict | None:
    """The category Roboflow's COCO export adds for the dataset itself: no annotation uses it and every other category
    names it as its supercategory."""
    used = {a.get("category_id") for a in annotations if isinstance(a, dict)}
    named = [c for c in categories if isinstance(c, dict)]
    for category in named:
        others = [c for c in named if c is not category]
        if (
            others
            and category.get("id") not in used
            and all(c.get("supercategory") == category.get("name") for c in others)
        ):
            return category
    return None


def read_categories(content: dict, json_file: Path, problems: dict) -> tuple[list[int], dict[int, str]]:
    """Category ids in `categories` order and the class names, made unique and non-empty."""
    categories = content.get("categories")
    if not isinstance(categories, list) or not categories:
        raise DatasetError(f"{json_file} has no 'categories' list: COCO json names its classes there")
    placeholder = roboflow_placeholder(categories, content.get("annotations") or [])
    if placeholder is not None:
        problems["placeholder"].append(f"id {placeholder.get('id')} '{placeholder.get('name')}'")
        categories = [c for c in categories if c is not placeholder]
    ids, names, seen = [], {}, set()
    for i, category in enumerate(categories):
        cid = category.get("id") if isinstance(category, dict) else None
        if not is_integer(cid):
            raise DatasetError(
                f"{json_file}: categories[{i}] has id {cid!r}; category ids must be integers. Fix: integer ids in "
                "'categories' and the same integers as each annotation's category_id"
            )
        if cid in ids:
            raise DatasetError(f"{json_file}: category id {cid} is listed twice in 'categories'")
        name = category.get("name")
        name = str(name).strip() if name is not None else ""
        if not name:
            problems["missing_name"].append(f"id {cid}")
            name = f"category_{cid}"
        elif is_numeric_name(name):
            problems["numeric_name"].append(f"id {cid} '{name}'")
        if name in seen:
            problems["duplicate_name"].append(f"id {cid} '{name}'")
            name = f"{name}_{cid}"
        seen.add(name)
        names[len(ids)] = name
        ids.append(cid)
    return ids, names


def read_images(content: dict, json_file: Path, problems: dict) -> dict[int | str, CocoImage]:
    """Usable image entries by id, in the file's order."""
    entries = content.get("images")
    if not isinstance(entries, list):
        raise DatasetError(f"{json_file} has no 'images' list")
    images, files = {}, set()
    for i, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {}
        iid, file_name = entry.get("id"), entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            problems["no_file_name"].append(f"images[{i}] (id {iid!r})")
            continue
        if not isinstance(iid, (int, str)) or isinstance(iid, bool):
            problems["bad_image_id"].append(f"images[{i}] (id {iid!r}) '{file_name}'")
            continue
        if iid in images:
            problems["duplicate_image"].append(f"id {iid!r} '{file_name}'")
            continue
        if file_name in files:
            problems["duplicate_file"].append(f"id {iid!r} '{file_name}'")
            continue
        files.add(file_name)
        width, height = entry.get("width"), entry.get("height")
        size_given = is_integer(width) and is_integer(height) and width > 0 and height > 0
        images[iid] = CocoImage(iid, file_name, width if size_given else None, height if size_given else None)
    return images


def read_box(annotation: dict, image: CocoImage) -> tuple[list[float] | None, str]:
    """The annotation's pixel xywh box clipped to the image, and "" or the SKIPPED kind that explains a change."""
    box = annotation.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None, "bad_bbox"
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, "bad_bbox"
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        return None, "bad_bbox"
    x0, y0, x1, y1 = x, y, x + w, y + h
    if image.width is not None:
        x0, x1 = min(max(x0, 0.0), image.width), min(max(x1, 0.0), image.width)
        y0, y1 = min(max(y0, 0.0), image.height), min(max(y1, 0.0), image.height)
    if x1 <= x0 or y1 <= y0:
        return None, "empty_bbox"
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return [x0, y0, x1 - x0, y1 - y0], "clipped" if clipped else ""


def read_coco_json(json_file: Path | str) -> CocoSplit:
    """Read `json_file` and log each kind of unusable entry once.

    The result is cached per version of the file (path, size, modification time), so the data check, the datasets and
    the evaluation read a file once per process.
    """
    json_file = Path(json_file).resolve()
    stat = json_file.stat()
    return _read_cached(json_file, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_cached(json_file: Path, size: int, mtime_ns: int) -> CocoSplit:
    """`read_coco_json` for one version of the file (its size and modification time are part of the key)."""
    content, digest = load_json(json_file)
    problems: dict[str, list[str]] = defaultdict(list)
    category_ids, names = read_categories(content, json_file, problems)
    images = read_images(content, json_file, problems)
    index = {cid: k for k, cid in enumerate(category_ids)}
    boxes: dict[int | str, list] = defaultdict(list)
    annotations = []
    for i, annotation in enumerate(content.get("annotations") or []):
        annotation = annotation if isinstance(annotation, dict) else {}
        aid = annotation.get("id", f"annotations[{i}]")
        iid, cid = annotation.get("image_id"), annotation.get("category_id")
        entry = f"id {aid} (image {iid})"
        image = images.get(iid) if isinstance(iid, (int, str)) else None
        if image is None:
            problems["unknown_image"].append(entry)
            continue
        if cid not in index or not is_integer(cid):
            problems["unknown_category"].append(f"{entry}, category {cid!r}")
            continue
        box, kind = read_box(annotation, image)
        if kind:
            problems[kind].append(entry)
        if box is None:
            continue
        crowd = bool(annotation.get("iscrowd", 0))
        area = annotation.get("area")
        area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0 else None
        annotations.append(
            dict(id=len(annotations) + 1, image_id=iid, category_id=cid, bbox=box, iscrowd=int(crowd),
                 area=area if area is not None else box[2] * box[3])
        )  # fmt: skip
        if not crowd:
            boxes[iid].append([index[cid], *box])
    split = CocoSplit(
        json_file=json_file,
        digest=digest,
        category_ids=category_ids,
        names=names,
        images=list(images.values()),
        boxes={iid: np.asarray(rows, np.float64).reshape(-1, 5) for iid, rows in boxes.items()},
        ground_truth=dict(
            images=[dict(id=im.id, file_name=im.file_name, width=im.width, height=im.height) for im in images.values()],
            annotations=annotations,
            categories=[dict(id=cid, name=names[k]) for k, cid in enumerate(category_ids)],
        ),
        problems=dict(problems),
    )
    for kind, entries in split.problems.items():
        LOGGER.warning(f"{json_file}: {len(entries)} {SKIPPED[kind]}: {listing(entries)}")
    return split
