"""Deterministic synthetic YOLO detection datasets of coloured shapes, for tests and convergence benchmarks.

Each scene is a flat, weakly tinted grey background with bounded uniform pixel noise and non-overlapping filled shapes.
The class fixes both the shape (class k draws SHAPES[k % 3]) and a saturated colour (hues evenly spaced over the
nc classes), so the task is learnable from colour alone, from shape alone, or both. Object sides are drawn
independently per axis from [min_size, max_size] pixels, which makes dense scenes of many small objects a matter of
raising max_objects and lowering the size range.

Labels are exact: each box is the tight bound of the shape's drawn pixels, as pixel edges (a shape covering pixel
columns 10..19 has x1 = 10, x2 = 20), normalised to YOLO (cx, cy, w, h). Shapes keep a 1-pixel gap between their
boxes, so no shape hides part of another. Images are lossless PNG by default, so the labels can be recovered from the
pixels; JPEG (quality 95) is several times smaller and faster to write and decode for large benchmark sets.

Layout under `root`: images/{train,val}/NNNNNN.{png,jpg}, labels/{train,val}/NNNNNN.txt and data.yaml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

SHAPES = ("rectangle", "ellipse", "triangle")
BACKGROUND_LEVELS = (64, 192)  # grey range far enough from the saturated class colours (channels 0 or 255)
BACKGROUND_TINT = 16  # max per-channel offset from the grey level, so backgrounds are not all neutral
PLACEMENT_TRIES = 50  # random positions tried per object before giving up on it in a crowded scene
ENCODE_PARAMS = {"png": [cv2.IMWRITE_PNG_COMPRESSION, 1], "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95]}


def class_colours(nc: int) -> np.ndarray:
    """(nc, 3) uint8 RGB colours: full saturation and value, hues evenly spaced so classes stay distinguishable."""
    hues = (np.arange(nc) * 180 // max(nc, 1)).astype(np.uint8)  # OpenCV hue range is [0, 180)
    hsv = np.stack([hues, np.full(nc, 255, np.uint8), np.full(nc, 255, np.uint8)], axis=1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def shape_mask(shape: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(height, width) bool mask of one filled `shape` inscribed in a width x height patch.

    Triangles have their base on the bottom edge and a random apex position on the top edge. Ellipses and triangles
    may not reach every patch border after rasterisation, hence callers take the box from the mask.
    """
    mask = np.zeros((height, width), np.uint8)
    if shape == "rectangle":
        mask[:] = 1
    elif shape == "ellipse":  # pixel centres inside the inscribed ellipse; symmetric, unlike cv2's integer rounding
        u = (np.arange(width) + 0.5) / width * 2 - 1
        v = (np.arange(height) + 0.5) / height * 2 - 1
        mask[:] = v[:, None] ** 2 + u[None, :] ** 2 <= 1
    elif shape == "triangle":
        apex = int(rng.integers(0, width))
        cv2.fillPoly(mask, [np.array([[apex, 0], [0, height - 1], [width - 1, height - 1]], np.int32)], color=1)
    else:
        raise ValueError(f"unknown shape '{shape}', expected one of {SHAPES}")
    return mask.astype(bool)


