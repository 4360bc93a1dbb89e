"""Tests for the offline dataset builders: synthetic shapes and the DeepForest VOC -> tiled YOLO conversion."""

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import check_det_dataset

from deim_ultra.data.deepforest import (
    VAL_RASTERS,
    build_deepforest,
    clip_boxes_to_tile,
    load_raster,
    read_voc,
    tile_origins,
    tile_raster,
    xyxy_to_yolo,
)
from deim_ultra.data.synthetic import make_synthetic_dataset

# Downloads deepforest==2.1.0 (20 MB) from PyPI, which CI reaches; pip's HTTP cache serves later runs.
network = pytest.mark.skipif(
    os.environ.get("DEIM_SKIP_NETWORK") == "1", reason="DEIM_SKIP_NETWORK=1: PyPI download opted out"
)
DEEPFOREST_YAML = Path(__file__).resolve().parents[1] / "deim_ultra" / "cfg" / "datasets" / "deepforest.yaml"


def read_labels(path: Path) -> np.ndarray:
    """(N, 5) rows (class, cx, cy, w, h) of a YOLO label file."""
    return np.array([line.split() for line in path.read_text().splitlines()], dtype=float).reshape(-1, 5)


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)


def rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path))[:, :, ::-1].astype(np.int32)


# ---------------------------------------------------------------- synthetic


def test_synthetic_label_is_tight_bound_of_drawn_pixels(tmp_path):
    imgsz = 96
    make_synthetic_dataset(tmp_path, n_train=12, n_val=0, imgsz=imgsz, min_objects=1, max_objects=1, nc=3, seed=3)
    seen = set()
    for img_file in sorted((tmp_path / "images" / "train").glob("*.png")):
        image = rgb(img_file)
        labels = read_labels(tmp_path / "labels" / "train" / f"{img_file.stem}.txt")
        assert labels.shape == (1, 5)
        cls = int(labels[0, 0])
        background = np.median(image.reshape(-1, 3), axis=0)
        # noise is +-8 per channel; every class colour is >= ~40 levels away from any background in some channel
        fg = np.abs(image - background).max(axis=-1) > 28
        ys, xs = np.nonzero(fg)
        pixel_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / imgsz
        np.testing.assert_allclose(cxcywh_to_xyxy(labels[:, 1:])[0], pixel_box, atol=2e-6)

        x1, y1, x2, y2 = np.round(pixel_box * imgsz).astype(int)
        fill = fg[y1:y2, x1:x2].mean()
        expected_fill = {0: (1.0, 1.0), 1: (0.65, 0.9), 2: (0.4, 0.65)}[cls]  # rectangle, ellipse (pi/4), triangle
        assert expected_fill[0] <= fill <= expected_fill[1], (img_file, cls, fill)
        # nc=3 hues are 0, 120, 240 degrees: class k is dominated by RGB channel k
        assert image[fg].mean(axis=0).argmax() == cls
        seen.add(cls)
    assert seen == {0, 1, 2}


def test_synthetic_dense_scene_counts_sizes_and_no_overlap(tmp_path):
    imgsz, lo, hi = 128, 6, 12
    make_synthetic_dataset(
        tmp_path,
        n_train=4,
        n_val=2,
        imgsz=imgsz,
        min_objects=10,
        max_objects=20,
        nc=5,
        seed=1,
        min_size=lo,
        max_size=hi,
    )
    for split in ("train", "val"):
        files = sorted((tmp_path / "labels" / split).glob("*.txt"))
        assert len(files) == {"train": 4, "val": 2}[split]
        for f in files:
            labels = read_labels(f)
            assert 10 <= len(labels) <= 20
            assert set(labels[:, 0].astype(int)) <= set(range(5))
            wh = labels[:, 3:] * imgsz
            assert (wh >= lo - 1e-3).all() and (wh <= hi + 1e-3).all()
            xyxy = np.round(cxcywh_to_xyxy(labels[:, 1:]) * imgsz).astype(int)
            assert (xyxy >= 0).all() and (xyxy <= imgsz).all()
            coverage = np.zeros((imgsz, imgsz), int)
            for x1, y1, x2, y2 in xyxy:
                coverage[y1:y2, x1:x2] += 1
            assert coverage.max() == 1


