"""Every number the authors' per-size configs give (`deim_hgnetv2_<size>_coco.yml`, DEIMv2's
`deimv2_hgnetv2_<size>_coco.yml`, and the files they include), in one place; the rest of the package reads them from
here.

- `RECIPES`: schedule, learning rates, weight decay, batch, EMA, clipping, multi-scale repeat, frozen parts.
- `OFFICIAL_GROUPS`: the AdamW parameter groups, as the configs' regexes on the official parameter names (applied by
  `deim_ultra.recipe.optim.official_param_groups`, which documents the quirks they keep).
- `MULTI_SCALE`: the multi-scale range.

DEIMv2's rows are named `deimv2-<size>`.
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
        mosaic (float): Mosaic probability per image in the Dense O2O stage.
        mixup (float): Batch mixup probability per batch in the Dense O2O stage.
        copyblend (float): DEIMv2's CopyBlend probability per batch, on batches mixup left unmixed.
        copyblend_in_aug (bool): CopyBlend also in the 'aug' stage, until e2 (DEIMv2's ViT sizes); else in the Dense
            O2O stage only (DEIMv2-N).
        matcher_change (int | None): Epoch from which the matcher's cost is -p * IoU^4 (DEIMv2); None: never.
        aug_end (int | None): Epoch from which the data is no longer augmented, when that comes before the tail at
            e2 (DEIMv2's small sizes: 400, while lr and tail keep 468); None: at e2.
        distribution_losses (bool): FGL and DDF terms (DEIMv2's small sizes train without them).
        union_set (bool): Box terms on the union ("GO") set of all layers' matches (DEIMv2's small sizes: each layer's
            own match).
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
    mosaic: float = 0.5
    mixup: float = 0.5
    copyblend: float = 0.0
    copyblend_in_aug: bool = False
    matcher_change: int | None = None
    aug_end: int | None = None
    distribution_losses: bool = True
    union_set: bool = True


def _deimv2_small(lr: float, mosaic: float) -> Recipe:
    """DEIMv2-Atto/Femto/Pico: 500 epochs, flat lr to 250 then cosine to 468, augmentation until 400, no FGL/DDF."""
    return Recipe(
        500, (4, 250, 468), lr, lr / 2, 1e-4, 128, 0.5, None, warmup_iters=4000, mosaic=mosaic, mixup=0.0,
        matcher_change=450, aug_end=400, distribution_losses=False, union_set=False,
    )  # fmt: skip


def _deimv2_vit(epochs: int, policy: Policy, backbone_lr: float, decay: float, repeat: int, change: int) -> Recipe:
    """DEIMv2-S..X: lr 5e-4 (the ViT at `backbone_lr`), CopyBlend 0.5 through the 'aug' stage."""
    return Recipe(
        epochs, policy, 5e-4, backbone_lr, decay, 32, 0.5, repeat, copyblend=0.5, copyblend_in_aug=True,
        matcher_change=change,
    )  # fmt: skip


RECIPES: dict[str, Recipe] = {
    "n": Recipe(160, (4, 78, 148), 8e-4, 4e-4, 1e-4, 128, 1.0, None),
    "s": Recipe(132, (4, 64, 120), 4e-4, 2e-4, 1e-4, 32, 0.5, 20),
    "m": Recipe(102, (4, 49, 90), 4e-4, 4e-5, 1e-4, 32, 0.5, 6),
    "l": Recipe(58, (4, 29, 50), 5e-4, 2.5e-5, 1.25e-4, 32, 0.5, 4, freeze_stem=True, freeze_norm=True),
    "x": Recipe(58, (4, 29, 50), 5e-4, 5e-6, 1.25e-4, 32, 0.5, 3, freeze_stem=True, freeze_norm=True),
    "deimv2-atto": _deimv2_small(2e-3, 0.3),
    "deimv2-femto": _deimv2_small(1.6e-3, 0.5),
    "deimv2-pico": _deimv2_small(1.6e-3, 0.5),
    "deimv2-n": Recipe(160, (4, 78, 148), 8e-4, 4e-4, 1e-4, 32, 1.0, None, copyblend=0.4, matcher_change=136),
    "deimv2-s": _deimv2_vit(132, (4, 64, 120), 2.5e-5, 1e-4, 20, 100),
    "deimv2-m": _deimv2_vit(102, (4, 49, 90), 2.5e-5, 1e-4, 6, 80),
    "deimv2-l": _deimv2_vit(68, (4, 34, 60), 1.25e-5, 1.25e-4, 3, 50),
    "deimv2-x": _deimv2_vit(58, (4, 29, 50), 1e-5, 1.25e-4, 3, 45),
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
# DEIMv2-Atto: as N's, but encoder/decoder biases decay.
_ATTO_GROUPS = (*_N_GROUPS[:2], (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", False, False))
# DEIMv2's ViT sizes: only the ViT is at the backbone lr; the adapter's convolutions train at the base lr.
_VIT_GROUPS = (
    (r"^(?=.*.dinov3)(?!.*(?:norm|bn|bias)).*$", True, True),
    (r"^(?=.*.dinov3)(?=.*(?:norm|bn|bias)).*$", True, False),
    (r"^(?=.*(?:sta|encoder|decoder))(?=.*(?:norm|bn|bias)).*$", False, False),
)
OFFICIAL_GROUPS = {
    "n": _N_GROUPS,
    "s": _SM_GROUPS,
    "m": _SM_GROUPS,
    "l": _LX_GROUPS,
    "x": _LX_GROUPS,
    "deimv2-atto": _ATTO_GROUPS,
    "deimv2-femto": _N_GROUPS,
    "deimv2-pico": _N_GROUPS,
    "deimv2-n": _N_GROUPS,
    **dict.fromkeys(("deimv2-s", "deimv2-m", "deimv2-l", "deimv2-x"), _VIT_GROUPS),
}

MULTI_SCALE = 0.25  # the multi-scale range as a fraction of imgsz, at which 640 gives the authors' sizes 480 ... 800
