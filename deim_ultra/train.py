"""`DEIMTrainer`: Ultralytics' RT-DETR trainer running DEIM's recipe.

On top of Ultralytics' loop it adds, when a recipe is active (`recipe=n|s|m|l|x`, chosen from the model YAML by
default): the stage schedule of Dense O2O (data-aug warmup, mosaic + batch mixup, plain augmentation, no-aug tail),
FlatCosine learning rate per iteration, AdamW with the backbone's own lr and no weight decay on norms and biases,
gradient clipping, EMA warm-up and multi-scale batches. Every piece is derived from the epoch and iteration
counters, so `resume=True` continues in the right stage with the right lr. `recipe=none` keeps Ultralytics'
RT-DETR training (its augmentation, optimizer and lr schedule) with the DEIM criterion: the baseline recipe.
"""

from __future__ import annotations

import random
from copy import copy
from functools import partial
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from ultralytics.cfg import cfg2dict
from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.rtdetr.val import RTDETRDataset
from ultralytics.utils import LOCAL_RANK, LOGGER, RANK, WORLD_SIZE, colorstr
from ultralytics.utils.patches import override_configs
from ultralytics.utils.torch_utils import torch_distributed_zero_first, unwrap_model

from deim_ultra.cfg import DEIM_CFG_DICT, DEIM_DEFAULTS, check_setting_types, deim_arg, ultralytics_args
from deim_ultra.checkpoints.atomic import drop_results_after, publish, strip_atomically
from deim_ultra.checkpoints.backbone import init_backbone, is_backbone_file
from deim_ultra.checkpoints.read import check_pretrained_model, check_resumable
from deim_ultra.checkpoints.safety import check_checkpoint
from deim_ultra.data.audit import DatasetError, LabelAudit, check_training_set, with_one_based_hint
from deim_ultra.data.batch_transforms import batch_mixup, resize_batch
from deim_ultra.data.coco_dataset import COCODEIMDataset, COCORTDETRDataset, is_coco_split
from deim_ultra.data.coco_layout import coco_data
from deim_ultra.data.copyblend import batch_copyblend
from deim_ultra.data.dataset import DEIMDataset, rtdetr_style_dataset
from deim_ultra.data.stages import stage_augmentation
from deim_ultra.distributed import in_process_group
from deim_ultra.loss.criterion import check_union_set
from deim_ultra.nn.frozen_norm import freeze_batchnorm
from deim_ultra.nn.tasks import DEIMDetectionModel, build_detection_model
from deim_ultra.nonfinite import NonFiniteSteps, restore_buffers
from deim_ultra.official_names import official_namer
from deim_ultra.random_streams import untouched_random_streams
from deim_ultra.recipe import hooks as recipe_hooks
from deim_ultra.recipe.optim import build_adamw, official_param_groups, param_groups
from deim_ultra.recipe.schedule import check_policy, ema_decay, multiscale_sizes
from deim_ultra.recipe.settings import recipe_overrides
from deim_ultra.recipe.tables import RECIPES
from deim_ultra.val import DEIMValidator


def on_train_epoch_end(trainer: DEIMTrainer) -> None:
    """Report what this epoch skipped: broken training images, and optimizer steps with a non-finite loss/gradient."""
    skipped = trainer.train_audit.skipped if trainer.train_audit else 0
    if skipped:
        LOGGER.warning(f"Epoch {trainer.epoch + 1}: {skipped} broken training images skipped (listed at the scan)")
    summary = trainer.nonfinite.epoch_summary()
    if summary:
        LOGGER.warning(f"Epoch {trainer.epoch + 1}: {summary}")