def test_synthetic_is_deterministic_and_reused(tmp_path):
    kwargs = dict(n_train=3, n_val=2, imgsz=64, min_objects=2, max_objects=5, nc=3, seed=7)
    a, b, c = (
        make_synthetic_dataset(tmp_path / n, **kw)
        for n, kw in (("a", kwargs), ("b", kwargs), ("c", {**kwargs, "seed": 8}))
    )
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file() and p.name != "data.yaml")
    assert len(files) == 10
    assert all((a.parent / f).read_bytes() == (b.parent / f).read_bytes() for f in files)
    assert any((a.parent / f).read_bytes() != (c.parent / f).read_bytes() for f in files)

    img = a.parent / "images" / "train" / "000000.png"
    mtime = img.stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "a", **kwargs) == a
    assert img.stat().st_mtime_ns == mtime  # same parameters: nothing rewritten
    make_synthetic_dataset(tmp_path / "a", **{**kwargs, "n_train": 1})
    assert len(list((a.parent / "images" / "train").iterdir())) == 1  # new parameters: stale images removed


def test_synthetic_yaml_loads_in_ultralytics(tmp_path):
    yaml_file = make_synthetic_dataset(tmp_path, n_train=8, n_val=3, imgsz=160, min_objects=1, max_objects=4, nc=3)
    data = check_det_dataset(str(yaml_file))
    assert data["nc"] == 3 and data["names"] == {0: "rectangle", 1: "ellipse", 2: "triangle"}
    for split, n in (("train", 8), ("val", 3)):
        dataset = YOLODataset(img_path=data[split], data=data, imgsz=160, augment=False)
        assert len(dataset) == n
        for entry in dataset.labels:
            expected = read_labels(Path(entry["im_file"].replace("images", "labels")).with_suffix(".txt"))
            assert 1 <= len(expected) <= 4
            np.testing.assert_array_equal(entry["cls"][:, 0], expected[:, 0])
            np.testing.assert_allclose(entry["bboxes"], expected[:, 1:], atol=1e-6)


# ---------------------------------------------------------------- deepforest (offline)

VOC_XML = """<annotation>
  <folder>data</folder>
  <filename>{name}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <object><name>Tree</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>25</xmax><ymax>25</ymax></bndbox></object>
  <object><name>Dead</name><bndbox><xmin>60</xmin><ymin>40</ymin><xmax>80</xmax><ymax>58</ymax></bndbox></object>
</annotation>
"""


def write_voc(folder: Path, width: int = 100, height: int = 60, xml_width: int = 100) -> Path:
    """A 100x60 RGB raster (every pixel distinct) and its 2-box VOC XML; returns the XML path."""
    yy, xx = np.mgrid[:height, :width]
    Image.fromarray(np.stack([xx, yy, (xx + yy) % 256], axis=-1).astype(np.uint8)).save(folder / "r.png")
    xml = folder / "r.xml"
    xml.write_text(VOC_XML.format(name="r.png", w=xml_width, h=height))
    return xml


def test_read_voc(tmp_path):
    ann = read_voc(write_voc(tmp_path))
    assert ann.image == tmp_path / "r.png" and (ann.width, ann.height) == (100, 60)
    np.testing.assert_array_equal(ann.boxes, [[5, 5, 25, 25], [60, 40, 80, 58]])


def test_tile_origins():
    assert tile_origins(100, 50, 10) == [0, 40, 50]
    assert tile_origins(60, 50, 10) == [0, 10]
    assert tile_origins(90, 50, 10) == [0, 40]
    assert tile_origins(400, 400, 80) == [0]
    assert tile_origins(30, 50, 10) == [0]
    assert tile_origins(2299, 400, 80) == [0, 320, 640, 960, 1280, 1600, 1899]
    with pytest.raises(ValueError, match="overlap"):
        tile_origins(100, 50, 50)


def test_clip_boxes_to_tile():
    boxes = np.array(
        [
            [45, 10, 65, 30],  # fully inside the window
            [30, 10, 50, 30],  # half visible: kept, clipped
            [30, 35, 46, 45],  # 6/16 = 37.5% visible: dropped
            [88.5, 0, 92, 40],  # 43% visible but only 1.5 px wide: dropped
            [0, 0, 10, 10],  # outside
        ],
        dtype=float,
    )
    kept = clip_boxes_to_tile(boxes, x0=40, y0=0, width=50, height=50)
    np.testing.assert_array_equal(kept, [[5, 10, 25, 30], [0, 10, 10, 30]])


def test_xyxy_to_yolo():
    out = xyxy_to_yolo(np.array([[10.0, 20, 30, 60]]), width=100, height=200)
    np.testing.assert_allclose(out, [[0.2, 0.2, 0.2, 0.2]])


