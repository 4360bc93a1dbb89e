"""DEIMv2's recipes through `train()`: the matcher change, the small sizes' early end of augmentation, CopyBlend in
the stages the authors run it, and the loss settings each size trains with."""

import logging

import pytest

from deim_ultra import DEIM
from deim_ultra.recipe.schedule import scale_policy
from deim_ultra.recipe.tables import RECIPES

TINY = dict(imgsz=64, batch=4, workers=0, val=False, plots=False)


def test_the_matcher_changes_its_cost_at_the_scaled_epoch(tiny_data, tmp_path, caplog):
    seen = []
    model = DEIM("deimv2-n.yaml")
    model.add_callback("on_train_epoch_end", lambda t: seen.append(t.model.criterion.quality_matching))
    caplog.set_level(logging.INFO, logger="ultralytics")
    model.train(data=str(tiny_data), epochs=7, project=str(tmp_path), **TINY)
    assert "matcher cost -p*IoU^4 from epoch 7" in caplog.text  # 136 of 160 epochs scaled to 7: 0-based epoch 6
    assert "epoch 7 matches by -p*IoU^4 from now on" in caplog.text
    assert seen == [False] * 6 + [True]


def test_a_run_too_short_for_the_matcher_change_says_so(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ultralytics")
    DEIM("deimv2-n.yaml").train(data=str(tiny_data), epochs=2, project=str(tmp_path), **TINY)
    assert "the matcher change (epoch 3) falls after the run's 2 epochs, so it never happens" in caplog.text


def test_union_set_off_with_distribution_terms_is_refused_before_any_work(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="union_set=False needs loss_fgl=0 and loss_ddf=0"):
        DEIM("deim-n.yaml").train(data=str(tiny_data), epochs=1, union_set=False, project=str(tmp_path), **TINY)
    assert not any(tmp_path.iterdir())  # refused before the run folder or the dataset scan


def test_another_sizes_recipe_is_named(tiny_data, tmp_path, caplog):
    DEIM("deimv2-atto.yaml").train(data=str(tiny_data), epochs=1, recipe="deimv2-n", project=str(tmp_path), **TINY)
    assert "recipe=deimv2-n trains deimv2-atto.yaml with another size's recipe (its own: deimv2-atto)" in caplog.text


def test_an_explicit_matcher_change_epoch_wins(tiny_data, tmp_path):
    seen = []
    model = DEIM("deimv2-n.yaml")
    model.add_callback("on_train_epoch_end", lambda t: seen.append(t.model.criterion.quality_matching))
    model.train(data=str(tiny_data), epochs=3, matcher_change_epoch=1, project=str(tmp_path), **TINY)
    assert seen == [False, True, True]


def test_small_sizes_stop_augmenting_before_the_lr_and_the_tail(tiny_data, tmp_path, caplog):
    """Atto's recipe: augmentation until 400 of 500 epochs, while the lr decays and the tail waits until 468."""
    stages, lrs = [], []
    model = DEIM("deimv2-atto.yaml")
    model.add_callback(
        "on_train_epoch_end", lambda t: (stages.append(t.stage), lrs.append(t.optimizer.param_groups[0]["lr"]))
    )
    caplog.set_level(logging.INFO, logger="ultralytics")
    model.train(data=str(tiny_data), epochs=10, project=str(tmp_path), **TINY)
    policy = scale_policy(RECIPES["deimv2-atto"].policy_epochs, 500, 10)
    assert policy == (1, 5, 9)
    assert "augmentation ends at 8" in caplog.text  # 400 of 500, scaled to 10
    assert stages == ["warmup"] + ["dense_o2o"] * 4 + ["aug"] * 3 + ["no_aug"] * 2
    assert lrs[7] > lrs[8]  # still decaying after the augmentation ended
    assert lrs[9] == pytest.approx(0.5 * model.trainer.optimizer.param_groups[0]["initial_lr"])  # lr_gamma from 9


def test_small_sizes_train_without_distribution_terms_or_union_set(tiny_data, tmp_path):
    model = DEIM("deimv2-pico.yaml")
    model.train(data=str(tiny_data), epochs=1, project=str(tmp_path), **TINY)
    args = model.trainer.args
    assert (args.loss_fgl, args.loss_ddf, args.union_set, args.mosaic, args.mixup) == (0.0, 0.0, False, 0.5, 0.0)
    losses = {name: float(value) for name, value in model.trainer.tloss.items()}  # the epoch's loss columns
    assert losses["fgl"] == 0 and losses["ddf"] == 0 and losses["bbox"] > 0


def record_copyblend(trainer, seen: list) -> None:
    """Wrap the trainer's batch preprocessing to record, per batch, the stage and the CopyBlend weight it used."""
    if getattr(trainer, "_recording", False):
        return
    trainer._recording = True
    original = trainer.preprocess_batch

    def recorded(batch):
        out = original(batch)
        seen.append(
            (trainer.stage, out.get("mixup", 1.0), out.get("copyblend", 1.0), len(out["cls"]), len(batch["cls"]))
        )
        return out

    trainer.preprocess_batch = recorded


@pytest.mark.parametrize("yaml, stages", [("deimv2-n.yaml", {"dense_o2o"}), ("deimv2-s.yaml", {"dense_o2o", "aug"})])
def test_copyblend_runs_where_mixup_did_not_in_the_recipes_stages(yaml, stages, tiny_data, tmp_path):
    seen = []
    model = DEIM(yaml)
    model.add_callback("on_train_epoch_start", lambda t: record_copyblend(t, seen))
    # mixup=0.0: every batch is left to CopyBlend (p=1), so where it runs every batch gains boxes
    model.train(
        data=str(tiny_data), epochs=6, policy_epochs=[1, 3, 5], mixup=0.0, copyblend=1.0, project=str(tmp_path), **TINY
    )
    blended = {stage for stage, _, weight, _, _ in seen if weight < 1.0}
    assert blended == stages
    for stage, _, weight, after, before in seen:
        assert (after > before) == (weight < 1.0)  # pasted objects are new boxes
        assert (weight < 1.0) == (stage in stages)


def test_copyblend_outside_a_recipe_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="copyblend=0.5 is part of a DEIM recipe; recipe=none cannot honour it"):
        DEIM("deimv2-n.yaml").train(
            data=str(tiny_data), epochs=1, recipe="none", copyblend=0.5, project=str(tmp_path), **TINY
        )


def test_vit_sizes_train_only_the_vit_at_the_backbone_lr(tiny_data, tmp_path):
    """The authors' groups put only `dinov3` at the backbone lr; the adapter's convolutions train at the base lr."""
    model = DEIM("deimv2-s.yaml")
    model.train(data=str(tiny_data), epochs=1, project=str(tmp_path), **TINY)
    adapter = model.trainer.model.model[0]
    slow = {id(p) for g in model.trainer.optimizer.param_groups if g["initial_lr"] == 2.5e-5 for p in g["params"]}
    assert slow == {id(p) for p in adapter.dinov3.parameters()}
    assert not slow & {id(p) for p in adapter.sta.parameters()}
