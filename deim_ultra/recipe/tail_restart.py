"""The no-aug tail restarts from the best state of the stages before it, as the authors' solver does.

The authors' trainer keeps the full training state (model, EMA, optimizer) of the epoch with the best val mAP50-95
before the tail, reloads it when the tail starts, and reloads it again after every tail epoch that does not improve
on the best mAP so far; after such a reload the next epoch is not compared (it becomes the new reference). Their code
also lowers the EMA decay at each reload, but their EMA's decay function captured the initial value, so that change
has no effect and is not reproduced.

The decision is a pure function of the per-epoch mAPs (`restore_before`), which the trainer reads back from
results.csv, so a resumed run makes the same decisions; the state itself is kept at full precision in
`weights/best_stage1.pt` (Ultralytics' own checkpoints keep only a half-precision EMA).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ultralytics.utils import LOGGER, RANK, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from deim_ultra.checkpoints.atomic import save_atomically

if TYPE_CHECKING:
    from deim_ultra.train import DEIMTrainer

BEST_STAGE1 = "best_stage1.pt"
MAP_COLUMN = "metrics/mAP50-95(B)"


def restore_before(epoch: int, maps: Sequence[float], tail_start: int) -> bool:
    """Whether training restarts from the best pre-tail state before 0-based `epoch`.

    Args:
        epoch (int): The epoch about to start.
        maps (Sequence[float]): Val mAP50-95 after each epoch 0 .. epoch - 1, in order.
        tail_start (int): First epoch of the no-aug tail (`e2`).

    Returns:
        (bool): True at `tail_start`, and at a later tail epoch when the previous one did not beat (strictly) the
            reference: the best pre-tail mAP, then the last epoch that beat it or followed a restart.
    """
    if epoch < tail_start or tail_start == 0:
        return False
    if epoch == tail_start:
        return True
    reference, restore = max(maps[:tail_start]), False
    for value in maps[tail_start:epoch]:
        restore = reference is not None and value <= reference
        reference = None if restore else value
    return restore


def save_state(trainer, path: Path) -> None:
    """Write the trainer's model, EMA (with its update count) and optimizer state to `path`, atomically."""
    state = {
        "model": unwrap_model(trainer.model).state_dict(),
        "ema": trainer.ema.ema.state_dict(),
        "updates": trainer.ema.updates,
        "optimizer": trainer.optimizer.state_dict(),
        "epoch": trainer.epoch,
    }
    save_atomically(state, path)


def load_state(trainer, path: Path) -> int:
    """Load a `save_state` file into the trainer's model, EMA and optimizer; return the epoch it was saved after."""
    state = torch.load(path, map_location=trainer.device, weights_only=True)
    unwrap_model(trainer.model).load_state_dict(state["model"])
    trainer.ema.ema.load_state_dict(state["ema"])
    trainer.ema.updates = state["updates"]
    trainer.optimizer.load_state_dict(state["optimizer"])
    return state["epoch"]


def epoch_maps(trainer: DEIMTrainer) -> list[float]:
    """Val mAP50-95 of every finished epoch, from results.csv (so a resumed run sees the epochs before it)."""
    return [float(v) for v in trainer.read_results_csv().get(MAP_COLUMN, [])]


def keep_best_stage1(trainer: DEIMTrainer) -> None:
    """Before the tail, save the full state of an epoch whose val mAP50-95 beats every earlier one.

    Only the process that validates writes it; under DDP the others read it at the restart, after the epoch-end
    synchronisation has passed.
    """
    if not trainer.args.val or trainer.epoch >= trainer.policy[2] or RANK not in {-1, 0}:
        return
    maps = epoch_maps(trainer)
    if maps and maps[-1] > max(maps[:-1], default=float("-inf")):
        save_state(trainer, trainer.wdir / BEST_STAGE1)


def restart_tail(trainer: DEIMTrainer) -> None:
    """Load the best pre-tail state at the start of the tail and after a tail epoch that did not improve."""
    if trainer.epoch < trainer.policy[2]:
        return
    path = trainer.wdir / BEST_STAGE1
    if not trainer.args.val or not path.is_file():
        if trainer.epoch == trainer.policy[2]:
            LOGGER.warning(
                f"DEIM schedule: the no-aug tail continues from the last epoch, not from the best one before it, "
                f"because {'val=False validates no epoch' if not trainer.args.val else f'{path} is missing'}"
            )
        return
    if restore_before(trainer.epoch, epoch_maps(trainer), trainer.policy[2]):
        best = load_state(trainer, path)
        LOGGER.info(
            f"{colorstr('DEIM schedule:')} epoch {trainer.epoch + 1} restarts from the state after epoch {best + 1}, "
            f"the best val mAP50-95 before the no-aug tail"
        )
