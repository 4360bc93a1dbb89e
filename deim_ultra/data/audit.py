"""What a training set really gives the model, checked once before training starts.

Ultralytics' label scan already drops an image whose image or label file is broken (unreadable or truncated image, a
label row without 5 fields, a negative or out-of-range class id, coordinates outside the image) and logs one line per
file. This audit adds what the scan lets through silently, and what a user must hear about:

- zero-area boxes (kept by the scan; DEIM's pipeline drops them): one warning listing the files;
- grayscale, RGBA / palette, 16-bit and very large images, which Ultralytics' loader converts to 8-bit BGR or downscales
  on every load: one warning per kind listing the files;
- class ids that look 1-based (no 0 anywhere, largest == nc: the scan dropped every image holding class nc);
- a training set with no usable box at all, which fails here with the reasons instead of training on nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from PIL import Image
from ultralytics.data.utils import IMG_FORMATS, img2label_paths
from ultralytics.utils import LOGGER, NUM_THREADS

from deim_ultra.messages import listing


class DatasetError(RuntimeError):
    """A dataset that cannot be trained on as given; the message names the file or folder and the fix."""


LARGE_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000: decoding and downscaling it costs more than the training step
CONVERSIONS = {  # kind: (what the images are, what Ultralytics' loader does with them)
    "grayscale": ("grayscale image(s)", "converted to 3 channels"),
    "alpha": ("image(s) with an alpha channel or a palette", "converted to 3-channel BGR"),
    "16-bit": ("16-bit image(s)", "scaled to 8 bits per channel"),
    "large": (
        f"image(s) over {LARGE_IMAGE_PIXELS // 1_000_000} megapixels",
        "decoded at full size and downscaled on every load (resize them once beforehand to train faster)",
    ),
}


@dataclass
class LabelAudit:
    """Counts of one training set after Ultralytics' scan.

    Attributes:
        images: image files found.
        kept: images the scan kept (the others were corrupt and are listed in its log).
        boxes: usable boxes (positive width and height) in the kept images.
        empty: kept images without any box (backgrounds).
        zero_area: image file -> number of its zero-area boxes.
    """

    images: int
    kept: int
    boxes: int
    empty: int
    zero_area: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        """Images the scan dropped."""
        return self.images - self.kept


def audit_labels(labels: Sequence[dict], images: int) -> LabelAudit:
    """Count usable, empty and zero-area boxes in Ultralytics label dicts ("im_file", "bboxes" (n, 4) xywh)."""
    audit = LabelAudit(images=images, kept=len(labels), boxes=0, empty=0)
    for label in labels:
        wh = np.asarray(label["bboxes"]).reshape(-1, 4)[:, 2:]
        usable = int((wh > 0).all(1).sum())
        audit.boxes += usable
        audit.empty += len(wh) == 0
        if usable < len(wh):
            audit.zero_area[label["im_file"]] = len(wh) - usable
    return audit


def looks_one_based(class_ids: np.ndarray, nc: int) -> bool:
    """Class ids that read as 1..nc: no box of class 0 and the largest id equal to nc (one past the last valid)."""
    return class_ids.size > 0 and int(class_ids.min()) >= 1 and int(class_ids.max()) == nc


def one_based_hint(class_ids: np.ndarray, nc: int) -> str:
    """The off-by-one explanation when `class_ids` look 1-based (see `looks_one_based`), else ""."""
    if not looks_one_based(class_ids, nc):
        return ""
    return (
        f"class ids look 1-based: no box has class 0 and the largest id is {nc}, one past the last valid id {nc - 1} "
        f"(nc={nc}), so every image with class {nc} was skipped. YOLO label files count classes from 0: subtract 1 "
        "from the first field of every label row"
    )


def first_column_ids(label_files: Iterable[str]) -> np.ndarray:
    """The class ids (first field of every row) of YOLO label files, skipping rows and files that do not parse."""
    ids = []
    for file in label_files:
        try:
            rows = Path(file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for row in rows:
            try:
                ids.append(float(row.split()[0]))
            except (IndexError, ValueError):
                continue
    return np.asarray(ids)


def with_one_based_hint(error: RuntimeError, img_path: str | list[str], nc: int) -> DatasetError:
    """Ultralytics' "No valid images found" error for a training folder, with the off-by-one hint where it applies."""
    folders = [Path(p) for p in (img_path if isinstance(img_path, list) else [img_path]) if Path(p).is_dir()]
    images = [str(f) for d in folders for f in sorted(d.rglob("*")) if f.suffix[1:].lower() in IMG_FORMATS]
    hint = one_based_hint(first_column_ids(img2label_paths(images)), nc)
    return DatasetError(f"{error}\n{hint}" if hint else str(error))


def image_kind(file: str) -> str | None:
    """Which conversion Ultralytics' loader applies to `file` (a key of CONVERSIONS), from its header only."""
    try:
        with Image.open(file) as im:
            mode, pixels = im.mode, im.width * im.height
            raw_modes = " ".join(str(tile.args) for tile in im.tile)  # PIL opens 16-bit RGB PNGs as "RGB;16B"
    except (OSError, Image.DecompressionBombError):  # unreadable here: Ultralytics' scan reports such files
        return None
    if pixels > LARGE_IMAGE_PIXELS:
        return "large"
    if mode.startswith("I") or ";16" in raw_modes:
        return "16-bit"
    if mode in {"L", "1"}:
        return "grayscale"
    if mode in {"RGBA", "LA", "P", "PA"}:
        return "alpha"
    return None


def check_training_set(dataset, img_path: str | list[str], nc: int) -> LabelAudit:
    """Audit a built Ultralytics training dataset; warn about what it converts or ignores, fail if nothing is usable.

    Raises:
        ValueError: When no kept image has a usable box, with the counts that say why.
    """
    prefix = getattr(dataset, "prefix", "")
    found = dataset.get_img_files(img_path)
    audit = audit_labels(dataset.labels, len(found))
    if audit.skipped:
        LOGGER.warning(
            f"{prefix}{audit.skipped} of {audit.images} images skipped: their image or label file is broken "
            "(one 'ignoring corrupt image/label' line each, above)"
        )
    if audit.zero_area:
        LOGGER.warning(
            f"{prefix}{sum(audit.zero_area.values())} zero-area boxes ignored (width or height 0) in "
            f"{listing(sorted(audit.zero_area))}"
        )
    with ThreadPool(NUM_THREADS) as pool:
        kinds = pool.map(image_kind, [label["im_file"] for label in dataset.labels])
    for kind, (what, done) in CONVERSIONS.items():
        files = [label["im_file"] for label, k in zip(dataset.labels, kinds) if k == kind]
        if files:
            LOGGER.warning(f"{prefix}{len(files)} {what} {done}: {listing(files)}")
    dropped = sorted(set(found) - {label["im_file"] for label in dataset.labels})
    kept_ids = np.concatenate([np.asarray(label["cls"]).reshape(-1) for label in dataset.labels] or [np.zeros(0)])
    if not (kept_ids == 0).any():
        hint = one_based_hint(np.concatenate([kept_ids, first_column_ids(img2label_paths(dropped))]), nc)
        if hint:
            LOGGER.warning(f"{prefix}{hint}")
    if audit.boxes == 0:
        raise ValueError(
            f"{prefix}no usable box in the training set {img_path}: {audit.images} images found, {audit.skipped} "
            f"skipped as broken, {audit.empty} without boxes, {len(audit.zero_area)} with zero-area boxes. "
            "Fix the label files (one 'class x_center y_center width height' row per box, normalised to 0-1)"
        )
    return audit
