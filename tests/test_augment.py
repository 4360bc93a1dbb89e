"""Tests for DEIM's staged data pipeline (deim_ultra.data.augment / dataset) and batch mixup
(deim_ultra.data.batch_transforms).

Box correctness is checked against pixels: synthetic images carry filled rectangles, one unique colour per class, and
after a transform every output box must hold its class's colour and every pixel of that colour must lie in the box.
"""

import random

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.data.build import build_dataloader
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils import IterableSimpleNamespace
from ultralytics.utils.instance import Instances

from deim_ultra.data.augment import (
    MOSAIC_FLAG,
    DEIMMosaic,
    TorchvisionTransform,
    deim_transforms,
)
from deim_ultra.data.batch_transforms import batch_mixup
from deim_ultra.data.dataset import DEIMDataset
from deim_ultra.data.stages import STAGE_AUGMENTATION
from deim_ultra.recipe.schedule import STAGES
from deim_ultra.recipe.tables import RECIPES

# RGB colour of class k; none is within COLOUR_TOL of another, of the grey background or of the black border fill
COLOURS = np.array(
    [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (255, 0, 255),
        (0, 255, 255),
        (255, 255, 255),
        (255, 128, 0),
    ],
    np.int32,
)
BACKGROUND = 128
COLOUR_TOL = 40  # max per-channel distance of a pixel "of colour k"; blended edge pixels fall outside it

BASE = ["SanitizeBoundingBoxes", "RandomFlip", "Resize", "SanitizeBoundingBoxes", "Format"]
AUG = ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop", *BASE]
EXPECTED_KINDS = {"warmup": BASE, "dense_o2o": ["DEIMMosaic", *AUG], "aug": AUG, "no_aug": BASE}


def seed_all(seed: int) -> None:
    """Ultralytics' transforms draw from `random`, torchvision's from torch."""
    random.seed(seed)
    torch.manual_seed(seed)


def hyp_with(**overrides) -> IterableSimpleNamespace:
    return IterableSimpleNamespace(**{**vars(DEFAULT_CFG), **overrides})


def rectangle_labels(size: tuple[int, int], boxes: list[tuple[float, float, float, float]], classes: list[int]) -> dict:
    """Ultralytics labels dict of a grey (h, w) image with a filled COLOURS[c] rectangle at each pixel-edge xyxy box."""
    h, w = size
    rgb = np.full((h, w, 3), BACKGROUND, np.uint8)
    for (x1, y1, x2, y2), c in zip(boxes, classes):
        rgb[int(y1) : int(y2), int(x1) : int(x2)] = COLOURS[c]
    xyxy = np.array(boxes, np.float32).reshape(-1, 4)
    xywhn = np.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2 / w,
            (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
            (xyxy[:, 2] - xyxy[:, 0]) / w,
            (xyxy[:, 3] - xyxy[:, 1]) / h,
        ],
        axis=1,
    )
    return {
        "im_file": "synthetic.png",
        "img": np.ascontiguousarray(rgb[..., ::-1]),
        "instances": Instances(xywhn, bbox_format="xywh", normalized=True),
        "cls": np.array(classes, np.float32).reshape(-1, 1),
        "ori_shape": (h, w),
        "resized_shape": (h, w),
    }


