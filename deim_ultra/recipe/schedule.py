"""DEIM's training recipe and schedule as pure functions of the epoch or iteration.

A run has three policy epochs `(e0, e1, e2)` splitting it into four stages: data-augmentation warmup (`< e0`),
Dense O2O with mosaic and mixup (`[e0, e1)`), plain augmentation (`[e1, e2)`) and the no-augmentation tail
(`>= e2`). The same epochs drive the FlatCosine learning rate (flat until `e1`, cosine down to `e2`) and the
multi-scale window (until `e2`).
"""

from __future__ import annotations

import math

from deim_ultra.recipe.tables import Policy

STAGES = ("warmup", "dense_o2o", "aug", "no_aug")


def check_policy(policy: Policy, epochs: int) -> None:
    """Raise ValueError unless `0 <= e0 <= e1 <= e2 <= epochs`."""
    e0, e1, e2 = policy
    if not 0 <= e0 <= e1 <= e2 <= epochs:
        raise ValueError(f"policy epochs {policy} must satisfy 0 <= e0 <= e1 <= e2 <= epochs ({epochs})")


def scale_policy(policy: Policy, recipe_epochs: int, epochs: int) -> Policy:
    """Place a recipe's policy epochs proportionally in a run of a different length.

    Rule: each boundary is scaled by `epochs / recipe_epochs` and rounded half up, `s = floor(e * epochs /
    recipe_epochs + 1/2)` (computed in integers, so exact). The results are then clamped, last boundary first:
    `e2 = clamp(s2, 1, cap)`, `e0 = clamp(s0, 1, e2)`, `e1 = clamp(s1, e0, e2)`, where `cap = epochs - 1` when the
    recipe has a no-aug tail (`e2 < recipe_epochs`) and the run has at least 2 epochs, else `cap = epochs`. Hence
    `0 < e0 <= e1 <= e2 <= epochs` for every `epochs >= 1`, at least one data-aug warmup epoch, and at least one tail
    epoch whenever the recipe has a tail and `epochs >= 2`. When `epochs == recipe_epochs` a recipe policy comes back
    unchanged. Example: DEIM-S `(4, 64, 120)` of 132 epochs fine-tuned for 24 epochs gives `(1, 12, 22)`:
    4*24/132 = 0.73 -> 1, 64*24/132 = 11.64 -> 12, 120*24/132 = 21.82 -> 22, leaving a 2-epoch tail.

    Args:
        policy (Policy): The recipe's `(e0, e1, e2)`, `0 <= e0 <= e1 <= e2 <= recipe_epochs`.
        recipe_epochs (int): Total epochs of the recipe (tail included).
        epochs (int): Total epochs of this run, >= 1.

    Returns:
        (Policy): The scaled `(e0, e1, e2)`.
    """
    if recipe_epochs < 1 or epochs < 1:
        raise ValueError(f"recipe_epochs ({recipe_epochs}) and epochs ({epochs}) must be >= 1")
    check_policy(policy, recipe_epochs)
    s0, s1, s2 = ((2 * e * epochs + recipe_epochs) // (2 * recipe_epochs) for e in policy)
    cap = epochs - 1 if policy[2] < recipe_epochs and epochs >= 2 else epochs
    e2 = min(max(s2, 1), cap)
    e0 = min(max(s0, 1), e2)
    e1 = min(max(s1, e0), e2)
    return e0, e1, e2


def scale_epoch(epoch: int | None, recipe_epochs: int, epochs: int) -> int | None:
    """A recipe's epoch (e.g. DEIMv2's matcher change) placed in a run of `epochs` by `scale_policy`'s rounding
    (half up); None stays None. Example: DEIMv2-N's 136 of 160 in a 32-epoch run is 27."""
    return None if epoch is None else (2 * epoch * epochs + recipe_epochs) // (2 * recipe_epochs)


def stage_at(epoch: int, policy: Policy) -> str:
    """The stage of 0-based `epoch`: 'warmup' (< e0), 'dense_o2o' ([e0, e1)), 'aug' ([e1, e2)) or 'no_aug' (>= e2)."""
    return STAGES[sum(epoch >= e for e in policy)]


def close_mosaic_policy(policy: Policy, epochs: int, close_mosaic: int) -> Policy:
    """`policy` with Dense O2O (mosaic and mixup) ended at least `close_mosaic` epochs before the end, which is what
    Ultralytics' `close_mosaic` asks: `e1 = clamp(epochs - close_mosaic, e0, e1)`. The data-aug warmup (and with it
    the lr warmup) stays: when it leaves no room, Dense O2O is dropped rather than the warmup."""
    if close_mosaic <= 0:
        return policy
    e0, e1, e2 = policy
    return e0, max(e0, min(e1, epochs - close_mosaic)), e2


def empty_stages(policy: Policy, epochs: int) -> list[str]:
    """The stages of STAGES that get no epoch in a run of `epochs` under `policy`."""
    bounds = (0, *policy, epochs)
    return [stage for stage, start, end in zip(STAGES, bounds, bounds[1:]) if end <= start]


def flat_cosine_factor(
    iteration: int, iters_per_epoch: int, policy: Policy, warmup_iters: int, lr_gamma: float
) -> float:
    """FlatCosine learning-rate multiplier (on the base lr) at a global 0-based `iteration`.

    With `flat = e1 * iters_per_epoch` and `end = e2 * iters_per_epoch`: `(iteration / warmup_iters)**2` while
    `iteration <= warmup_iters` (warmup wins where it overlaps the flat part); 1 until `flat`; then
    `lr_gamma + (1 - lr_gamma) * (1 + cos(pi * (iteration - flat) / (end - flat))) / 2` down to `lr_gamma` at `end`,
    the start of the no-aug tail; `lr_gamma` from there on. Midway through the cosine it is `(1 + lr_gamma) / 2`.

    Args:
        iteration (int): Optimizer steps taken since the start of training.
        iters_per_epoch (int): Optimizer steps per epoch.
        policy (Policy): `(e0, e1, e2)`; e0 is not used by the learning rate.
        warmup_iters (int): Length of the quadratic warmup in iterations (0: none).
        lr_gamma (float): Final multiplier, reached at `e2`.
    """
    _, e1, e2 = policy
    flat, end = e1 * iters_per_epoch, e2 * iters_per_epoch
    if iteration <= warmup_iters:
        return (iteration / warmup_iters) ** 2 if warmup_iters > 0 else 1.0
    if iteration <= flat:
        return 1.0
    if iteration >= end:
        return lr_gamma
    return lr_gamma + (1.0 - lr_gamma) * 0.5 * (1.0 + math.cos(math.pi * (iteration - flat) / (end - flat)))


def multiscale_sizes(imgsz: int, base_size_repeat: int | None, multi_scale: float = 0.25) -> list[int]:
    """Training sizes to draw one per batch from, until `e2`; the base size is repeated to dominate the draw.

    Rule: with `k_max = floor(imgsz * multi_scale / 32)`, the sizes `imgsz + 32 * k` for k = -k_max..-1, then `imgsz`
    `base_size_repeat` times, then k = 1..k_max, keeping sizes of at least 32 (one stride). For 640 and the recipe's
    `multi_scale` 0.25 that is the authors' list [480, 512, 544, 576, 608] + [640] * repeat + [672, 704, 736, 768,
    800]; sizes are multiples of 32 when `imgsz` is. Without multi-scale (`base_size_repeat` None, or a range below
    one 32-pixel step) the list is just `[imgsz]`.

    Args:
        imgsz (int): Base (validation) image size in pixels.
        base_size_repeat (int | None): Copies of `imgsz` in the list (>= 0); None disables multi-scale.
        multi_scale (float): Half-width of the size range as a fraction of `imgsz` (Ultralytics' `multi_scale`).
    """
    steps = int(imgsz * multi_scale // 32)
    if base_size_repeat is None or steps < 1:
        return [imgsz]
    if base_size_repeat < 0:
        raise ValueError(f"base_size_repeat must be >= 0 or None, got {base_size_repeat}")
    smaller = [imgsz + 32 * k for k in range(-steps, 0) if imgsz + 32 * k >= 32]
    return smaller + [imgsz] * base_size_repeat + [imgsz + 32 * k for k in range(1, steps + 1)]


def ema_decay(updates: int, decay: float, tau: float) -> float:
    """EMA decay after `updates` optimizer steps: `decay * (1 - exp(-updates / tau))`, ramping up from 0."""
    return decay * (1.0 - math.exp(-updates / tau))
