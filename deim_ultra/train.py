"""`DEIMTrainer`: Ultralytics' RT-DETR trainer building DEIM models and accepting DEIM's settings."""

from __future__ import annotations

from copy import copy

from torch import nn
from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.rtdetr.val import RTDETRValidator
from ultralytics.utils import LOGGER, RANK

from deim_ultra.cfg import DEIM_CFG_DICT, ultralytics_args
from deim_ultra.nn.hgnetv2 import HGStage, HGStem, load_hgnetv2_pretrained
from deim_ultra.nn.tasks import DEIMDetectionModel


def backbone_layers(model: DEIMDetectionModel) -> tuple[HGStem, list[HGStage]]:
    """The HGNetv2 stem and stages of `model`, in order."""
    stem = next(m for m in model.model if isinstance(m, HGStem))
    return stem, [m for m in model.model if isinstance(m, HGStage)]


class DEIMTrainer(RTDETRTrainer):
    """Trains DEIM models; settings are Ultralytics' plus those in deim-ultra's `cfg/default.yaml`."""

    def __init__(self, cfg: dict = DEIM_CFG_DICT, overrides: dict | None = None, _callbacks: dict | None = None):
        """Validate `overrides` against Ultralytics' and DEIM's keys together."""
        super().__init__(cfg=cfg, overrides=overrides, _callbacks=_callbacks)

    def get_model(self, cfg: str | dict | None = None, weights: nn.Module | None = None, verbose: bool = True):
        """Build a DEIM model for the dataset's classes, loading `weights` where given."""
        model = DEIMDetectionModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1)
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
        elif isinstance(self.args.pretrained, str) and self.args.pretrained:
            load_hgnetv2_pretrained(*backbone_layers(model), self.args.pretrained)
            LOGGER.info(f"Backbone initialised from ImageNet weights '{self.args.pretrained}'")
        else:
            LOGGER.info(
                "Backbone starts from random weights; for the authors' ImageNet start pass "
                "pretrained=path/to/PPHGNetV2_B<k>_stage1.pth"
            )
        return model

    def get_validator(self) -> RTDETRValidator:
        """Ultralytics' RT-DETR validator, given only the settings it knows."""
        return RTDETRValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(ultralytics_args(self.args)), _callbacks=self.callbacks
        )
