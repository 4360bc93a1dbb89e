"""Ultralytics settings under a DEIM recipe do what they say or are refused, through `train()` and the CLI."""

import re

import pytest
import torch
from ultralytics.data.augment import RandomFlip
from ultralytics.utils import DEFAULT_CFG_DICT, YAML

from deim_ultra import DEIM
from deim_ultra.data.augment import DEIMMosaic
from deim_ultra.recipe.schedule import scale_policy
from deim_ultra.recipe.settings import NO_EFFECT, UNSUPPORTED
from deim_ultra.recipe.tables import RECIPES
from deim_ultra.train import DEIMTrainer

from helpers import deim_cli

TINY = dict(imgsz=64, workers=0, plots=False, val=False)
# A value other than Ultralytics' default for every key the recipe has no counterpart for.
REFUSED = {
    "hsv_h": 0.1, "hsv_s": 0.1, "hsv_v": 0.1, "degrees": 5.0, "translate": 0.2, "scale": 0.9, "shear": 2.0,
    "perspective": 0.001, "flipud": 0.5, "cutmix": 0.5, "copy_paste": 0.5, "copy_paste_mode": "mixup",
    "cos_lr": True, "warmup_momentum": 0.5, "warmup_bias_lr": 0.0,
}  # fmt: skip


# A non-default value for every key no DEIM training reads, and the word its refusal must point to.
NO_EFFECT_CASES = [("box", 10.0, "loss_bbox"), ("cls", 1.0, "loss_mal"), ("dfl", 3.0, "loss_fgl"),
                   ("rect", True, "square"), ("sampler", "gather", "export")]  # fmt: skip


def test_every_unsupported_key_has_a_case():
    assert set(REFUSED) == set(UNSUPPORTED)
    assert {key for key, _, _ in NO_EFFECT_CASES} == set(NO_EFFECT)


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_key_without_counterpart_is_refused_by_train(key, tiny_data, tmp_path):
    with pytest.raises(ValueError, match=f"recipe=n cannot honour {key}="):
        DEIM("deim-n.yaml").train(data=str(tiny_data), project=str(tmp_path), **{key: REFUSED[key]}, **TINY)


@pytest.mark.parametrize(
    "settings, key",
    [
        (dict(optimizer="SGD"), "optimizer"),
        (dict(warmup_epochs=3.0), "warmup_epochs"),
        (dict(batch=8, nbs=64), "nbs"),
        (dict(time=1.0, policy_epochs=[1, 2, 3]), "time"),
        (dict(multi_scale=0.5), "multi_scale"),  # recipe n has no multi-scale repeat to use
        (dict(multi_scale=0.0, base_size_repeat=3), "base_size_repeat"),
    ],
)
def test_conflicting_settings_are_refused(settings, key, tiny_data, tmp_path):
    with pytest.raises(ValueError, match=f"cannot honour {key}="):
        DEIMTrainer(overrides=dict(model="deim-n.yaml", data=str(tiny_data), project=str(tmp_path), **settings))


@pytest.mark.parametrize(
    "settings, equivalent",
    [
        (dict(optimizer="SGD"), "tune it with lr0, backbone_lr, weight_decay and momentum"),
        (dict(warmup_epochs=3.0), "set warmup_iters"),
        (dict(multi_scale=0.5), "multi-scale also needs base_size_repeat"),
    ],
)
def test_refusals_of_common_ultralytics_settings_name_the_deim_equivalent(settings, equivalent, tiny_data, tmp_path):
    with pytest.raises(ValueError, match=re.escape(equivalent)):
        DEIM("deim-n.yaml").train(data=str(tiny_data), project=str(tmp_path), **settings, **TINY)


@pytest.mark.parametrize(
    ("size", "freeze", "freeze_norm"), [("n", None, False), ("s", None, False), ("l", [0], True), ("x", [0], True)]
)
def test_l_and_x_freeze_the_stem_and_the_backbone_norms_by_default(size, freeze, freeze_norm, tiny_data, tmp_path):
    trainer = DEIMTrainer(overrides=dict(model=f"deim-{size}.yaml", data=str(tiny_data), project=str(tmp_path)))
    assert trainer.args.freeze == freeze and trainer.args.freeze_norm is freeze_norm
    chosen = DEIMTrainer(
        overrides=dict(model=f"deim-{size}.yaml", data=str(tiny_data), project=str(tmp_path / "own"), freeze=None,
                       freeze_norm=False)
    )  # fmt: skip
    assert chosen.args.freeze is None and chosen.args.freeze_norm is False  # the user's choice wins


