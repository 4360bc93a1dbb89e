"""Which augmentation each data stage of DEIM's schedule applies; the stages and their epochs are the recipe's
(`deim_ultra.recipe.schedule`)."""

from __future__ import annotations

from dataclasses import dataclass

from deim_ultra.recipe.schedule import STAGES


@dataclass(frozen=True)
class StageAugmentation:
    """What one data stage applies, per image (`deim_ultra.data.augment`) and per batch (`.batch_transforms`).

    Attributes:
        mosaic (bool): DEIMMosaic per image and batch mixup per batch: the denser matches of Dense O2O.
        random (bool): Photometric distortion, zoom-out and IoU-crop per image.
        multi_scale (bool): One random size per batch.
    """

    mosaic: bool
    random: bool
    multi_scale: bool


STAGE_AUGMENTATION: dict[str, StageAugmentation] = {
    "warmup": StageAugmentation(mosaic=False, random=False, multi_scale=True),
    "dense_o2o": StageAugmentation(mosaic=True, random=True, multi_scale=True),
    "aug": StageAugmentation(mosaic=False, random=True, multi_scale=True),
    "no_aug": StageAugmentation(mosaic=False, random=False, multi_scale=False),
}


def stage_augmentation(stage: str) -> StageAugmentation:
    """The augmentation of data stage `stage`; ValueError for a name that is not one of the recipe's STAGES."""
    if stage not in STAGES:
        raise ValueError(f"unknown data stage '{stage}', expected one of {STAGES}")
    return STAGE_AUGMENTATION[stage]
