"""Every number the authors' per-size configs give (`deim_hgnetv2_<size>_coco.yml`, DEIMv2's
`deimv2_hgnetv2_<size>_coco.yml`, and the files they include), in one place; the rest of the package reads them from
here.

- `RECIPES`: schedule, learning rates, weight decay, batch, EMA, clipping, multi-scale repeat, frozen parts.
- `OFFICIAL_GROUPS`: the AdamW parameter groups, as the configs' regexes on the official parameter names (applied by
  `deim_ultra.recipe.optim.official_param_groups`, which documents the quirks they keep).
- `MOSAIC_P`: the Dense O2O stage's mosaic probability; `MULTI_SCALE`: the multi-scale range.

DEIMv2's rows are named `deimv2-<size>`. Its Atto, Femto and Pico recipes are not here yet: they end the augmentation
(epoch 400) before the lr cosine and the tail (epoch 468), a fourth boundary this schedule does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

Policy = tuple[int, int, int]


@dataclass(frozen=True)
class Recipe:
    """The authors' COCO recipe for one model size.

    Attributes:
        epochs (int): Total epochs, the no-aug tail included.
        policy_epochs (Policy): Stage boundaries `(e0, e1, e2)`, see `stage_at`.
        lr (float): Base learning rate (encoder, decoder).
        backbone_lr (float): Learning rate of the backbone.
        weight_decay (float): AdamW weight decay of the parameter groups that decay.
        batch (int): Total batch size the learning rates were tuned for.
        lr_gamma (float): Final learning rate as a fraction of the initial one (1.0: no decay).
        base_size_repeat (int | None): Copies of the base size in the multi-scale list; None: no multi-scale.
        warmup_iters (int): Iterations of the quadratic learning-rate warmup.
        ema_decay (float): EMA decay once warmed up.
        ema_tau (float): EMA warmup constant in updates, see `ema_decay`.
        clip_max_norm (float): Gradient clipping max norm.
        freeze_stem (bool): Keep the backbone stem's weights fixed (the authors' `freeze_at: 0` for L and X).
        freeze_norm (bool): Backbone BatchNorm as fixed statistics and affine (the authors' `freeze_norm`).
        mixup (float): Batch mixup probability per batch in the Dense O2O stage.
        copyblend (float): DEIMv2's CopyBlend probability per batch in the Dense O2O stage, where mixup was not drawn.
        matcher_change (int | None): Epoch from which the matcher's cost is -p * IoU^4 (DEIMv2); None: never.
    """

    epochs: int
    policy_epochs: Policy
    lr: float
    backbone_lr: float
    weight_decay: float
    batch: int
    lr_gamma: float
    base_size_repeat: int | None
    warmup_iters: int = 2000
    ema_decay: float = 0.9999
    ema_tau: float = 1000.0
    clip_max_norm: float = 0.1
    freeze_stem: bool = False
    freeze_norm: bool = False
    mixup: float = 0.5
    copyblend: float = 0.0
    matcher_change: int | None = None


RECIPES: dict[str, Recipe] = {
    "n": Recipe(160, (4, 78, 148), 8e-4, 4e-4, 1e-4, 128, 1.0, None),
    "s": Recipe(132, (4, 64, 120), 4e-4, 2e-4, 1e-4, 32, 0.5, 20),
    "m": Recipe(102, (4, 49, 90), 4e-4, 4e-5, 1e-4, 32, 0.5, 6),
    "l": Recipe(58, (4, 29, 50), 5e-4, 2.5e-5, 1.25e-4, 32, 0.5, 4, freeze_stem=True, freeze_norm=True),
    "x": Recipe(58, (4, 29, 50), 5e-4, 5e-6, 1.25e-4, 32, 0.5, 3, freeze_stem=True, freeze_norm=True),
    "deimv2-n": Recipe(160, (4, 78, 148), 8e-4, 4e-4, 1e-4, 32, 1.0, None, copyblend=0.4, matcher_change=136),
}


# Per recipe: (regex on the official name, at the backbone lr, decayed), in the configs' order.
_N_GROUPS = (
    (r"^(?=.*backbone)(?!.*norm|bn).*$", True, True),
    (r"^(?=.*backbone)(?=.*norm|bn).*$", True, False),
    (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", False, False),
)
_SM_GROUPS = ((r"^(?=.*backbone)(?!.*bn).*$", True, True), (r"^(?=.*(?:norm|bn)).*$", False, False))
_LX_GROUPS = (
    (r"^(?=.*backbone)(?!.*norm|bn).*$", True, True),
    (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", False, False),
)
OFFICIAL_GROUPS = {
    "n": _N_GROUPS,
    "s": _SM_GROUPS,
    "m": _SM_GROUPS,
    "l": _LX_GROUPS,
    "x": _LX_GROUPS,
    "deimv2-n": _N_GROUPS,
}

MOSAIC_P = 0.5  # mosaic probability per image in the Dense O2O stage
MULTI_SCALE = 0.25  # the multi-scale range as a fraction of imgsz, at which 640 gives the authors' sizes 480 ... 800