def pixel_boxes(labels: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) int RGB image, (N, 4) pixel xyxy boxes and (N,) int classes of a labels dict (not modified)."""
    img = labels["img"]
    h, w = img.shape[:2]
    instances = Instances(
        labels["instances"].bboxes.copy(),
        bbox_format=labels["instances"]._bboxes.format,
        normalized=labels["instances"].normalized,
    )
    instances.convert_bbox("xyxy")
    instances.denormalize(w, h)
    return img[..., ::-1].astype(np.int32), instances.bboxes, labels["cls"].reshape(-1).astype(int)


def colour_mask(rgb: np.ndarray, cls: int) -> np.ndarray:
    return np.abs(rgb - COLOURS[cls]).max(-1) <= COLOUR_TOL


def assert_boxes_on_blobs(labels: dict, min_fill: float, tol: int) -> None:
    """The class colour fills >= min_fill of each box, and every pixel of a boxed class's colour lies in one of that
    class's boxes (+ tol px). A class has several boxes only where the mosaic drew the same image twice."""
    rgb, boxes, classes = pixel_boxes(labels)
    assert len(boxes) == len(classes)
    ys, xs = np.mgrid[: rgb.shape[0], : rgb.shape[1]] + 0.5  # pixel centres
    for c in set(classes.tolist()):
        mask, covered = colour_mask(rgb, c), np.zeros(rgb.shape[:2], bool)
        for x1, y1, x2, y2 in boxes[classes == c]:
            covered |= (xs >= x1 - tol) & (xs <= x2 + tol) & (ys >= y1 - tol) & (ys <= y2 + tol)
            core = (xs > x1) & (xs < x2) & (ys > y1) & (ys < y2)
            if min(x2 - x1, y2 - y1) >= 6:  # slivers at the canvas edge are all blurred border; containment suffices
                assert mask[core].mean() >= min_fill, f"class {c} box {x1, y1, x2, y2} is mostly not its colour"
        assert not (mask & ~covered).any(), f"class {c} pixels outside its boxes"


class RectangleDataset:
    """Stand-in for DEIMMosaic's dataset: 4 images of different shapes, 2 rectangles each, classes 2i and 2i+1."""

    SCENES = [
        ((120, 160), [(10, 10, 70, 60), (90, 50, 150, 110)]),
        ((160, 120), [(10, 20, 60, 80), (50, 100, 110, 150)]),
        ((100, 100), [(5, 5, 55, 45), (60, 50, 95, 95)]),
        ((160, 160), [(20, 20, 80, 70), (90, 90, 150, 150)]),
    ]

    def __init__(self) -> None:
        self.requested = []  # indexes loaded, in order

    def __len__(self) -> int:
        return len(self.SCENES)

    def get_image_and_label(self, index: int) -> dict:
        self.requested.append(index)
        size, boxes = self.SCENES[index]
        return rectangle_labels(size, boxes, [2 * index, 2 * index + 1])


@pytest.fixture
def dataset(tiny_data) -> DEIMDataset:
    data = check_det_dataset(str(tiny_data))
    return DEIMDataset(img_path=data["train"], data=data, imgsz=160, augment=True, hyp=DEFAULT_CFG, batch_size=2)


def transform_kinds(compose) -> list[str]:
    """Class names of every transform in an Ultralytics Compose, torchvision ones unwrapped from their adapters."""
    kinds, todo = [], [t.transform if isinstance(t, TorchvisionTransform) else t for t in compose.transforms]
    while todo:
        t = todo.pop(0)
        if isinstance(t, (v2.Compose, v2.RandomApply)):
            todo = list(t.transforms) + todo
        else:
            kinds.append(type(t).__name__)
    return kinds


# ---------------------------------------------------------------- stage pipelines


@pytest.mark.parametrize("stage", STAGES)
def test_stage_pipeline_holds_exactly_its_transforms(stage):
    compose = deim_transforms(RectangleDataset(), 640, stage, DEFAULT_CFG)
    assert transform_kinds(compose) == EXPECTED_KINDS[stage]
    by_kind = {type(t).__name__: t for t in compose.transforms}
    assert by_kind["RandomFlip"].direction == "horizontal" and by_kind["RandomFlip"].p == 0.5
    assert by_kind["Format"].bbox_format == "xywh" and by_kind["Format"].normalize
    sanitize = compose.transforms[-4].transform
    assert isinstance(sanitize, v2.SanitizeBoundingBoxes) and sanitize.min_size == 1
    resize, sanitize_again = compose.transforms[-2].transform.transforms
    assert resize.size == [640, 640] and resize.antialias and resize.interpolation == v2.InterpolationMode.BILINEAR
    assert isinstance(sanitize_again, v2.SanitizeBoundingBoxes) and sanitize_again.min_size == 1