def test_tile_raster_writes_crops_and_clipped_labels(tmp_path):
    xml = write_voc(tmp_path)
    ann = read_voc(xml)
    image = load_raster(ann, xml)
    images_dir, labels_dir = tmp_path / "images", tmp_path / "labels"
    images_dir.mkdir()
    labels_dir.mkdir()
    assert tile_raster(image, ann.boxes, "r", images_dir, labels_dir, tile=50, overlap=10) == (6, 6)

    # x origins [0, 40, 50], y origins [0, 10]; labels worked out by hand (0.4 = 40% visibility threshold)
    expected = {
        "r_0_0": [[0, 0.3, 0.3, 0.4, 0.4]],
        "r_0_10": [[0, 0.3, 0.15, 0.4, 0.3]],  # box 1 clipped at y=10, 75% visible
        "r_40_0": [[0, 0.6, 0.9, 0.4, 0.2]],  # box 2 clipped at y=50, 56% visible
        "r_40_10": [[0, 0.6, 0.78, 0.4, 0.36]],
        "r_50_0": [[0, 0.4, 0.9, 0.4, 0.2]],
        "r_50_10": [[0, 0.4, 0.78, 0.4, 0.36]],
    }
    assert sorted(p.stem for p in images_dir.iterdir()) == sorted(expected)
    assert sorted(p.stem for p in labels_dir.iterdir()) == sorted(expected)
    for name, rows in expected.items():
        np.testing.assert_allclose(read_labels(labels_dir / f"{name}.txt"), rows, atol=1e-6)
        x0, y0 = (int(v) for v in name.split("_")[1:])
        np.testing.assert_array_equal(
            np.asarray(Image.open(images_dir / f"{name}.png")), image[y0 : y0 + 50, x0 : x0 + 50]
        )


def test_load_raster_rejects_size_mismatch(tmp_path):
    xml = write_voc(tmp_path, xml_width=120)
    with pytest.raises(ValueError, match="r.png.*differs from 120x60"):
        load_raster(read_voc(xml), xml)


# ---------------------------------------------------------------- deepforest (network)


@network
def test_build_deepforest_through_ultralytics_download(tmp_path):
    root = tmp_path / "deepforest"
    yaml_file = tmp_path / "deepforest.yaml"
    text = DEEPFOREST_YAML.read_text()
    assert "\npath: deepforest" in text
    yaml_file.write_text(text.replace("\npath: deepforest", f"\npath: {root}"))
    data = check_det_dataset(str(yaml_file))  # runs the YAML's download snippet
    assert data["names"] == {0: "tree"}

    tiles = {s: sorted((root / "images" / s).glob("*.png")) for s in ("train", "val")}
    # rasters 2299x2472 (7x8 tiles), 400x400 (1) and 400x400 (1) train; 1249x1035 (4x3) val
    assert (len(tiles["train"]), len(tiles["val"])) == (58, 12)
    assert all(p.stem.startswith(VAL_RASTERS[0]) for p in tiles["val"])
    assert not any(p.stem.startswith(VAL_RASTERS[0]) for p in tiles["train"])
    for split, paths in tiles.items():
        labels = np.concatenate([read_labels(root / "labels" / split / f"{p.stem}.txt") for p in paths])
        assert (labels[:, 0] == 0).all() and (labels[:, 1:] > 0).all() and (labels[:, 1:] <= 1).all()
        assert all(Image.open(p).size == (400, 400) for p in paths)

    shutil.rmtree(root / "labels" / "val")  # a finished build is never redone
    assert build_deepforest(root) == root and not (root / "labels" / "val").exists()


def test_synthetic_names_label_the_same_pixels(tmp_path):
    """The shipped shapes.yaml names its classes by colour and shape; the folder's data.yaml must say the same, so a
    model trained on either YAML fine-tunes on the other with its classes matched by name."""
    kwargs = dict(n_train=2, n_val=1, imgsz=64, nc=3, seed=0)
    plain = make_synthetic_dataset(tmp_path / "plain", **kwargs)
    named = make_synthetic_dataset(
        tmp_path / "named", names=["red rectangle", "green ellipse", "blue triangle"], **kwargs
    )
    assert check_det_dataset(str(named))["names"] == {0: "red rectangle", 1: "green ellipse", 2: "blue triangle"}
    for image in ("train/000000.png", "val/000000.png"):
        assert (plain.parent / "images" / image).read_bytes() == (named.parent / "images" / image).read_bytes()
    with pytest.raises(ValueError, match="names has 2 entries for nc=3"):
        make_synthetic_dataset(tmp_path / "bad", names=["a", "b"], **kwargs)
