"""Skipping optimizer steps whose loss or gradient is not finite, and stopping a run that keeps producing them.

A NaN or Inf that reaches `optimizer.step()` writes NaN into every weight it touches, and from there into the EMA and
`last.pt`. The trainer asks `NonFiniteSteps.skip` before each step: a non-finite step is dropped (gradients zeroed,
weights and EMA untouched), logged with the images of its batch, and counted; after `patience` consecutive skips
`check_patience` stops the run with `DivergedError`, leaving the checkpoints of the last finished epoch as they were.
The forward pass of a skipped batch has already pushed its NaN into BatchNorm's running statistics, so
`restore_buffers` takes those back from the EMA, which never saw them.

Under fp16 AMP, Ultralytics' GradScaler already skips steps whose scaled gradients overflow and lowers its scale (a
few such steps at the start are normal), so gradients are judged here only when no scaler is active; a non-finite
loss always counts, since the criterion computes it in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from ultralytics.utils import LOGGER

from deim_ultra.distributed import any_process


def restore_buffers(model: nn.Module, reference: nn.Module) -> None:
    """Copy into `model` each floating buffer that is not finite there, from the same-named buffer of `reference`."""
    source = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all()) and name in source:
            buffer.copy_(source[name])


class DivergedError(RuntimeError):
    """Training produced non-finite losses or gradients for `patience` optimizer steps in a row."""


@dataclass
class NonFiniteSteps:
    """Counts skipped optimizer steps and decides when training has diverged.

    Attributes:
        patience: consecutive skipped steps after which training stops (0: never stop).
        consecutive: skipped steps since the last finite one.
        in_epoch: skipped steps in the current epoch (reset by `epoch_summary`).
        total: skipped steps in the whole run.
        last: what was non-finite ("loss" or "gradient"), where, and the batch's images, for the last skip.
    """

    patience: int
    consecutive: int = 0
    in_epoch: int = 0
    total: int = 0
    last: tuple[str, str, str] = ("", "", "")

    def skip(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, files: Sequence[str], where: str) -> bool:
        """Whether this step must be skipped; logs it (call `check_patience` once the skip is done).

        Args:
            loss: () the step's total loss.
            grad_norm: () total gradient norm before clipping, or None where the AMP scaler judges gradients.
            Under DDP the decision is every process's (`deim_ultra.distributed.any_process`).
            files: image files of the step's batch, named in the warning.
            where: position for the message, e.g. "epoch 3".
        """
        bad_loss = not bool(torch.isfinite(loss).all())
        bad_grad = grad_norm is not None and not bool(torch.isfinite(grad_norm))
        if not any_process(bad_loss or bad_grad, loss.device):  # under DDP every process skips, or none does
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.in_epoch += 1
        self.total += 1
        names = ", ".join(str(f) for f in files)
        if bad_loss:
            what = f"loss {loss.sum().item()}"
        elif bad_grad:
            what = f"gradient norm {grad_norm.item()}"
        else:
            what = "loss or gradient in another process"
        self.last = (what.split()[0], where, names)
        LOGGER.warning(
            f"Non-finite {what} at {where}: optimizer step skipped, weights and EMA unchanged "
            f"({self.consecutive} in a row, {self.total} in this run). Batch images: {names}"
        )
        return True

    def check_patience(self) -> None:
        """Raise `DivergedError` when the last `patience` steps were all skipped."""
        if not self.patience or self.consecutive < self.patience:
            return
        what, where, names = self.last
        raise DivergedError(
            f"Training diverged: {self.consecutive} optimizer steps in a row had a non-finite {what} (last at {where}, "
            f"images {names}). No step was applied, so the weights are those of the last finite step and last.pt "
            "holds the last finished epoch. Fix: check the images named above, then train from last.pt with a lower "
            "lr0 or amp=False (resume=True would keep the run's own); nonfinite_patience sets how many skips in a "
            "row are tolerated"
        )

    def epoch_summary(self) -> str | None:
        """A line for the end of an epoch that skipped steps (None if none were); restarts the count for the next."""
        count, self.in_epoch = self.in_epoch, 0
        return f"{count} optimizer step(s) skipped this epoch for a non-finite loss or gradient" if count else None
