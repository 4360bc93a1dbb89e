"""DEIM's "Dense O2O" training transforms as Ultralytics transforms, and the per-stage pipeline that chains them.

Ultralytics transforms pass one `labels` dict along: `img` (H, W, C) uint8 BGR numpy, `instances`
(ultralytics.utils.instance.Instances, any box format, normalised or not), `cls` (N, 1) float32 numpy, plus metadata
(`im_file`, `ori_shape`, `resized_shape`, `ratio_pad`) that is carried through untouched. The geometric and colour
work is done by torchvision.transforms.v2; `TorchvisionTransform` converts the dict to a torchvision sample (RGB image,
pixel XYXY `BoundingBoxes`, class labels) and back, so boxes and their classes always travel together.

Order (the authors' DEIM recipe): Mosaic -> RandomPhotometricDistort -> RandomZoomOut + RandomIoUCrop ->
SanitizeBoundingBoxes -> horizontal flip -> antialiased stretch resize -> SanitizeBoundingBoxes -> Format (normalised
cxcywh). A sample that Mosaic changed
skips zoom-out and IoU-crop: Mosaic marks it under MOSAIC_FLAG and the zoom-out/IoU-crop transform consumes the mark.
Batch mixup works on collated batches and lives in `deim_ultra.data.batch_transforms`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from ultralytics.data.augment import BaseMixTransform, BaseTransform, Compose, Format, RandomFlip
from ultralytics.utils import IterableSimpleNamespace
from ultralytics.utils.instance import Instances

from deim_ultra.data.stages import stage_augmentation

MOSAIC_DEGREES = 10.0
MOSAIC_TRANSLATE = (0.1, 0.1)
MOSAIC_SCALE = (0.5, 1.5)
PHOTOMETRIC_P = 0.5  # torchvision's p: each of brightness, contrast, saturation, hue, channel shuffle on its own
ZOOM_OUT_P = 0.5
ZOOM_OUT_SIDE_RANGE = (1.0, 4.0)
IOU_CROP_P = 0.8
MIN_BOX_SIZE = 1.0  # pixels, in both width and height
FILL = 0  # pixel value of mosaic, affine and zoom-out borders
MOSAIC_FLAG = "mosaic"  # labels key set by DEIMMosaic on the samples it changed


def labels_to_sample(labels: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Convert an Ultralytics labels dict to a torchvision sample; `labels["instances"]` becomes pixel XYXY in place.

    Returns:
        image: tv_tensors.Image (C, H, W) uint8, RGB for 3-channel input (colour transforms assume RGB).
        boxes: tv_tensors.BoundingBoxes (N, 4) float32 pixel XYXY on canvas (H, W), clamped to the image because
            SanitizeBoundingBoxes drops boxes with any coordinate outside it, even by rounding error.
        labels: (N,) float32 class ids, the row order of `boxes`.
    """
    img = labels["img"]
    h, w = img.shape[:2]
    instances = labels["instances"]
    instances.convert_bbox(format="xyxy")
    instances.denormalize(w, h)
    rgb = img[..., ::-1] if img.shape[2] == 3 else img
    boxes = tv_tensors.BoundingBoxes(
        torch.from_numpy(np.ascontiguousarray(instances.bboxes, dtype=np.float32)), format="XYXY", canvas_size=(h, w)
    )
    return {
        "image": tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)),
        "boxes": F.clamp_bounding_boxes(boxes),
        "labels": torch.from_numpy(np.asarray(labels["cls"], dtype=np.float32).reshape(-1)),
    }


