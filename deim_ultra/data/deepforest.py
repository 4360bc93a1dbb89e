"""Build a YOLO-format tree-crown detection dataset from the NEON rasters shipped in the DeepForest wheel.

The `deepforest==2.1.0` wheel on PyPI bundles four annotated aerial RGB rasters (Pascal VOC XML, 951 boxes in total).
PyPI is often the only reachable host in locked-down environments, so the wheel doubles as the download channel:
`pip download` fetches it, the rasters are read straight out of the zip, tiled and written as

    root/images/{train,val}/<raster>_<x0>_<y0>.png
    root/labels/{train,val}/<raster>_<x0>_<y0>.txt    # "0 cx cy w h", normalised to the tile

Split: by source raster, so no val tile shares pixels with a train tile. Val is the 1249x1035 Yellowstone crop
(`2019_YELL_2_541000_4977000_image_crop`, 279 boxes); train is the other three rasters (672 boxes). Every annotation
("Tree", "Alive", "Dead") becomes class 0 `tree`.

VOC corners are used as given, as pixel-edge coordinates (DeepForest reads them the same way).

Build once with `python -m deim_ultra.data.deepforest` (or let Ultralytics run the `download:` snippet of
`deim_ultra/cfg/datasets/deepforest.yaml`). The build is idempotent: a finished build leaves a marker file and later
calls return immediately.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from ultralytics.utils import DATASETS_DIR, LOGGER

DEEPFOREST_VERSION = "2.1.0"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
EXPECTED_BOXES = 951
VAL_RASTERS = ("2019_YELL_2_541000_4977000_image_crop",)
MARKER = ".deepforest_complete"
BUILD_COMMAND = "python -m deim_ultra.data.deepforest"


@dataclass(frozen=True)
class VocAnnotation:
    """One VOC XML file.

    Attributes:
        image: raster file named by the XML's <filename>, resolved next to the XML.
        width, height: raster size declared by the XML, in pixels.
        boxes: (N, 4) float64 array, one row per <object>, absolute pixel xyxy (x1, y1, x2, y2).
    """

    image: Path
    width: int
    height: int
    boxes: np.ndarray


def download_wheel(dest: Path) -> Path:
    """Fetch the pinned DeepForest wheel from PyPI into `dest` (no dependencies) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"deepforest=={DEEPFOREST_VERSION}", "-d", str(dest)]
    LOGGER.info(f"Downloading DeepForest data wheel: {' '.join(cmd)}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"deepforest-{DEEPFOREST_VERSION}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"'{' '.join(cmd)}' failed (exit {result.returncode}):\n{result.stderr.strip()}\n"
            f"Fix: make PyPI reachable, or fetch the wheel elsewhere with "
            f"'pip download --no-deps deepforest=={DEEPFOREST_VERSION} -d DIR', copy it here and run "
            f"'{BUILD_COMMAND} --root <dataset root> --wheel DIR/<wheel file>'."
        )
    return wheels[0]


def verify_wheel(wheel: Path) -> None:
    """Raise if `wheel` is not the byte-identical pinned release (the box counts below depend on it)."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} (deepforest=={DEEPFOREST_VERSION}). "
            f"Fix: delete it and download it again with 'pip download --no-deps deepforest=={DEEPFOREST_VERSION}'."
        )


def extract_voc_data(wheel: Path, dest: Path) -> list[Path]:
    """Unpack the wheel's `deepforest/data/` folder into `dest`; return the VOC XML paths found, sorted by name."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith("deepforest/data/") and not m.endswith("/")]
        zf.extractall(dest, members)
    xmls = sorted((dest / "deepforest" / "data").glob("*.xml"))
    if not xmls:
        raise RuntimeError(f"{wheel} holds no deepforest/data/*.xml annotations; is it the deepforest wheel?")
    return xmls