def test_augmentation_parameters_of_dense_o2o():
    from deim_ultra.recipe.settings import recipe_overrides

    hyp = hyp_with(**recipe_overrides({"model": "deim-n.yaml"}))  # the settings a recipe's training set gets
    mosaic, photometric, zoom_crop = deim_transforms(RectangleDataset(), 640, "dense_o2o", hyp).transforms[:3]
    assert isinstance(mosaic, DEIMMosaic) and mosaic.p == 0.5
    assert mosaic.resize.size == [320] and mosaic.resize.max_size == 640
    assert mosaic.affine.degrees == [-10.0, 10.0] and mosaic.affine.translate == (0.1, 0.1)
    assert mosaic.affine.scale == (0.5, 1.5) and mosaic.affine.fill == 0
    assert photometric.transform.p == 0.5 and not photometric.skip_on_mosaic
    zoom, iou_crop = zoom_crop.transform.transforms
    assert zoom_crop.skip_on_mosaic
    assert zoom.p == 0.5 and zoom.side_range == (1.0, 4.0) and zoom.fill == 0
    assert iou_crop.p == 0.8 and isinstance(iou_crop.transforms[0], v2.RandomIoUCrop)


def test_mosaic_probability_follows_deim_setting():
    compose = deim_transforms(RectangleDataset(), 640, "dense_o2o", hyp_with(mosaic=0.25))
    assert compose.transforms[0].p == 0.25


def test_every_stage_of_the_schedule_has_its_augmentation():
    assert list(STAGE_AUGMENTATION) == list(STAGES)


def test_unknown_stage_is_rejected(dataset):
    with pytest.raises(ValueError, match="unknown data stage"):
        deim_transforms(RectangleDataset(), 640, "mosaic", DEFAULT_CFG)
    with pytest.raises(ValueError, match="unknown data stage"):
        dataset.set_stage("close_mosaic")


# ---------------------------------------------------------------- box consistency


ZOOM_CROP_SCENE = ((120, 160), [(10, 10, 50, 40), (70, 20, 110, 70), (20, 70, 60, 110), (100, 80, 150, 115)])


def test_zoom_out_and_iou_crop_keep_boxes_on_their_colour_blobs():
    aug = deim_transforms(RectangleDataset(), 160, "aug", DEFAULT_CFG).transforms
    zoom_crop, sanitize = aug[1], aug[2]
    shapes, box_counts = set(), set()
    for seed in range(40):
        seed_all(seed)
        size, boxes = ZOOM_CROP_SCENE
        out = sanitize(zoom_crop(rectangle_labels(size, boxes, [0, 1, 2, 3])))
        assert_boxes_on_blobs(out, min_fill=1.0, tol=0)  # crop and pad only: no interpolation, boxes exact
        shapes.add(out["img"].shape[:2])
        box_counts.add(len(out["cls"]))
    assert len(shapes) > 10, "zoom-out / IoU-crop never changed the canvas"
    assert min(box_counts) < 4, "IoU-crop never dropped a box whose centre left the crop"


def test_mosaic_boxes_follow_their_images_through_resize_paste_and_affine():
    source = RectangleDataset()
    mosaic = DEIMMosaic(source, imgsz=160, p=1.0)
    sanitize = deim_transforms(source, 160, "aug", DEFAULT_CFG).transforms[2]
    counts = []
    for seed in range(12):
        seed_all(seed)
        source.requested.clear()
        out = mosaic(source.get_image_and_label(seed % 4))
        # tiles: short side 80 (= imgsz / 2), so a 120 x 160 image becomes 80 x 106.7; canvas is 2x the largest tile
        tiles = [
            np.array(RectangleDataset.SCENES[i][0]) * 80 / min(RectangleDataset.SCENES[i][0]) for i in source.requested
        ]
        assert len(tiles) == 4
        assert np.abs(np.array(out["img"].shape[:2]) - 2 * np.max(tiles, axis=0)).max() <= 2
        assert out.pop(MOSAIC_FLAG) is True
        out = sanitize(out)
        # edges are resampled twice (tile resize, affine) and rotated boxes enclose their rectangle
        assert_boxes_on_blobs(out, min_fill=0.45, tol=2)
        counts.append(len(out["cls"]))
    assert np.mean(counts) > 6, "4 images of 2 boxes each, less those the affine pushes out"


