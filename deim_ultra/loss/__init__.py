"""DEIM training losses: Hungarian matching, MAL/VFL/focal classification, L1/GIoU/FGL/DDF localization."""

from .criterion import DEIMCriterion
from .localization import box_losses, ddf_loss, distance_bins, fgl_loss, paired_iou
from .mal import CLASS_LOSSES, focal_loss, mal_loss, vfl_loss
from .matcher import HungarianMatcher, denoising_indices, union_indices
from .one_to_many import one_to_many_assign

__all__ = [
    "CLASS_LOSSES",
    "DEIMCriterion",
    "HungarianMatcher",
    "box_losses",
    "ddf_loss",
    "denoising_indices",
    "distance_bins",
    "fgl_loss",
    "focal_loss",
    "mal_loss",
    "one_to_many_assign",
    "paired_iou",
    "union_indices",
    "vfl_loss",
]