class DEIMTrainer(RTDETRTrainer):
    """Trains DEIM models (and Ultralytics RT-DETR models) with DEIM's criterion and, optionally, its recipe."""

    def __init__(self, cfg: dict = DEIM_CFG_DICT, overrides: dict | None = None, _callbacks: dict | None = None):
        """DEIM's settings and the recipe's defaults join Ultralytics' before it validates them; the recipe's hooks."""
        # Ultralytics' DDP workers rebuild the trainer from its pickled args and callbacks with Ultralytics' own
        # default cfg: DEIM's defaults are merged in here, and callbacks are added only where absent.
        cfg = {**DEIM_CFG_DICT, **cfg2dict(cfg)}
        check_setting_types(overrides or {})
        overrides = recipe_overrides(overrides or {})
        check_union_set(*(deim_arg({**cfg, **overrides}, k) for k in ("union_set", "loss_fgl", "loss_ddf")))  # early
        super().__init__(cfg=cfg, overrides=overrides, _callbacks=_callbacks)
        if LOCAL_RANK != -1:  # one of WORLD_SIZE processes started by torchrun: on CPU Ultralytics counts none, and
            self.world_size = WORLD_SIZE  # across nodes its device count is this node's share only
        self.stage = None
        self.batch_in_epoch = 0
        self.policy = None
        self.data_policy = None
        self.warmup_iters = 0
        self.matcher_change_epoch: int | None = None
        self.scale_rng = random.Random(self.args.seed)
        self.mixup_rng = torch.Generator().manual_seed(self.args.seed)
        self.copyblend_rng = torch.Generator().manual_seed(self.args.seed + 1)  # leaves mixup's draws as they were
        self.nonfinite = NonFiniteSteps(self.args.nonfinite_patience)
        self.batch_files: tuple[str, ...] = ()
        self.train_audit: LabelAudit | None = None
        if self.recipe_active and self.args.policy_epochs is not None:
            if len(self.args.policy_epochs) != 3:
                raise ValueError(f"policy_epochs={self.args.policy_epochs}: give three epochs [e0, e1, e2]")
            check_policy(tuple(self.args.policy_epochs), self.args.epochs)
        self.applied_loss: torch.Tensor | None = None  # the loss of the last step applied, see `optimizer_step`
        callbacks = [("on_train_epoch_end", on_train_epoch_end)] + (
            recipe_hooks.CALLBACKS if self.recipe_active else []
        )
        for event, callback in callbacks:
            if callback not in self.callbacks[event]:
                self.add_callback(event, callback)

    def _setup_ddp(self) -> None:
        """Ultralytics' set-up needs an accelerator: on CPU, a gloo process group (see `deim_ultra.distributed`)."""
        # On CPU the trainer counts one process until `_build_train_pipeline`: Ultralytics' `_setup_train` would wrap
        # the model for a device index, which DistributedDataParallel refuses for a CPU model.
        if self.device.type != "cpu":
            return super()._setup_ddp()
        if self.batch_size % self.world_size:  # Ultralytics refuses this for GPUs in select_device
            fits = self.world_size * max(1, self.batch_size // self.world_size)
            raise ValueError(
                f"batch={self.batch_size} does not split over {self.world_size} processes; each would train on "
                f"{self.batch_size // self.world_size} image(s). Fix: batch={fits}"
            )
        dist.init_process_group(backend="gloo", rank=RANK, world_size=self.world_size)
        self.world_size = 1
        # No AMP on CPU: Ultralytics' check_amp says so on rank 0 only and broadcasts it for accelerators, so without
        # this the other processes would train under CPU autocast.
        self.args.amp = False
        return None

    def check_resume(self, overrides: dict) -> None:
        """Ultralytics rebuilds only its own settings: DEIM settings a checkpoint predates resume at their defaults."""
        super().check_resume(overrides)
        for key, value in DEIM_DEFAULTS.items():
            if key not in vars(self.args):
                setattr(self.args, key, value)
        if self.resume:  # Ultralytics' final strip dropped a finished run's optimizer and DEIM settings
            check_resumable(torch.load(self.args.resume, map_location="cpu", weights_only=False), self.args.resume)

    def resume_training(self, ckpt: dict | None) -> None:
        """results.csv cut back to the epochs `ckpt` holds: the tail restart reads its per-epoch mAPs."""
        # An epoch whose row was written before its checkpoint is trained again, and would otherwise have two rows.
        super().resume_training(ckpt)
        if ckpt is None or not self.resume or RANK not in {-1, 0}:
            return
        dropped = drop_results_after(self.csv, self.start_epoch)
        if dropped:
            LOGGER.info(f"{self.csv}: {dropped} row(s) after epoch {self.start_epoch} removed, as that epoch resumes")

    @property
    def recipe_active(self) -> bool:
        """Whether DEIM's schedule runs (any recipe but `none`)."""
        return self.args.recipe != "none"

    def get_dataset(self) -> dict:
        """Ultralytics reads no COCO json (`deim_ultra.data.coco_layout`), and its errors name no file: DatasetError."""
        data = coco_data(self.args.data)
        if data is None:
            try:
                return super().get_dataset()
            except RuntimeError as e:  # Ultralytics wraps every dataset problem in a RuntimeError
                raise DatasetError(str(e)) from e
        if self.args.single_cls:  # as Ultralytics' get_dataset does; COCO's evaluation then ignores categories
            LOGGER.info("Overriding class names with single class.")
            data.update(names={0: "item"}, nc=1, category_ids=None)
        return data

    def set_model_attributes(self):
        """Checkpoints and exports carry the COCO category ids (None for YOLO labels), to map predictions back."""
        super().set_model_attributes()
        self.model.category_ids = self.data.get("category_ids")

    def get_model(self, cfg: str | dict | None = None, weights: nn.Module | None = None, verbose: bool = True):
        """Ultralytics builds RT-DETR layers only: build DEIM's, start from ImageNet weights, freeze norms if asked."""
        model = build_detection_model(
            cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1, o2m=self.args.o2m
        )
        model = self.set_model_names_for_load(model)
        if weights:
            check_pretrained_model(weights, self.args.pretrained)
            model.load(weights)
        elif isinstance(model, DEIMDetectionModel):
            init_backbone(model, self.args.pretrained)
        if self.args.freeze_norm:  # after loading, so the frozen layers hold the weights the run starts from
            frozen = sum(freeze_batchnorm(m) for m in model.backbone_modules())
            LOGGER.info(f"freeze_norm: {frozen} backbone BatchNorm layers frozen (fixed statistics and affine)")
        return model

    def setup_model(self):
        """Ultralytics opens any `pretrained` path as a `.pt` checkpoint: a `.pth` is the backbone's file instead."""
        if (
            isinstance(self.args.pretrained, str)
            and Path(self.args.pretrained).suffix == ".pt"
            and Path(self.args.pretrained).is_file()
        ):
            check_checkpoint(self.args.pretrained)  # Ultralytics unpickles it with weights_only=False
        if isinstance(self.model, nn.Module) or self.resume or not is_backbone_file(self.args.pretrained):
            return super().setup_model()
        if not str(self.model).endswith((".yaml", ".yml")):
            raise ValueError(
                f"pretrained={self.args.pretrained} initialises the backbone of a model built from a YAML, but "
                f"model={self.model} already holds weights. Fix: train model=deim-<size>.yaml with it, or drop it"
            )
        self.model = self.get_model(cfg=str(self.model), weights=None, verbose=RANK == -1)
        return None

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        """DEIM's staged training set, COCO json splits, and the training set's audit (`deim_ultra.data.audit`)."""
        # Ultralytics' RT-DETR dataset stays for validation and under recipe=none.
        coco = is_coco_split(self.data, img_path)
        if mode == "train" and self.recipe_active:
            dataset_class = COCODEIMDataset if coco else DEIMDataset
        else:
            dataset_class = COCORTDETRDataset if coco else RTDETRDataset
        if mode != "train":
            return rtdetr_style_dataset(dataset_class, img_path, self.args, self.data, mode, batch, self.args.split)
        try:
            dataset = rtdetr_style_dataset(dataset_class, img_path, self.args, self.data, mode, batch, "train")
        except RuntimeError as e:
            if "No valid images found" not in str(e):  # Ultralytics' scan kept no image; anything else is not data
                raise
            raise with_one_based_hint(e, img_path, self.data["nc"]) from e
        self.train_audit = check_training_set(dataset, img_path, self.data["nc"])
        return dataset

    def get_validator(self) -> DEIMValidator:
        """Ultralytics' RT-DETR validator reads no COCO json and refuses DEIM's settings: DEIM's, with its own."""
        return DEIMValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(ultralytics_args(self.args)), _callbacks=self.callbacks
        )

    def validate(self):
        """Validation leaves the random streams to training (`deim_ultra.random_streams`): same batches, any `val`."""
        with untouched_random_streams(self.device):
            return super().validate()

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """The recipe's AdamW with the authors' parameter groups, `momentum` as beta1; Ultralytics' with recipe=none."""
        model = unwrap_model(model)  # the groups are found by the model's own names, not the DDP wrapper's
        if not self.recipe_active:
            return super().build_optimizer(model, name, lr, momentum, decay, iterations)
        if isinstance(model, DEIMDetectionModel):
            groups = official_param_groups(
                model, official_namer(model), self.args.recipe, lr, self.args.backbone_lr, decay
            )
        else:
            groups = param_groups(model, lr, self.args.backbone_lr, decay, backbone=model.backbone_modules())
        optimizer = build_adamw(groups, lr=lr, weight_decay=decay, betas=(momentum, 0.999))
        LOGGER.info(
            f"{colorstr('optimizer:')} AdamW(lr={lr}, backbone lr={self.args.backbone_lr}, betas=({momentum}, 0.999), "
            f"weight_decay={decay}; groups {', '.join(g['name'] for g in groups)})"
        )
        return optimizer

    def _build_train_pipeline(self):
        """The recipe steps every batch at its own weight decay (nbs = batch); CPU DDP wraps here (see `_setup_ddp`)."""
        # nbs is the batch size in use, after AutoBatch or an OOM halving: Ultralytics then neither accumulates
        # gradients nor rescales the weight decay. The CPU model is wrapped without device ids.
        if self.device.type == "cpu" and in_process_group() and not isinstance(self.model, DDP):
            self.world_size = dist.get_world_size()
            self.model = DDP(self.model, find_unused_parameters=True)
        if self.recipe_active:
            self.args.nbs = self.batch_size
        super()._build_train_pipeline()

    def _setup_scheduler(self):
        """The recipe sets the lr per iteration (FlatCosine); the epoch scheduler only records initial_lr."""
        # Ultralytics calls this again each time `time=` re-estimates the epochs, so the policy is (re)placed here.
        if not self.recipe_active:
            return super()._setup_scheduler()
        recipe_hooks.set_policy(self)
        self.lf = recipe_hooks.constant_lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    def _close_dataloader_mosaic(self):
        """Under a recipe `close_mosaic` moved the end of Dense O2O (`set_policy`); this switch would replace stages."""
        if not self.recipe_active:
            super()._close_dataloader_mosaic()

    def _setup_train(self):
        """The recipe's EMA warm-up replaces Ultralytics' decay ramp."""
        super()._setup_train()
        if self.recipe_active:
            self.ema.decay = partial(ema_decay, decay=self.args.ema_decay, tau=self.args.ema_tau)

    def save_model(self) -> bool:
        """Ultralytics writes checkpoints in place: a staging folder, renamed in, so a kill mid-save loses nothing."""
        wdir, last, best = self.wdir, self.last, self.best
        staging = wdir.with_name(f".{wdir.name}.saving")
        self.wdir, self.last, self.best = staging, staging / last.name, staging / best.name
        try:
            saved = super().save_model()
        finally:
            self.wdir, self.last, self.best = wdir, last, best
        publish(staging, wdir)
        return saved

    def final_eval(self) -> None:
        """Ultralytics strips last.pt and best.pt in place: here atomically; no final validation in CPU DDP.

        Repeats `BaseTrainer.final_eval` (Ultralytics 8.4.190, ultralytics/engine/trainer.py lines 1005-1022;
        tests/test_upstream_copies.py notices a change there) because there `strip_optimizer(self.last)` rewrites the
        file in place. Changed: the atomic strip, and no final validation in CPU DDP processes.
        """
        with torch_distributed_zero_first(LOCAL_RANK):  # strip on the first process; the others wait
            if RANK in {-1, 0}:
                ckpt = strip_atomically(self.last) if self.last.exists() else {}
                if self.best.exists():
                    strip_atomically(self.best, updates={"train_results": ckpt.get("train_results")})
        if not self.best.exists():
            return
        if self.device.type == "cpu" and RANK != -1:  # Ultralytics' validator takes an accelerator in DDP processes
            if RANK == 0:
                LOGGER.warning(
                    f"Final validation of {self.best} skipped in CPU DDP processes (each epoch was validated). "
                    f"Fix: deim val model={self.best} data={self.args.data}"
                )
            return
        LOGGER.info(f"\nValidating {self.best}...")
        self.validator.args.plots = self.args.plots
        self.validator.args.compile = False
        self.metrics = self.validator(model=self.best)
        self.metrics.pop("fitness", None)
        self.epoch += 1  # Ultralytics logs the best model's metrics as epoch `epochs + 1`
        self.run_callbacks("on_fit_epoch_end")
        self.epoch -= 1

    def preprocess_batch(self, batch: dict) -> dict:
        """The stage's batch transforms (`deim_ultra.data.stages`) replace Ultralytics' multi-scale."""
        self.batch_files = tuple(batch.get("im_file", ()))
        if not self.recipe_active:
            return super().preprocess_batch(batch)
        with override_configs(self.args, {"multi_scale": 0.0}):  # DEIM's multi-scale below replaces Ultralytics'
            batch = super().preprocess_batch(batch)
        augmentation = stage_augmentation(self.stage)
        if augmentation.mosaic:
            batch = batch_mixup(batch, generator=self.mixup_rng, p=self.args.mixup)
        copyblend = augmentation.mosaic or (self.stage == "aug" and RECIPES[self.args.recipe].copyblend_in_aug)
        if self.args.copyblend and copyblend and batch.get("mixup", 1.0) == 1.0:  # DEIMv2: where mixup did not fire
            batch = batch_copyblend(batch, generator=self.copyblend_rng, p=self.args.copyblend)
        if augmentation.multi_scale:  # one size per batch; [imgsz] alone when multi-scale is off
            sizes = multiscale_sizes(self.args.imgsz, self.args.base_size_repeat, self.args.multi_scale)
            batch = resize_batch(batch, self.scale_rng.choice(sizes))
        return batch

    def optimizer_step(self):
        """A step whose loss or gradient is not finite is skipped (`deim_ultra.nonfinite`), and the recipe's clip.

        Repeats `BaseTrainer.optimizer_step` (Ultralytics 8.4.190, ultralytics/engine/trainer.py lines 909-920;
        tests/test_upstream_copies.py notices a change there) because the check needs the gradient norm that
        Ultralytics' clipping computes and drops. Changed: the clip is the recipe's `clip_max_norm`, or
        Ultralytics' fixed 10.0 with `recipe=none`; the skip and the EMA-buffer restore.
        """
        self.scaler.unscale_(self.optimizer)
        max_norm = self.args.clip_max_norm if self.recipe_active else 10.0
        foreach = False if self.device.type == "npu" else None  # as upstream: NPUs clip without foreach kernels
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=max_norm, foreach=foreach)
        judged = None if self.scaler.is_enabled() else norm  # an enabled GradScaler skips overflowing steps itself
        if self.nonfinite.skip(self.loss, judged, self.batch_files, f"epoch {self.epoch + 1}"):
            self.scaler.update()  # closes this step's unscale_, so the next step may unscale again
            self.optimizer.zero_grad()
            # Ultralytics' end-of-epoch check reads the last batch's loss and, if it is not finite, reloads last.pt
            # and trains the epoch again; a skipped batch changed nothing, so it must not count as the last one.
            self.loss = self.applied_loss
            if self.ema:
                restore_buffers(unwrap_model(self.model), self.ema.ema)
            self.nonfinite.check_patience()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        self.applied_loss = self.loss
        if self.ema:
            self.ema.update(self.model)