def render_scene(
    rng: np.random.Generator,
    imgsz: int,
    n_objects: int,
    colours: np.ndarray,
    min_size: int,
    max_size: int,
    noise: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene.

    Args:
        rng: source of all randomness for this scene.
        imgsz: square image side in pixels.
        n_objects: objects to try to place; fewer are placed if the scene runs out of free space.
        colours: (nc, 3) uint8 RGB colour per class.
        min_size: smallest object patch width or height in pixels.
        max_size: largest object patch width or height in pixels (inclusive).
        noise: pixel noise is uniform in [-noise, noise] per channel, added to the whole image.

    Returns:
        image: (imgsz, imgsz, 3) uint8 RGB.
        labels: (M, 5) float64 rows (class, cx, cy, w, h), box normalised to [0, 1], M <= n_objects.
    """
    grey = rng.integers(*BACKGROUND_LEVELS, endpoint=True)
    background = np.clip(grey + rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT, 3, endpoint=True), 0, 255)
    image = np.empty((imgsz, imgsz, 3), np.int16)
    image[:] = background
    occupied = np.zeros((imgsz, imgsz), bool)
    hi = min(max_size, imgsz - 2)  # leave room for the 1-pixel gap on both sides
    labels = []
    for _ in range(n_objects):
        cls = int(rng.integers(0, len(colours)))
        w, h = (int(v) for v in rng.integers(min(min_size, hi), hi, 2, endpoint=True))
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(1, imgsz - w)), int(rng.integers(1, imgsz - h))
            if not occupied[y0 - 1 : y0 + h + 1, x0 - 1 : x0 + w + 1].any():
                break
        else:
            continue
        mask = shape_mask(SHAPES[cls % len(SHAPES)], w, h, rng)
        occupied[y0 : y0 + h, x0 : x0 + w] = True
        image[y0 : y0 + h, x0 : x0 + w][mask] = colours[cls]
        ys, xs = np.nonzero(mask)
        x1, y1, x2, y2 = x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1
        labels.append([cls, (x1 + x2) / 2 / imgsz, (y1 + y2) / 2 / imgsz, (x2 - x1) / imgsz, (y2 - y1) / imgsz])
    image += rng.integers(-noise, noise, image.shape, endpoint=True, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(labels, np.float64).reshape(-1, 5)


def write_split(root: Path, split: str, split_id: int, n_images: int, params: dict, colours: np.ndarray) -> None:
    """Render `n_images` scenes of one split into root/images/<split> and root/labels/<split>.

    Image i of split `split_id` uses the generator seeded with (seed, split_id, i), so a scene does not depend on
    how many images the dataset has.
    """
    images_dir, labels_dir = root / "images" / split, root / "labels" / split
    images_dir.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    for i in range(n_images):
        rng = np.random.default_rng([params["seed"], split_id, i])
        n_objects = int(rng.integers(params["min_objects"], params["max_objects"], endpoint=True))
        image, labels = render_scene(
            rng, params["imgsz"], n_objects, colours, params["min_size"], params["max_size"], params["noise"]
        )
        ext = params["image_format"]
        cv2.imwrite(str(images_dir / f"{i:06d}.{ext}"), image[:, :, ::-1], ENCODE_PARAMS[ext])
        lines = (f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in labels)
        (labels_dir / f"{i:06d}.txt").write_text("".join(lines))


def make_synthetic_dataset(
    root: Path | str,
    n_train: int = 8,
    n_val: int = 4,
    imgsz: int = 160,
    min_objects: int = 1,
    max_objects: int = 4,
    nc: int = 3,
    seed: int = 0,
    min_size: int = 12,
    max_size: int = 48,
    noise: int = 8,
    image_format: str = "png",
    names: list[str] | None = None,
) -> Path:
    """Generate (or reuse) a synthetic YOLO detection dataset under `root` and return its data YAML path.

    Args:
        root: output folder; its images/ and labels/ are replaced unless data.yaml records identical parameters.
        n_train: number of train images.
        n_val: number of val images.
        imgsz: square image side in pixels.
        min_objects: fewest objects attempted per image.
        max_objects: most objects attempted per image (inclusive; crowded scenes may hold fewer than attempted).
        nc: number of classes.
        seed: all pixels and labels are a function of the parameters, seed included.
        min_size: smallest object width or height in pixels.
        max_size: largest object width or height in pixels (inclusive, capped at imgsz - 2).
        noise: amplitude of the uniform per-pixel noise, in grey levels; keep it well under 48 so shapes stay
            separable from the background (see BACKGROUND_LEVELS).
        image_format: "png" (lossless, pixels match the labels exactly) or "jpg" (quality 95, much smaller).
        names: class names for data.yaml (default: the shape names), e.g. the ones a shipped dataset YAML gives, so
            that a model trained on either YAML has the same names to fine-tune from. Pixels do not depend on them.

    Returns:
        Path of root/data.yaml (Ultralytics dataset YAML with an absolute `path`).
    """
    if not 1 <= min_size <= max_size or not 0 <= min_objects <= max_objects or nc < 1 or imgsz < 4:
        raise ValueError("need 1 <= min_size <= max_size, 0 <= min_objects <= max_objects, nc >= 1 and imgsz >= 4")
    if names is not None and len(names) != nc:
        raise ValueError(f"names has {len(names)} entries for nc={nc}")
    if image_format not in ENCODE_PARAMS:
        raise ValueError(f"image_format must be one of {sorted(ENCODE_PARAMS)}, got '{image_format}'")
    root = Path(root).resolve()
    yaml_file = root / "data.yaml"
    params = dict(
        n_train=n_train,
        n_val=n_val,
        imgsz=imgsz,
        min_objects=min_objects,
        max_objects=max_objects,
        nc=nc,
        seed=seed,
        min_size=min_size,
        max_size=max_size,
        noise=noise,
        image_format=image_format,
    )
    if yaml_file.exists() and yaml.safe_load(yaml_file.read_text()).get("synthetic") == params:
        if names:  # same pixels: only the names may change
            data = yaml.safe_load(yaml_file.read_text())
            yaml_file.write_text(yaml.safe_dump({**data, "names": dict(enumerate(names))}, sort_keys=False))
        return yaml_file
    yaml_file.unlink(missing_ok=True)  # written last, so its presence marks a complete dataset
    for sub in ("images", "labels"):
        shutil.rmtree(root / sub, ignore_errors=True)  # also drops Ultralytics' stale labels/*.cache
    colours = class_colours(nc)
    for split_id, (split, n_images) in enumerate((("train", n_train), ("val", n_val))):
        write_split(root, split, split_id, n_images, params, colours)
    shape_names = [SHAPES[k % len(SHAPES)] + (f"_{k}" if k >= len(SHAPES) else "") for k in range(nc)]
    names = dict(enumerate(names or shape_names))
    data = dict(path=str(root), train="images/train", val="images/val", names=names, synthetic=params)
    yaml_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return yaml_file