def test_ultralytics_defaults_given_explicitly_are_accepted(tiny_data, tmp_path):
    explicit = dict(hsv_h=0.015, degrees=0.0, cos_lr=False, scale=0.5)  # Ultralytics' own defaults: nothing asked
    trainer = DEIMTrainer(overrides=dict(model="deim-n.yaml", data=str(tiny_data), project=str(tmp_path), **explicit))
    assert trainer.args.recipe == "n" and trainer.args.degrees == 0.0


@pytest.mark.parametrize("recipe", ["n", "none"])
@pytest.mark.parametrize("key, value, instead", NO_EFFECT_CASES)
def test_settings_no_training_reads_are_refused_under_every_recipe(key, value, instead, recipe, tiny_data, tmp_path):
    with pytest.raises(ValueError, match=f"cannot honour {key}={value}: .*{instead}"):
        DEIM("deim-n.yaml").train(data=str(tiny_data), project=str(tmp_path), recipe=recipe, **{key: value}, **TINY)


def test_cli_recipe_none_trains_with_ultralytics_recipe(tiny_data, tmp_path):
    # The shell's `none` is parsed to None by Ultralytics; it must still mean "no recipe", as the refusals advise.
    result = deim_cli(
        "train", "model=deim-n.yaml", f"data={tiny_data}", "recipe=none", "epochs=1", "imgsz=64", "batch=4",
        "workers=0", "plots=False", "val=False", f"project={tmp_path}", "name=run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    args = YAML.load(tmp_path / "run" / "args.yaml")
    assert args["recipe"] == "none" and args["lr0"] == DEFAULT_CFG_DICT["lr0"]  # not recipe n's 8e-4
    assert "DEIM schedule" not in result.stdout + result.stderr


def test_cli_refusal_names_the_key(tiny_data, tmp_path):
    result = deim_cli("train", "model=deim-n.yaml", f"data={tiny_data}", "degrees=10", "epochs=1", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot honour degrees=10" in result.stdout + result.stderr


def batch_of_two_images() -> dict:
    images = torch.stack(
        [torch.full((3, 64, 64), 20, dtype=torch.uint8), torch.full((3, 64, 64), 220, dtype=torch.uint8)]
    )
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])
    return {"img": images, "cls": torch.zeros(2, 1), "bboxes": boxes, "batch_idx": torch.tensor([0.0, 1.0])}


@pytest.mark.parametrize("mixup, blended", [(None, True), (0.0, False)])
def test_mixup_setting_drives_dense_o2o_batch_mixup(mixup, blended, tiny_data, tmp_path):
    settings = {} if mixup is None else {"mixup": mixup}
    overrides = dict(model="deim-n.yaml", data=str(tiny_data), imgsz=64, project=str(tmp_path), **settings)
    trainer = DEIMTrainer(overrides=overrides)
    assert trainer.args.mixup == (0.5 if mixup is None else mixup)  # the recipe's probability unless given
    trainer.stage = "dense_o2o"
    pixels = {round(trainer.preprocess_batch(batch_of_two_images())["img"][0].mean().item(), 3) for _ in range(20)}
    assert (pixels != {round(20 / 255, 3)}) == blended


@pytest.mark.parametrize("multi_scale, sizes", [(None, 11), (0.0, 1)])
def test_multi_scale_setting_drives_deim_multiscale(multi_scale, sizes, tiny_data, tmp_path):
    settings = {} if multi_scale is None else {"multi_scale": multi_scale}
    trainer = DEIMTrainer(
        overrides=dict(model="deim-s.yaml", data=str(tiny_data), imgsz=640, project=str(tmp_path), **settings)
    )
    trainer.stage = "aug"
    image = {"img": torch.zeros(1, 3, 640, 640, dtype=torch.uint8), "cls": torch.zeros(0, 1)}
    drawn = {trainer.preprocess_batch(dict(image))["img"].shape[-1] for _ in range(200)}
    assert len(drawn) == sizes  # the 11 sizes 480 ... 800, or 640 alone


