"""Ultralytics settings under a DEIM recipe: each one is filled with the recipe's value, mapped onto its DEIM
counterpart, or refused with a message that names it. None is silently ignored.

Mapped (the Ultralytics key keeps its meaning, DEIM's pipeline honours it):
    mosaic        probability of DEIM's mosaic per image in the Dense O2O stage (recipe: 0.5, deimv2-atto 0.3)
    mixup         probability of DEIM's batch mixup per batch in the Dense O2O stage (recipe: 0.5, DEIMv2's
                  small sizes 0)
    fliplr, bgr   horizontal flip and channel-swap probabilities of every stage (Ultralytics' defaults 0.5, 0.0)
    lrf           FlatCosine's final lr fraction, reached at e2 (the authors' lr_gamma: N 1.0, S..X 0.5)
    momentum      AdamW's beta1 (recipe: 0.9, the authors' betas (0.9, 0.999))
    multi_scale   DEIM's multi-scale range as a fraction of imgsz (recipe: 0.25 for S..X, 0 for N), see
                  `deim_ultra.recipe.schedule.multiscale_sizes`
    freeze        Ultralytics' layer freezing; recipes l and x default to [0], the stem (the authors' freeze_at: 0)
    batch         -1 or a fraction runs Ultralytics' AutoBatch; weight decay is never rescaled (nbs follows batch)
    time          Ultralytics re-estimates epochs from the epoch time; the policy epochs are rescaled with it
    close_mosaic  Dense O2O (mosaic and mixup) ends at least this many epochs before the end (recipe: 0, the
                  recipe's own policy epochs), see `deim_ultra.recipe.schedule.close_mosaic_policy`
Fixed by the recipe (another value is refused): optimizer, warmup_epochs, nbs (no accumulation).
Refused unless left at Ultralytics' default: the YOLO augmentation and lr-schedule keys in UNSUPPORTED, and under
every recipe, `recipe=none` included, the YOLO loss gains, `rect` and the export setting `sampler` in NO_EFFECT.
"""

from __future__ import annotations

from pathlib import Path

from ultralytics.cfg import DEFAULT_CFG_DICT
from ultralytics.nn.tasks import yaml_model_load
from ultralytics.utils import LOGGER

from deim_ultra.cfg import DEIM_CFG_DICT, resolve_model_yaml
from deim_ultra.checkpoints.read import checkpoint_model_yaml
from deim_ultra.recipe.tables import MULTI_SCALE, RECIPES

# What a recipe runs instead: its own optimizer, its FlatCosine warmup in iterations, its no-aug tail.
FIXED = {"optimizer": "AdamW", "warmup_epochs": 0}
FIXED_EQUIVALENT = {  # how to get, under the recipe, what each fixed setting asks for
    "optimizer": "tune it with lr0, backbone_lr, weight_decay and momentum (beta1)",
    "warmup_epochs": "its lr warmup is counted in iterations: set warmup_iters",
}
# Every DEIM and Ultralytics RT-DETR YAML starts with the backbone's stem; Ultralytics' `freeze` takes layer indices.
STEM_LAYER = 0
_AUGMENT = "DEIM's augmentation is mosaic, mixup, photometric distortion, zoom-out, IoU crop and flip"
_SCHEDULE = "DEIM's lr is FlatCosine (set lrf, policy_epochs, warmup_iters)"
UNSUPPORTED = {
    **dict.fromkeys(
        ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "cutmix"),
        _AUGMENT,
    ),
    **dict.fromkeys(("copy_paste", "copy_paste_mode"), _AUGMENT),
    **dict.fromkeys(("cos_lr", "warmup_momentum", "warmup_bias_lr"), _SCHEDULE),
}
# Settings that no DEIM training reads, whatever the recipe: the criterion has its own loss_* weights, RT-DETR training
# batches are square, and `sampler` is an export setting.
NO_EFFECT = {
    "box": "DEIM weights its box terms with loss_bbox (L1) and loss_giou",
    "cls": "DEIM weights its classification term with loss_mal",
    "dfl": "DEIM weights its distribution terms with loss_fgl and loss_ddf",
    "rect": "DETR training uses square batches (so does Ultralytics' RT-DETR trainer)",
    "sampler": "it chooses the attention of exported graphs; pass it to export",
}


# DEIM settings that only a recipe's data pipeline and schedule apply, refused under recipe=none unless unset or 0.
# (A recipe run's args.yaml also holds the values the recipe filled in, backbone_lr, ema_decay, ...: reused with
# recipe=none, those keys cannot be told from a user's and stay unused rather than refused.)
RECIPE_ONLY = ("copyblend", "matcher_change_epoch", "policy_epochs", "warmup_iters")


def model_yaml(model: str | None) -> dict:
    """The YAML dict of a `model` argument: a model YAML's, or the one a checkpoint was built from; {} otherwise."""
    if str(model).endswith((".yaml", ".yml")):
        return yaml_model_load(resolve_model_yaml(model))
    if str(model).endswith(".pt") and Path(str(model)).is_file():
        return checkpoint_model_yaml(model)
    return {}


def recipe_name(overrides: dict) -> str:
    """The recipe `overrides` ask for: `recipe=auto` takes the `recipe` key of the model's YAML (a checkpoint's too),
    `none` without one. This is the one place where `auto` is resolved."""
    name = overrides.get("recipe", DEIM_CFG_DICT["recipe"])
    name = "none" if name is None else str(name)  # the shell's `recipe=none` reaches here as None (Ultralytics' parser)
    own = model_yaml(overrides.get("model")).get("recipe")
    if name == "auto":
        name = str(own or "none")
    elif own and name not in (own, "none"):
        LOGGER.warning(
            f"recipe={name} trains {Path(str(overrides.get('model'))).name} with another size's recipe (its own: {own})"
        )
    if name != "none" and name not in RECIPES:
        raise ValueError(f"recipe={name} is not one of {', '.join(RECIPES)}, auto or none")
    return name