def image_to_numpy(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 RGB tensor -> (H, W, C) uint8 BGR contiguous numpy, the layout Ultralytics transforms expect."""
    img = image.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(img[..., ::-1] if img.shape[2] == 3 else img)


def sample_boxes_to_labels(sample: dict[str, torch.Tensor], labels: dict[str, Any]) -> dict[str, Any]:
    """Write a torchvision sample's boxes and classes into `labels` as pixel XYXY Instances and (N, 1) float32 cls.

    Only boxes are carried: DEIM is a box detector, so segments and keypoints are not kept.
    """
    boxes = sample["boxes"].as_subclass(torch.Tensor).numpy().astype(np.float32).reshape(-1, 4)
    labels["instances"] = Instances(boxes, bbox_format="xyxy", normalized=False)
    labels["cls"] = sample["labels"].numpy().astype(np.float32).reshape(-1, 1)
    return labels


def sample_to_labels(sample: dict[str, torch.Tensor], labels: dict[str, Any]) -> dict[str, Any]:
    """Write a torchvision sample (see `labels_to_sample`) back into `labels`: image, resized_shape, boxes, cls."""
    labels["img"] = image_to_numpy(sample["image"])
    labels["resized_shape"] = labels["img"].shape[:2]
    return sample_boxes_to_labels(sample, labels)


class TorchvisionTransform(BaseTransform):
    """Runs one torchvision.transforms.v2 transform (or v2.Compose) on an Ultralytics labels dict.

    Image and boxes go through the torchvision transform in one call, which draws the random parameters once for
    both; that is why `__call__` is overridden instead of BaseTransform's separate apply_image/apply_instances.

    Attributes:
        transform: the wrapped v2 transform; it receives {"image", "boxes", "labels"} as built by `labels_to_sample`.
        skip_on_mosaic: leave samples marked by DEIMMosaic unchanged (and remove the mark). Set it on exactly one
            transform after the mosaic, the one holding zoom-out and IoU-crop.
    """

    def __init__(self, transform: v2.Transform, skip_on_mosaic: bool = False) -> None:
        self.transform = transform
        self.skip_on_mosaic = skip_on_mosaic

    def __call__(self, labels: dict[str, Any]) -> dict[str, Any]:
        """Return `labels` transformed; boxes the transform made degenerate are kept until SanitizeBoundingBoxes."""
        if self.skip_on_mosaic and labels.pop(MOSAIC_FLAG, False):
            return labels
        return sample_to_labels(self.transform(labels_to_sample(labels)), labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform}, skip_on_mosaic={self.skip_on_mosaic})"


def paste_tiles(tiles: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Paste 4 samples on a 2x2 grid of equal cells, each tile at its cell's top-left corner.

    Args:
        tiles: 4 samples as from `labels_to_sample`, in order top-left, top-right, bottom-left, bottom-right; sizes
            may differ.

    Returns:
        Sample of canvas (C, 2 * max_h, 2 * max_w) filled with FILL, holding all tiles' boxes shifted to canvas pixels
        and their labels, in tile order.
    """
    max_h = max(t["image"].shape[-2] for t in tiles)
    max_w = max(t["image"].shape[-1] for t in tiles)
    first = tiles[0]["image"]
    canvas = torch.full((first.shape[0], 2 * max_h, 2 * max_w), FILL, dtype=first.dtype)
    boxes = []
    for tile, (y, x) in zip(tiles, ((0, 0), (0, max_w), (max_h, 0), (max_h, max_w))):
        h, w = tile["image"].shape[-2:]
        canvas[:, y : y + h, x : x + w] = tile["image"]
        boxes.append(tile["boxes"].as_subclass(torch.Tensor) + torch.tensor([x, y, x, y], dtype=torch.float32))
    return {
        "image": tv_tensors.Image(canvas),
        "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(2 * max_h, 2 * max_w)),
        "labels": torch.cat([t["labels"] for t in tiles]),
    }


class DEIMMosaic(BaseMixTransform):
    """DEIM's mosaic: 4 images, each resized to short side imgsz / 2 (long side at most imgsz), on a 2x canvas, then
    a random affine (rotation +-10 deg, translation +-10 %, scale 0.5-1.5).

    At imgsz 640 this is the official output_size 320 / max_size 640. Unlike Ultralytics' Mosaic there is no random
    centre or crop: the canvas keeps all 4 images and the affine supplies the geometric variety. The 3 extra images
    are drawn uniformly from the whole dataset (with replacement), as the authors do, rather than from Ultralytics'
    per-worker buffer of recently loaded images. Boxes the affine moves out of the canvas become degenerate and are
    dropped, with their classes, by the SanitizeBoundingBoxes that follows.

    Attributes:
        dataset: provides `get_image_and_label(index)` and `__len__`.
        p: probability of building a mosaic for a sample.
        resize: v2.Resize applied to each of the 4 images.
        affine: v2.RandomAffine applied to the canvas.
    """

    def __init__(self, dataset, imgsz: int, p: float) -> None:
        super().__init__(dataset=dataset, p=p)
        self.resize = v2.Resize(size=imgsz // 2, max_size=imgsz)
        self.affine = v2.RandomAffine(degrees=MOSAIC_DEGREES, translate=MOSAIC_TRANSLATE, scale=MOSAIC_SCALE, fill=FILL)

    def get_indexes(self) -> list[int]:
        """3 random dataset indexes for the other mosaic tiles."""
        return random.choices(range(len(self.dataset)), k=3)

    def get_params(self, labels: dict[str, Any]) -> dict[str, Any]:
        """Load the 3 other images (BaseMixTransform) and build the whole mosaic sample under key "sample"."""
        params = super().get_params(labels)
        tiles = [self.resize(labels_to_sample(x)) for x in (labels, *params["mix_labels"])]
        params["sample"] = self.affine(paste_tiles(tiles))
        return params

    def apply_image(self, labels: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Replace the image by the mosaic canvas."""
        labels["img"] = image_to_numpy(params["sample"]["image"])
        labels["resized_shape"] = labels["img"].shape[:2]
        return labels

    def apply_instances(self, labels: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Replace boxes and classes by those of all 4 tiles, and mark the sample for the zoom-out/IoU-crop skip."""
        labels[MOSAIC_FLAG] = True
        return sample_boxes_to_labels(params["sample"], labels)


def zoom_out_iou_crop() -> TorchvisionTransform:
    """RandomZoomOut then RandomIoUCrop (probability IOU_CROP_P), skipped on samples DEIMMosaic changed."""
    zoom = v2.RandomZoomOut(fill=FILL, side_range=ZOOM_OUT_SIDE_RANGE, p=ZOOM_OUT_P)
    return TorchvisionTransform(v2.Compose([zoom, v2.RandomApply([v2.RandomIoUCrop()], p=IOU_CROP_P)]), True)


def stretch_resize(imgsz: int) -> TorchvisionTransform:
    """Resize to imgsz x imgsz (stretch, no padding) with antialiasing, then drop boxes under MIN_BOX_SIZE again.

    As the authors' final PIL resize does: zoom-out and mosaic canvases shrink 2-4x here, and a resize without
    antialiasing (cv2's INTER_LINEAR, Ultralytics' LetterBox) aliases the small objects such shrinking makes. Boxes
    that the shrinking makes thinner than a pixel are dropped, as their second SanitizeBoundingBoxes does.
    """
    resize = v2.Resize((imgsz, imgsz), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return TorchvisionTransform(v2.Compose([resize, v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIZE)]))


def deim_transforms(dataset, imgsz: int, stage: str, hyp: IterableSimpleNamespace) -> Compose:
    """The training pipeline of one data stage, from a dataset's labels dict to Format's tensors.

    Every stage runs sanitize, flip, resize and format; `deim_ultra.data.stages` says which also get mosaic in front
    and photometric distortion, zoom-out and IoU-crop (batch mixup and multi-scale act on collated batches, see
    `deim_ultra.data.batch_transforms`). The other augmentation parameters are DEIM's (module constants); Ultralytics
    keys without a DEIM counterpart (hyp.degrees, hyp.hsv_h, ...) are refused under a recipe
    (`deim_ultra.recipe.settings`).

    Args:
        dataset: source of the mosaic's extra images (`get_image_and_label`, `__len__`).
        imgsz: output side; images are stretched to imgsz x imgsz (no letterbox padding), as the authors do.
        stage: one of STAGES.
        hyp: settings; reads `fliplr` (horizontal flip probability, DEIM uses 0.5), `bgr` (Format's BGR probability)
            and `mosaic` (the mosaic probability; a recipe sets its `Recipe.mosaic` unless the user gave one).

    Returns:
        Compose whose output holds `img` (C, imgsz, imgsz) uint8 RGB tensor, `cls` (N, 1), `bboxes` (N, 4) normalised
        cxcywh and `batch_idx` (N,) zeros, as Ultralytics' YOLODataset produces.
    """
    transforms = []
    augmentation = stage_augmentation(stage)
    if augmentation.mosaic:
        transforms.append(DEIMMosaic(dataset, imgsz=imgsz, p=hyp.mosaic))
    if augmentation.random:
        transforms.append(TorchvisionTransform(v2.RandomPhotometricDistort(p=PHOTOMETRIC_P)))
        transforms.append(zoom_out_iou_crop())
    transforms += [
        TorchvisionTransform(v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIZE)),
        RandomFlip(direction="horizontal", p=hyp.fliplr),
        stretch_resize(imgsz),
        Format(bbox_format="xywh", normalize=True, batch_idx=True, bgr=hyp.bgr),
    ]
    return Compose(transforms)