def test_mosaic_sample_skips_zoom_out_and_iou_crop():
    dense = deim_transforms(RectangleDataset(), 160, "dense_o2o", DEFAULT_CFG).transforms
    mosaic, photometric, zoom_crop = dense[:3]
    mosaic.p = 1.0
    for seed in range(15):
        seed_all(seed)
        labels = photometric(mosaic(RectangleDataset().get_image_and_label(seed % 4)))
        img, boxes = labels["img"], labels["instances"].bboxes.copy()
        out = zoom_crop(labels)
        assert out["img"] is img and np.array_equal(out["instances"].bboxes, boxes)
        assert MOSAIC_FLAG not in out, "the skip must consume the mosaic mark so it does not reach collate"
    changed = 0
    for seed in range(15):
        seed_all(seed)
        size, boxes = ZOOM_CROP_SCENE
        changed += zoom_crop(rectangle_labels(size, boxes, [0, 1, 2, 3]))["img"].shape[:2] != size
    assert changed > 0, "without the mosaic mark zoom-out / IoU-crop must apply"


def test_degenerate_boxes_are_dropped_with_their_classes():
    compose = deim_transforms(RectangleDataset(), 160, "no_aug", hyp_with(fliplr=0.0))
    boxes = [(10, 10, 50, 40), (60, 10, 60.5, 40), (70, 50, 100, 50), (100, 60, 140, 100), (150, 20, 150.9, 90)]
    out = compose(rectangle_labels((120, 160), boxes, [0, 1, 2, 3, 4]))
    assert out["cls"].ravel().tolist() == [0.0, 3.0]
    # stretching 160x120 to 160x160 keeps normalised coordinates: xywh of boxes 0 and 3 over (w 160, h 120)
    expected = torch.tensor([[30 / 160, 25 / 120, 40 / 160, 30 / 120], [120 / 160, 80 / 120, 40 / 160, 40 / 120]])
    torch.testing.assert_close(out["bboxes"].float(), expected, atol=1e-5, rtol=0)
    assert out["batch_idx"].tolist() == [0.0, 0.0]
    assert out["img"].shape == (3, 160, 160)
    assert out["img"][:, 40, 30].tolist() == COLOURS[0].tolist()  # Format's RGB: class 0's red at box 0's centre


def test_adapter_round_trip_keeps_bgr_and_shows_torchvision_rgb():
    labels = rectangle_labels((40, 60), [(0, 0, 60, 40)], [0])  # all red
    assert np.array_equal(TorchvisionTransform(v2.Identity())(dict(labels))["img"], labels["img"])
    grey = TorchvisionTransform(v2.Grayscale(num_output_channels=3))(labels)["img"]
    assert np.abs(grey.astype(int) - round(0.299 * 255)).max() <= 1  # ITU-R 601 luma of pure red, not of blue


def test_boxes_poking_out_of_the_image_are_clipped_not_dropped():
    compose = deim_transforms(RectangleDataset(), 160, "no_aug", hyp_with(fliplr=0.0))
    labels = rectangle_labels((120, 160), [(100, 30, 160, 60)], [0])
    labels["instances"] = Instances(np.array([[0.95, 0.375, 0.2, 0.25]], np.float32), bbox_format="xywh")  # x2 1.05
    out = compose(labels)
    assert out["cls"].ravel().tolist() == [0.0]
    torch.testing.assert_close(out["bboxes"], torch.tensor([[0.925, 0.375, 0.15, 0.25]]), atol=1e-5, rtol=0)


def test_every_stage_outputs_format_tensors(dataset):
    for stage in STAGES:
        dataset.set_stage(stage)
        for i in range(len(dataset)):
            seed_all(i)
            out = dataset[i]
            assert out["img"].shape == (3, 160, 160) and out["img"].dtype == torch.uint8
            n = len(out["cls"])
            assert out["cls"].shape == (n, 1) and out["bboxes"].shape == (n, 4) and out["batch_idx"].shape == (n,)
            xy, wh = out["bboxes"][:, :2], out["bboxes"][:, 2:]
            assert (wh > 0).all() and (xy - wh / 2 >= -1e-5).all() and (xy + wh / 2 <= 1 + 1e-5).all()
            assert MOSAIC_FLAG not in out


