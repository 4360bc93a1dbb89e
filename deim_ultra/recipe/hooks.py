"""The recipe's per-epoch and per-iteration behaviour, as callbacks on Ultralytics' trainer events.

`DEIMTrainer` adds `CALLBACKS` under a recipe; each reads and sets the trainer's recipe state: `policy` (the stage
boundaries), `data_policy` (the same with e2 moved to the recipe's `aug_end`, when it ends the augmentation
earlier), `stage`, `warmup_iters`, `matcher_change_epoch` and `batch_in_epoch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ultralytics.utils import LOGGER, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from deim_ultra.recipe.schedule import (
    close_mosaic_policy,
    empty_stages,
    flat_cosine_factor,
    scale_epoch,
    scale_policy,
    stage_at,
)
from deim_ultra.recipe.tables import RECIPES
from deim_ultra.recipe.tail_restart import keep_best_stage1, restart_tail

if TYPE_CHECKING:
    from deim_ultra.train import DEIMTrainer


def set_policy(trainer: DEIMTrainer) -> None:
    """Place the stage boundaries and the lr warmup for the current number of epochs."""
    recipe = RECIPES[trainer.args.recipe]
    scaled = scale_policy(recipe.policy_epochs, recipe.epochs, trainer.epochs)
    policy = (
        tuple(trainer.args.policy_epochs)
        if trainer.args.policy_epochs
        else close_mosaic_policy(scaled, trainer.epochs, trainer.args.close_mosaic)
    )
    # The recipe's 2000 iterations are about 2 COCO epochs; on a small dataset the lr warmup would outlast the
    # whole run, so by default it ends with the data-aug warmup at the latest.
    recipe_iters = min(recipe.warmup_iters, policy[0] * len(trainer.train_loader))
    trainer.warmup_iters = trainer.args.warmup_iters if trainer.args.warmup_iters is not None else recipe_iters
    aug_end = scale_epoch(recipe.aug_end, recipe.epochs, trainer.epochs)
    if aug_end is None or trainer.args.policy_epochs:
        trainer.data_policy = policy
    else:  # the augmentation ends before the tail: between e1 and e2
        trainer.data_policy = (*policy[:2], min(max(aug_end, policy[1]), policy[2]))
    trainer.matcher_change_epoch = (
        trainer.args.matcher_change_epoch
        if trainer.args.matcher_change_epoch is not None
        else scale_epoch(recipe.matcher_change, recipe.epochs, trainer.epochs)
    )
    if policy != trainer.policy:
        LOGGER.info(
            f"{colorstr('DEIM schedule:')} recipe {trainer.args.recipe}, policy epochs {list(policy)} of "
            f"{trainer.epochs}: warmup < {policy[0]} <= Dense O2O < {policy[1]} <= augment < {policy[2]} <= "
            f"no-aug tail; lr warmup {trainer.warmup_iters} iterations"
            + (f"; augmentation ends at {trainer.data_policy[2]}" if trainer.data_policy[2] != policy[2] else "")
            + (
                f"; matcher cost -p*IoU^4 from epoch {trainer.matcher_change_epoch + 1}"
                if trainer.matcher_change_epoch is not None
                else ""
            )
            + (
                f" (close_mosaic={trainer.args.close_mosaic} moved e1 from {scaled[1]})"
                if policy[1] != scaled[1] and not trainer.args.policy_epochs
                else ""
            )
        )
        if trainer.matcher_change_epoch is not None and trainer.matcher_change_epoch >= trainer.epochs:
            LOGGER.warning(
                f"DEIM schedule: the matcher change (epoch {trainer.matcher_change_epoch + 1}) falls after the run's "
                f"{trainer.epochs} epochs, so it never happens; set matcher_change_epoch (0-based) to place it"
            )
        empty = empty_stages(policy, trainer.epochs)
        if empty:
            LOGGER.warning(
                f"DEIM schedule: none of the {trainer.epochs} epoch(s) falls to stage(s) {', '.join(empty)}; set "
                "policy_epochs=[e0,e1,e2] to place them, or train longer"
            )
    trainer.policy = policy


def apply_stage(trainer: DEIMTrainer) -> None:
    """Put the training set in the stage of the current epoch; rebuild the loader's workers when it changes."""
    stage = stage_at(trainer.epoch, trainer.data_policy)
    if stage == trainer.stage:
        return
    trainer.stage = stage
    trainer.train_loader.dataset.set_stage(stage)
    trainer.train_loader.reset()  # workers hold copies of the dataset: restart them with the new pipeline
    LOGGER.info(f"{colorstr('DEIM schedule:')} epoch {trainer.epoch + 1} enters stage '{stage}'")


def apply_matcher(trainer: DEIMTrainer) -> None:
    """DEIMv2's matcher change: from `matcher_change_epoch` on, match by -p * IoU^4 (`quality_matching`)."""
    model = unwrap_model(trainer.model)
    if getattr(model, "criterion", None) is None:  # built at the first loss (RT-DETR models: no attribute yet)
        model.criterion = model.init_criterion()
    change = trainer.matcher_change_epoch
    quality = change is not None and trainer.epoch >= change
    if quality and not model.criterion.quality_matching:
        LOGGER.info(f"{colorstr('DEIM schedule:')} epoch {trainer.epoch + 1} matches by -p*IoU^4 from now on")
    model.criterion.quality_matching = quality


def apply_lr(trainer: DEIMTrainer) -> None:
    """FlatCosine: set every parameter group's lr for the current iteration."""
    iteration = trainer.epoch * len(trainer.train_loader) + trainer.batch_in_epoch
    factor = flat_cosine_factor(
        iteration, len(trainer.train_loader), trainer.policy, trainer.warmup_iters, trainer.args.lrf
    )
    for group in trainer.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def constant_lr(_: int) -> float:
    """Ultralytics' per-epoch lr factor, neutralised: `apply_lr` sets the lr every iteration."""
    return 1.0


def on_train_epoch_start(trainer: DEIMTrainer) -> None:
    """Restart from the best pre-tail state where the tail asks for it, switch the data pipeline when the epoch
    enters a new stage, and restart the epoch's iteration count."""
    trainer.batch_in_epoch = 0
    restart_tail(trainer)
    apply_stage(trainer)
    apply_matcher(trainer)


def on_fit_epoch_end(trainer: DEIMTrainer) -> None:
    """Keep the state of the best validated epoch before the no-aug tail."""
    keep_best_stage1(trainer)


def on_train_batch_start(trainer: DEIMTrainer) -> None:
    """Set the FlatCosine learning rate of this iteration."""
    apply_lr(trainer)
    trainer.batch_in_epoch += 1


CALLBACKS = [
    ("on_train_epoch_start", on_train_epoch_start),
    ("on_train_batch_start", on_train_batch_start),
    ("on_fit_epoch_end", on_fit_epoch_end),
]