def test_mapped_settings_and_autobatch_through_train(tiny_data, tmp_path):
    """One run: batch=-1, list-valued fraction, momentum, mosaic=0 and fliplr=0, each seen where it acts."""
    seen = {}

    def inspect(trainer) -> None:
        transforms = trainer.train_loader.dataset.transforms.transforms
        seen.update(
            batch=trainer.batch_size,
            nbs=trainer.args.nbs,
            accumulate=trainer.accumulate,
            train_images=len(trainer.train_loader.dataset),
            val_images=len(trainer.test_loader.dataset),
            betas={g["betas"] for g in trainer.optimizer.param_groups},
            decays={g["weight_decay"] for g in trainer.optimizer.param_groups},
            mosaic=[t.p for t in transforms if isinstance(t, DEIMMosaic)],
            flip=[t.p for t in transforms if isinstance(t, RandomFlip)],
        )

    model = DEIM("deim-n.yaml")
    model.add_callback("on_train_epoch_end", inspect)
    model.train(
        data=str(tiny_data), project=str(tmp_path), epochs=1, batch=-1, fraction=[1.0, 0.5], momentum=0.85,
        mosaic=0.0, fliplr=0.0, policy_epochs=[0, 1, 1], **TINY,
    )  # fmt: skip
    assert seen["batch"] == 16  # AutoBatch's CPU answer (it profiles only on GPUs)
    assert seen["nbs"] == 16 and seen["accumulate"] == 1
    assert seen["decays"] == {0.0, RECIPES["n"].weight_decay}  # not rescaled by batch / nbs
    assert seen["betas"] == {(0.85, 0.999)}
    assert (seen["train_images"], seen["val_images"]) == (8, 2)  # fraction=[train, val] as Ultralytics reads it
    assert seen["mosaic"] == [0.0] and seen["flip"] == [0.0]  # the run's one epoch is Dense O2O


def test_time_rescales_the_policy_to_the_reestimated_epochs(tiny_data, tmp_path):
    seen = {}
    model = DEIM("deim-n.yaml")
    model.add_callback("on_train_end", lambda t: seen.update(epochs=t.epochs, policy=t.policy))
    model.train(data=str(tiny_data), project=str(tmp_path), epochs=50, time=0.0001, batch=4, **TINY)
    n = RECIPES["n"]
    assert seen["epochs"] < 50  # 0.36 s cannot hold 50 epochs: Ultralytics re-estimated the run length
    assert seen["policy"] == scale_policy(n.policy_epochs, n.epochs, seen["epochs"])
    assert seen["policy"] != scale_policy(n.policy_epochs, n.epochs, 50)


def test_the_recipe_tables_cover_every_shipped_model_size():
    """Every model YAML names a recipe of `recipe/tables.py`, and every recipe has its size's parameter groups."""
    from ultralytics.nn.tasks import yaml_model_load

    from deim_ultra.cfg import CFG_DIR
    from deim_ultra.recipe.tables import OFFICIAL_GROUPS

    named = {yaml_model_load(f).get("recipe") for f in CFG_DIR.glob("d*-*.yaml")}
    deimv2 = {f"deimv2-{size}" for size in ("atto", "femto", "pico", "n", "s", "m", "l", "x")}
    assert named == set(RECIPES) == set(OFFICIAL_GROUPS) == {"n", "s", "m", "l", "x"} | deimv2


def test_recipe_auto_is_the_recipe_a_checkpoint_was_built_with(easy_trained, easy_data, tmp_path):
    """A trainer given a checkpoint directly (not through `DEIM.train`) reads its YAML's recipe from the file."""
    trainer = DEIMTrainer(overrides=dict(model=str(easy_trained), data=str(easy_data), project=str(tmp_path)))
    assert trainer.args.recipe == "n" and trainer.args.lr0 == RECIPES["n"].lr