# ---------------------------------------------------------------- dataset stages and workers


def test_set_stage_rebuilds_the_pipeline(dataset):
    assert dataset.stage == "warmup" and transform_kinds(dataset.transforms) == EXPECTED_KINDS["warmup"]
    for stage in ("dense_o2o", "aug", "no_aug", "warmup"):
        dataset.set_stage(stage)
        assert dataset.stage == stage and transform_kinds(dataset.transforms) == EXPECTED_KINDS[stage]
    dataset.set_stage("dense_o2o")
    assert dataset.transforms.transforms[0].dataset is dataset  # the mosaic draws its extra images from this set


def unaugmented(batch: dict, dataset: DEIMDataset) -> list[bool]:
    """Per image of a collated batch: do its boxes equal its source labels, as they are or mirrored (warmup)?"""
    source = {label["im_file"]: label for label in dataset.labels}
    result = []
    for i, im_file in enumerate(batch["im_file"]):
        boxes, cls = batch["bboxes"][batch["batch_idx"] == i], batch["cls"][batch["batch_idx"] == i]
        ref_boxes, ref_cls = torch.from_numpy(source[im_file]["bboxes"]), torch.from_numpy(source[im_file]["cls"])
        mirrored = ref_boxes.clone()
        mirrored[:, 0] = 1 - mirrored[:, 0]
        same_shape = boxes.shape == ref_boxes.shape and torch.equal(cls, ref_cls)
        result.append(
            same_shape and (torch.allclose(boxes, ref_boxes, atol=1e-4) or torch.allclose(boxes, mirrored, atol=1e-4))
        )
    return result


def test_stage_reaches_dataloader_workers_after_reset(dataset):
    torch.manual_seed(0)
    loader = build_dataloader(dataset, batch=2, workers=2, shuffle=True, rank=-1, device="cpu")
    assert loader.num_workers == 2
    try:
        assert all(all(unaugmented(b, dataset)) for b in loader)  # warmup: labels pass through (maybe flipped)
        dataset.set_stage("dense_o2o")
        # persistent workers still hold their warmup copy of the dataset: this shows the test sees worker state
        assert all(all(unaugmented(b, dataset)) for b in loader)
        loader.reset()
        flags = [f for _ in range(2) for b in loader for f in unaugmented(b, dataset)]
        counts = [len(b["cls"]) / len(b["im_file"]) for _ in range(2) for b in loader]
    finally:
        loader.close()
    assert not all(flags), "after reset the workers must run dense_o2o"
    assert np.mean(counts) > np.mean([len(label["cls"]) for label in dataset.labels]), "mosaic adds boxes"


# ---------------------------------------------------------------- batch mixup


def collated_batch(dtype: torch.dtype) -> dict:
    """3 images; image 1 has no boxes. Boxes and classes are distinct so their provenance can be traced."""
    img = torch.arange(3 * 3 * 4 * 5).reshape(3, 3, 4, 5) % 251
    return {
        "img": img.to(dtype),
        "cls": torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]]),
        "bboxes": torch.rand(5, 4, generator=torch.Generator().manual_seed(0)),
        "batch_idx": torch.tensor([0.0, 0.0, 2.0, 2.0, 2.0]),
        "im_file": ("a.png", "b.png", "c.png"),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_mixup_blends_neighbours_and_keeps_both_box_sets(dtype):
    batch = collated_batch(dtype)
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out = batch_mixup(batch, torch.Generator().manual_seed(1), p=1.0)
    w = out["mixup"]
    assert 0.45 <= w <= 0.55
    for k, v in before.items():
        assert torch.equal(batch[k], v), f"input {k} was modified"
    a = before["img"].double()
    for i in range(3):
        expected = w * a[i] + (1 - w) * a[(i - 1) % 3]
        assert out["img"].dtype == dtype
        assert (out["img"][i].double() - expected).abs().max() <= (0.5 if dtype == torch.uint8 else 1e-4)
        own, prev = before["batch_idx"] == i, before["batch_idx"] == (i - 1) % 3
        mine = out["batch_idx"] == i
        assert torch.equal(out["bboxes"][mine], torch.cat([before["bboxes"][own], before["bboxes"][prev]]))
        assert torch.equal(out["cls"][mine], torch.cat([before["cls"][own], before["cls"][prev]]))
    assert out["batch_idx"].tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2, 2]  # grouped by image
    assert out["im_file"] == batch["im_file"]