def refuse(name: str, key: str, value, reason: str) -> None:
    """Raise the one-line error for a setting the recipe cannot honour."""
    raise ValueError(f"recipe={name} cannot honour {key}={value}: {reason}. Drop it, or train with recipe=none")


def check_effective(overrides: dict) -> None:
    """Refuse every setting of `overrides` in NO_EFFECT that differs from its default, under any recipe."""
    for key, reason in NO_EFFECT.items():
        if key in overrides and overrides[key] != DEIM_CFG_DICT[key]:
            raise ValueError(f"deim-ultra cannot honour {key}={overrides[key]}: {reason}. Drop it")


def check_refused(name: str, overrides: dict) -> None:
    """Refuse every setting of `overrides` that the recipe fixes or has no counterpart for."""
    for key, value in overrides.items():
        if key in FIXED and value != FIXED[key]:
            refuse(name, key, value, f"the recipe fixes {key}={FIXED[key]}: {FIXED_EQUIVALENT[key]}")
        if key in UNSUPPORTED and value != DEFAULT_CFG_DICT[key]:
            refuse(name, key, value, UNSUPPORTED[key])
    if "nbs" in overrides and overrides["nbs"] != overrides.get("batch", RECIPES[name].batch):
        refuse(name, "nbs", overrides["nbs"], "gradient accumulation is not supported; nbs follows batch")
    if overrides.get("close_mosaic") and overrides.get("policy_epochs"):
        raise ValueError(
            f"close_mosaic={overrides['close_mosaic']} and policy_epochs={overrides['policy_epochs']} both place the "
            "end of mosaic (policy_epochs' e1): give one of the two"
        )
    if overrides.get("time") and overrides.get("policy_epochs"):
        refuse(name, "time", overrides["time"], "time re-estimates epochs, which fixed policy_epochs cannot follow")


def multi_scale_settings(name: str, overrides: dict) -> dict:
    """`multi_scale` and `base_size_repeat` made consistent: both on, or `multi_scale=0` and no repeat."""
    repeat = overrides.get("base_size_repeat")
    if "multi_scale" not in overrides:
        repeat = repeat if repeat is not None else RECIPES[name].base_size_repeat
        return {"multi_scale": MULTI_SCALE if repeat is not None else 0.0, "base_size_repeat": repeat}
    if overrides["multi_scale"] <= 0:
        if repeat is not None:
            refuse(name, "base_size_repeat", repeat, "multi_scale=0 turns multi-scale off")
        return {"multi_scale": 0.0, "base_size_repeat": None}
    repeat = repeat if repeat is not None else RECIPES[name].base_size_repeat
    if repeat is None:
        refuse(
            name, "multi_scale", overrides["multi_scale"],
            "recipe n trains at one size; multi-scale also needs base_size_repeat (how often imgsz is among the sizes "
            "drawn, e.g. base_size_repeat=20 as recipe s)",
        )  # fmt: skip
    return {"multi_scale": overrides["multi_scale"], "base_size_repeat": repeat}


def recipe_overrides(overrides: dict) -> dict:
    """Return `overrides` completed with the per-size recipe's defaults for every key the user did not set.

    A model without a `recipe` key (e.g. Ultralytics' rtdetr-l.yaml) and `recipe=none` keep Ultralytics' defaults;
    `resume` keeps the checkpoint's settings, so nothing is filled in (a recipe default would override them).
    The result is a fixed point (passing it through again changes nothing), as Ultralytics' DDP workers rebuild the
    trainer from the complete settings.

    Raises:
        ValueError: Naming the key, for a setting the recipe cannot honour.
    """
    if overrides.get("resume"):  # a resumed run takes its settings from the checkpoint (Ultralytics' check_resume)
        return overrides
    check_effective(overrides)
    name = recipe_name(overrides)
    if name == "none":
        for key in RECIPE_ONLY:
            if overrides.get(key) not in (None, 0):
                raise ValueError(f"{key}={overrides[key]} is part of a DEIM recipe; recipe=none cannot honour it")
        return {**overrides, "recipe": "none"}
    check_refused(name, overrides)
    r = RECIPES[name]
    batch = overrides.get("batch", r.batch)
    defaults = {
        "recipe": name,
        **FIXED,
        "close_mosaic": 0,
        "epochs": r.epochs,
        "batch": r.batch,
        "lr0": r.lr,
        "backbone_lr": r.backbone_lr,
        "weight_decay": r.weight_decay,
        "lrf": r.lr_gamma,
        "momentum": 0.9,
        "mosaic": r.mosaic,
        "mixup": r.mixup,
        "copyblend": r.copyblend,
        "union_set": r.union_set,
        **({} if r.distribution_losses else {"loss_fgl": 0.0, "loss_ddf": 0.0}),
        "ema_decay": r.ema_decay,
        "ema_tau": r.ema_tau,
        "clip_max_norm": r.clip_max_norm,
        "freeze_norm": r.freeze_norm,
        **({"freeze": [STEM_LAYER]} if r.freeze_stem else {}),
        # One optimizer step per batch, weight decay as given; AutoBatch sizes are set in the trainer.
        "nbs": batch if batch >= 1 else r.batch,
    }
    return {**defaults, **overrides, **multi_scale_settings(name, overrides)}