def read_voc(xml_file: Path) -> VocAnnotation:
    """Parse one Pascal VOC XML file (every <object> counts, whatever its <name>)."""
    root = ET.parse(xml_file).getroot()
    size = root.find("size")
    filename = root.findtext("filename")
    if size is None or filename is None:
        raise ValueError(f"{xml_file}: missing <size> or <filename>; not a Pascal VOC annotation")
    corners = ("xmin", "ymin", "xmax", "ymax")
    boxes = [[float(obj.findtext(f"bndbox/{c}")) for c in corners] for obj in root.iter("object")]
    return VocAnnotation(
        image=xml_file.parent / filename,
        width=int(size.findtext("width")),
        height=int(size.findtext("height")),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
    )


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` with at least `overlap` pixels of overlap covering [0, length).

    The last tile is pushed back to end exactly at `length`, so every tile is full-size and no padding is needed;
    a raster shorter than `tile` gives the single origin 0 (the tile is then the whole raster).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    last = max(length - tile, 0)
    return [*range(0, last, tile - overlap), last]


def clip_boxes_to_tile(
    boxes: np.ndarray, x0: int, y0: int, width: int, height: int, min_visible: float = 0.4, min_size: float = 2.0
) -> np.ndarray:
    """Boxes that survive cropping the window [x0, x0 + width) x [y0, y0 + height).

    Args:
        boxes: (N, 4) absolute xyxy boxes in raster pixels.
        x0: left edge of the window in raster pixels.
        y0: top edge of the window in raster pixels.
        width: window width in pixels.
        height: window height in pixels.
        min_visible: keep a box only if at least this fraction of its area lies inside the window, so that
            slivers of crowns cut by the tile edge do not become labels that show almost nothing.
        min_size: keep a box only if its clipped width and height are both at least this many pixels.

    Returns:
        (M, 4) xyxy boxes in window pixel coordinates, clipped to the window, M <= N, in input order.
    """
    local = boxes - np.array([x0, y0, x0, y0], dtype=np.float64)
    clipped = np.clip(local, 0.0, np.array([width, height, width, height], dtype=np.float64))
    wh = clipped[:, 2:] - clipped[:, :2]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (wh.min(axis=1) >= min_size) & (wh.prod(axis=1) >= min_visible * area)
    return clipped[keep]


def xyxy_to_yolo(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) absolute xyxy pixel boxes -> (N, 4) YOLO (cx, cy, w, h) normalised by the image `width`/`height`."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    xywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
    return xywh / scale


def write_yolo_labels(path: Path, boxes: np.ndarray, cls: int = 0) -> None:
    """Write (N, 4) normalised cxcywh `boxes` as YOLO label lines of class `cls` (an empty file for N == 0)."""
    path.write_text("".join(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for cx, cy, w, h in boxes))


def load_raster(ann: VocAnnotation, xml_file: Path) -> np.ndarray:
    """Read the raster of `ann` as an (H, W, 3) uint8 RGB array, checking it matches the XML's declared size."""
    if not ann.image.exists():
        raise FileNotFoundError(f"{xml_file} names image '{ann.image.name}', which is not next to it")
    with Image.open(ann.image) as im:
        image = np.asarray(im.convert("RGB"))
    if image.shape[:2] != (ann.height, ann.width):
        raise ValueError(
            f"{ann.image}: size {image.shape[1]}x{image.shape[0]} differs from {ann.width}x{ann.height} in {xml_file}"
        )
    return image


def tile_raster(
    image: np.ndarray, boxes: np.ndarray, stem: str, images_dir: Path, labels_dir: Path, tile: int, overlap: int
) -> tuple[int, int]:
    """Cut `image` (H, W, 3) into overlapping tiles and write each tile's PNG and YOLO label file.

    Args:
        image: (H, W, 3) uint8 RGB raster.
        boxes: (N, 4) absolute xyxy boxes of `image` in pixels.
        stem: file-name prefix; tiles are named `<stem>_<x0>_<y0>`.
        images_dir: existing folder for the tile PNGs.
        labels_dir: existing folder for the tile label files.
        tile: tile side in pixels.
        overlap: minimum overlap between neighbouring tiles in pixels.

    Returns:
        (number of tiles written, number of box labels written over all tiles).
    """
    height, width = image.shape[:2]
    tw, th = min(tile, width), min(tile, height)
    n_tiles = n_boxes = 0
    for y0 in tile_origins(height, tile, overlap):
        for x0 in tile_origins(width, tile, overlap):
            kept = clip_boxes_to_tile(boxes, x0, y0, tw, th)
            name = f"{stem}_{x0}_{y0}"
            Image.fromarray(image[y0 : y0 + th, x0 : x0 + tw]).save(images_dir / f"{name}.png")
            write_yolo_labels(labels_dir / f"{name}.txt", xyxy_to_yolo(kept, tw, th))
            n_tiles, n_boxes = n_tiles + 1, n_boxes + len(kept)
    return n_tiles, n_boxes


def build_deepforest(
    root: Path | str,
    wheel: Path | str | None = None,
    tile: int = 400,
    overlap: int = 80,
    val_rasters: tuple[str, ...] = VAL_RASTERS,
) -> Path:
    """Create (once) the tiled YOLO DeepForest dataset under `root` and return `root`.

    Args:
        root: dataset root; `images/` and `labels/` are (re)created inside it unless a finished build is there.
        wheel: an already downloaded `deepforest-2.1.0-*.whl`; None downloads it from PyPI with pip.
        tile: tile side in pixels.
        overlap: minimum overlap between neighbouring tiles in pixels.
        val_rasters: raster file stems that form the val split; all other rasters go to train.

    Returns:
        `root`, holding images/{train,val} and labels/{train,val}.
    """
    root = Path(root)
    if (root / MARKER).exists():
        LOGGER.info(f"DeepForest dataset already built at {root}")
        return root
    with tempfile.TemporaryDirectory(prefix="deepforest_") as tmp:
        wheel = Path(wheel) if wheel is not None else download_wheel(Path(tmp))
        verify_wheel(wheel)
        xmls = extract_voc_data(wheel, Path(tmp) / "unpacked")
        annotations = {xml: read_voc(xml) for xml in xmls}
        total = sum(len(a.boxes) for a in annotations.values())
        if total != EXPECTED_BOXES:
            raise RuntimeError(f"{wheel}: found {total} VOC boxes in {len(xmls)} files, expected {EXPECTED_BOXES}")
        stems = {a.image.stem for a in annotations.values()}
        if missing := set(val_rasters) - stems:
            raise ValueError(f"val_rasters {sorted(missing)} are not among the annotated rasters {sorted(stems)}")

        for sub in ("images", "labels"):  # leftovers of an interrupted build
            shutil.rmtree(root / sub, ignore_errors=True)
        counts = {"train": [0, 0, 0], "val": [0, 0, 0]}  # rasters, tiles, boxes
        for xml, ann in annotations.items():
            split = "val" if ann.image.stem in val_rasters else "train"
            images_dir, labels_dir = root / "images" / split, root / "labels" / split
            images_dir.mkdir(parents=True, exist_ok=True)
            labels_dir.mkdir(parents=True, exist_ok=True)
            image = load_raster(ann, xml)
            n_tiles, n_boxes = tile_raster(image, ann.boxes, ann.image.stem, images_dir, labels_dir, tile, overlap)
            LOGGER.info(f"DeepForest {split}: {ann.image.name} ({len(ann.boxes)} boxes) -> {n_tiles} tiles")
            counts[split] = [c + d for c, d in zip(counts[split], (1, n_tiles, n_boxes))]
    for split, (n_rasters, n_tiles, n_boxes) in counts.items():
        LOGGER.info(f"DeepForest {split}: {n_rasters} rasters, {n_tiles} tiles of {tile}px, {n_boxes} box labels")
    (root / MARKER).write_text(f"deepforest=={DEEPFOREST_VERSION} tile={tile} overlap={overlap}\n")
    return root


def main() -> None:
    """Command line entry point: `python -m deim_ultra.data.deepforest [--root DIR] [--wheel WHL]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DATASETS_DIR / "deepforest", help="dataset root to create")
    parser.add_argument("--wheel", type=Path, default=None, help="local deepforest-2.1.0 wheel (skips pip download)")
    args = parser.parse_args()
    build_deepforest(args.root, wheel=args.wheel)


if __name__ == "__main__":
    main()