def test_mixup_probability_weights_and_no_fire():
    gen = torch.Generator().manual_seed(0)
    weights = [batch_mixup(collated_batch(torch.float32), gen, p=RECIPES["n"].mixup)["mixup"] for _ in range(400)]
    fired = [w for w in weights if w != 1.0]
    assert 150 < len(fired) < 250  # p = 0.5
    assert 0.45 <= min(fired) < 0.46 and 0.54 < max(fired) <= 0.55
    batch = collated_batch(torch.float32)
    out = batch_mixup(batch, gen, p=0.0)
    assert out["mixup"] == 1.0 and out is not batch
    assert all(out[k] is batch[k] for k in ("img", "cls", "bboxes", "batch_idx"))
    single = {k: v[:1] if k == "img" else v for k, v in batch.items()}
    single.update(cls=batch["cls"][:2], bboxes=batch["bboxes"][:2], batch_idx=batch["batch_idx"][:2])
    assert batch_mixup(single, gen, p=1.0)["mixup"] == 1.0  # one image is never mixed with itself


def test_mixup_is_reproducible_with_a_generator():
    a = batch_mixup(collated_batch(torch.float32), torch.Generator().manual_seed(7), p=1.0)
    b = batch_mixup(collated_batch(torch.float32), torch.Generator().manual_seed(7), p=1.0)
    assert a["mixup"] == b["mixup"] and torch.equal(a["img"], b["img"])


def test_final_resize_antialiases_a_4x_shrink():
    """Stripes 3 px black / 3 px white shrunk 512 -> 128 blur towards grey (std 19 of 255); cv2's INTER_LINEAR, which
    samples 2 of every 4 columns, turns them into full-contrast false stripes (std 104)."""
    labels = rectangle_labels((512, 512), [(100, 100, 300, 300)], [0])
    stripes = np.tile(((np.arange(512) % 6) < 3) * 255, (512, 1)).astype(np.uint8)
    labels["img"] = np.ascontiguousarray(np.repeat(stripes[..., None], 3, axis=2))
    out = deim_transforms(RectangleDataset(), 128, "warmup", hyp_with(fliplr=0.0))(labels)["img"].float()
    assert out.shape == (3, 128, 128)
    assert abs(out.mean().item() - 127.5) < 2 and out.std().item() < 30


def test_boxes_thinner_than_a_pixel_after_the_resize_are_dropped():
    """A 3-px wide box of a 512 px image is 0.75 px wide at 128: dropped with its class; a 40-px box stays."""
    labels = rectangle_labels((512, 512), [(10, 10, 13, 200), (300, 300, 340, 340)], [1, 2])
    out = deim_transforms(RectangleDataset(), 128, "warmup", hyp_with(fliplr=0.0))(labels)
    assert out["cls"].flatten().tolist() == [2.0]
    assert torch.allclose(out["bboxes"], torch.tensor([[320 / 512, 320 / 512, 40 / 512, 40 / 512]]), atol=1e-6)


def test_bgr_setting_swaps_the_channels_of_the_training_image():
    """`bgr` keeps Ultralytics' meaning under a recipe: the probability that a training image stays BGR."""
    labels = rectangle_labels((64, 64), [(8, 8, 40, 40)], [0])
    rgb = deim_transforms(RectangleDataset(), 64, "warmup", hyp_with(fliplr=0.0, bgr=0.0))(dict(labels))["img"]
    labels = rectangle_labels((64, 64), [(8, 8, 40, 40)], [0])
    bgr = deim_transforms(RectangleDataset(), 64, "warmup", hyp_with(fliplr=0.0, bgr=1.0))(dict(labels))["img"]
    assert not torch.equal(rgb, bgr) and torch.equal(rgb, bgr.flip(0))
