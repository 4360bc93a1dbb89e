"""DEIM's recipe, schedule and optimizer groups: hand-computed values and the official DEIM-N group regexes."""

import logging
import math
import re

import pytest
import torch
from torch import nn

from deim_ultra.recipe.optim import build_adamw, official_param_groups, param_groups
from deim_ultra.recipe.schedule import (
    close_mosaic_policy,
    ema_decay,
    empty_stages,
    flat_cosine_factor,
    multiscale_sizes,
    scale_policy,
    stage_at,
)
from deim_ultra.recipe.tables import RECIPES

# DEIM-N config: (regex, lr, weight decay) per group, in config order; unmatched parameters get (lr, weight decay).
LR, BACKBONE_LR, WD = 8e-4, 4e-4, 1e-4
OFFICIAL_N_GROUPS = [
    (r"^(?=.*backbone)(?!.*norm|bn).*$", BACKBONE_LR, WD),
    (r"^(?=.*backbone)(?=.*norm|bn).*$", BACKBONE_LR, 0.0),
    (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", LR, 0.0),
]


def test_recipes_tail_and_rates():
    """Totals are e2 + the no-aug tail (12 epochs for N/S/M, 8 for L/X); spot-check rates per size."""
    tails = {k: r.epochs - r.policy_epochs[2] for k, r in RECIPES.items()}
    assert tails == {
        **{"n": 12, "s": 12, "m": 12, "l": 8, "x": 8},
        **{"deimv2-atto": 32, "deimv2-femto": 32, "deimv2-pico": 32, "deimv2-n": 12},
        **{"deimv2-s": 12, "deimv2-m": 12, "deimv2-l": 8, "deimv2-x": 8},
    }
    n = RECIPES["n"]
    assert (n.lr, n.backbone_lr, n.batch, n.lr_gamma, n.warmup_iters, n.ema_tau) == (8e-4, 4e-4, 128, 1, 2000, 1000)
    assert (RECIPES["x"].backbone_lr, RECIPES["x"].weight_decay, RECIPES["x"].base_size_repeat) == (5e-6, 1.25e-4, 3)
    assert RECIPES["n"].base_size_repeat is None


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 0.0),
        (1000, 0.25),  # (1000 / 2000) ** 2
        (2000, 1.0),
        (3500, 1.0),  # flat
        (5000, 1.0),  # flat end: e1 * 100
        (6000, 0.5 + 0.25 * (1 + math.sqrt(0.5))),  # a quarter into the cosine: cos(pi / 4)
        (7000, 0.75),  # cosine midpoint: (1 + gamma) / 2
        (9000, 0.5),  # e2 * 100: gamma reached
        (9500, 0.5),  # tail
        (12000, 0.5),
    ],
)
def test_flat_cosine_curve(iteration, expected):
    """100 iterations per epoch, policy (4, 50, 90), 2000 warmup iterations, gamma 0.5."""
    assert flat_cosine_factor(iteration, 100, (4, 50, 90), 2000, 0.5) == pytest.approx(expected, abs=1e-12)


def test_flat_cosine_gamma_one_and_warmup_overlap():
    """N's gamma 1.0 stays flat after warmup; a warmup longer than the flat part wins until it ends."""
    assert flat_cosine_factor(7000, 100, (4, 50, 90), 2000, 1.0) == 1.0
    assert flat_cosine_factor(1500, 100, (1, 10, 20), 2000, 0.5) == pytest.approx(0.5625)  # flat ended at 1000
    assert flat_cosine_factor(2100, 100, (1, 10, 20), 2000, 0.5) == 0.5  # past e2 = 2000 iterations


def test_stage_at_boundaries():
    """DEIM-S policy (4, 64, 120); an empty Dense O2O window (e0 == e1) goes straight to 'aug'."""
    policy = (4, 64, 120)
    got = [stage_at(e, policy) for e in (0, 3, 4, 63, 64, 119, 120, 131)]
    assert got == ["warmup", "warmup", "dense_o2o", "dense_o2o", "aug", "aug", "no_aug", "no_aug"]
    assert [stage_at(e, (1, 1, 2)) for e in range(3)] == ["warmup", "aug", "no_aug"]


def test_empty_stages():
    assert empty_stages((4, 64, 120), 132) == []
    assert empty_stages((1, 1, 1), 2) == ["dense_o2o", "aug"]  # DEIM-N's recipe scaled to 2 epochs
    assert empty_stages((1, 2, 3), 3) == ["no_aug"]


def test_short_run_names_the_stages_it_leaves_out(tiny_data, tmp_path, caplog):
    from deim_ultra import DEIM

    caplog.set_level(logging.INFO, logger="ultralytics")
    DEIM("deim-n.yaml").train(
        data=str(tiny_data), epochs=2, imgsz=64, batch=4, workers=0, val=False, plots=False, project=str(tmp_path)
    )
    assert "policy epochs [1, 1, 1] of 2" in caplog.text  # N's (4, 78, 148) of 160, scaled and clamped
    assert "lr warmup 2 iterations" in caplog.text  # the recipe's 2000, cut to e0 = 1 epoch of 8 images / batch 4
    assert "none of the 2 epoch(s) falls to stage(s) dense_o2o, aug" in caplog.text


def test_close_mosaic_ends_dense_o2o_that_many_epochs_before_the_end():
    assert close_mosaic_policy((4, 78, 148), 160, 10) == (4, 78, 148)  # mosaic already ends 82 epochs early
    assert close_mosaic_policy((1, 3, 5), 6, 4) == (1, 2, 5)
    assert close_mosaic_policy((2, 3, 5), 6, 5) == (2, 2, 5)  # the warmup stays, Dense O2O goes
    assert close_mosaic_policy((1, 3, 5), 3, 10) == (1, 1, 5)
    assert close_mosaic_policy((1, 3, 5), 6, 0) == (1, 3, 5)


def test_close_mosaic_under_a_recipe_trains_its_last_epochs_without_mosaic(tiny_data, tmp_path, caplog):
    from deim_ultra import DEIM

    stages = []
    model = DEIM("deim-n.yaml")
    model.add_callback("on_train_epoch_end", lambda trainer: stages.append(trainer.stage))
    caplog.set_level(logging.INFO, logger="ultralytics")
    model.train(
        data=str(tiny_data), epochs=6, close_mosaic=4, imgsz=64, batch=4, workers=0, val=False, plots=False,
        project=str(tmp_path),
    )  # fmt: skip
    assert "policy epochs [1, 2, 5] of 6" in caplog.text  # N's recipe scaled to 6 epochs is [1, 3, 5]
    assert "(close_mosaic=4 moved e1 from 3)" in caplog.text
    assert stages == ["warmup", "dense_o2o", "aug", "aug", "aug", "no_aug"]
    assert "Closing dataloader mosaic" not in caplog.text  # Ultralytics' own switch stays out of the stages


def test_scale_policy_identity():
    for r in RECIPES.values():
        assert scale_policy(r.policy_epochs, r.epochs, r.epochs) == r.policy_epochs


@pytest.mark.parametrize(
    "policy, recipe_epochs, epochs, expected",
    [
        ((4, 64, 120), 132, 24, (1, 12, 22)),  # 0.73 -> 1, 11.64 -> 12, 21.82 -> 22: a 2-epoch tail
        ((4, 78, 148), 160, 72, (2, 35, 67)),  # 1.8 -> 2, 35.1 -> 35, 66.6 -> 67
        ((4, 29, 50), 58, 116, (8, 58, 100)),  # longer runs scale up
        ((1, 3, 4), 4, 6, (2, 5, 6)),  # halves round up (1.5, 4.5); no tail in the recipe, none added
        ((4, 64, 120), 132, 4, (1, 2, 3)),  # 0.12 -> 0 -> at least 1; 3.64 -> 4 -> capped to keep a tail
        ((4, 64, 120), 132, 2, (1, 1, 1)),
        ((4, 64, 120), 132, 1, (1, 1, 1)),  # one epoch: no room for a tail
    ],
)
def test_scale_policy_examples(policy, recipe_epochs, epochs, expected):
    assert scale_policy(policy, recipe_epochs, epochs) == expected


def test_scale_policy_invariants():
    for r in RECIPES.values():
        for epochs in range(1, 301):
            e0, e1, e2 = scale_policy(r.policy_epochs, r.epochs, epochs)
            assert 0 < e0 <= e1 <= e2 <= epochs
            assert e2 < epochs or epochs == 1


def test_scale_policy_rejects_bad_policy():
    with pytest.raises(ValueError):
        scale_policy((4, 130, 120), 132, 24)


def test_multiscale_sizes():
    expected = [480, 512, 544, 576, 608] + [640] * 20 + [672, 704, 736, 768, 800]
    assert multiscale_sizes(640, 20) == expected
    assert multiscale_sizes(640, 20, 0.25) == expected  # the recipe's multi_scale: the authors' list
    assert multiscale_sizes(320, 1) == [256, 288, 320, 352, 384]  # 320 * 0.25 = 80 px: two 32-px steps
    assert multiscale_sizes(128, 2, 0.5) == [64, 96, 128, 128, 160, 192]
    assert multiscale_sizes(64, 2, 0.9) == [32, 64, 64, 96]  # never below one 32-px stride
    assert multiscale_sizes(640, None) == [640]
    assert multiscale_sizes(120, 3) == [120]  # 120 * 0.25 = 30 px: less than one step, no multi-scale


def test_ema_decay():
    assert ema_decay(0, 0.9999, 1000) == 0.0
    assert ema_decay(1000, 0.9999, 1000) == pytest.approx(0.9999 * (1 - 1 / math.e), rel=1e-12)
    assert ema_decay(10**6, 0.9999, 1000) == pytest.approx(0.9999, rel=1e-12)


def test_param_groups_bias_norm_shared_frozen():
    """Toy model: biases (incl. in_proj_bias) and norms skip decay outside the backbone; shared/frozen handled."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    a, b, attn, norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.MultiheadAttention(4, 2), nn.LayerNorm(4)
    b.weight = a.weight  # one parameter held by two modules
    model = nn.ModuleDict({"stem": stem, "a": a, "b": b, "attn": attn, "norm": norm})
    model.register_parameter("frozen", nn.Parameter(torch.ones(1), requires_grad=False))
    groups = {g["name"]: g for g in param_groups(model, 1.0, 0.1, 0.01, backbone=[stem])}
    ids = {k: [id(p) for p in g["params"]] for k, g in groups.items()}
    assert sorted(ids["backbone"]) == sorted(id(p) for p in stem.parameters())  # conv weight/bias, BN weight/bias
    no_decay = [a.bias, b.bias, attn.in_proj_bias, attn.out_proj.bias, norm.weight, norm.bias]
    assert sorted(ids["no_decay"]) == sorted(id(p) for p in no_decay)
    assert sorted(ids["default"]) == sorted(id(p) for p in (a.weight, attn.in_proj_weight, attn.out_proj.weight))
    assert [(g["lr"], g["weight_decay"]) for g in groups.values()] == [(0.1, 0.01), (1.0, 0.0), (1.0, 0.01)]


def test_param_groups_match_official_regexes_deim_n(parity_fixture):
    """Every trainable DEIM-N parameter lands in exactly one group, with the (lr, weight decay) that the official
    N config's regexes give its official name."""
    from deim_ultra.convert import TRAINING_ONLY_KEYS, official_prefixes, rename_official_key
    from deim_ultra.nn.tasks import DEIMDetectionModel
    from deim_ultra.official_names import official_namer

    model = DEIMDetectionModel("deim-n.yaml", verbose=False)
    optimizer = build_adamw(official_param_groups(model, official_namer(model), "n", LR, BACKBONE_LR, WD), LR, WD)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    groups = optimizer.param_groups

    ours_to_official = {v: k for k, v in official_prefixes(model).items()}
    official = {id(p): rename_official_key(n, ours_to_official) for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    placed = [id(p) for g in groups for p in g["params"]]
    assert len(placed) == len(set(placed)) == len(trainable) and set(placed) == trainable

    known = set(parity_fixture["state_dict"]) | set(TRAINING_ONLY_KEYS)
    counts = {}
    for g in groups:
        for p in g["params"]:
            name = official[id(p)]
            assert name in known
            hits = [(lr, wd) for pattern, lr, wd in OFFICIAL_N_GROUPS if re.findall(pattern, name)]
            assert len(hits) <= 1, name  # the official code asserts the groups are disjoint
            assert (g["lr"], g["weight_decay"]) == (hits[0] if hits else (LR, WD)), name
        counts[g["name"]] = len(g["params"])
    # The official regexes on the fixture's 431 parameter names (keys less BN statistics and the anchors, valid_mask
    # and num_points_scale buffers): 186 backbone (BN and LAB included), 151 encoder/decoder norms and biases, 94
    # others, of which 4 are the frozen up/reg_scale; our model adds the denoising embedding.
    assert counts == {"backbone_lr": 186, "lr_no_decay": 151, "default": 94 - 4 + 1}


def test_tail_restart_rule():
    from deim_ultra.recipe.tail_restart import restore_before

    # The end of the authors' seed-0 curve (reference CSV, epochs 28-32): best pre-tail 0.6196, tail 0.7164, 0.7569.
    authors = [0.5555, 0.6196, 0.5583, 0.7164, 0.7569]
    assert restore_before(3, authors, 3)  # the tail always starts from the best pre-tail state
    assert not restore_before(4, authors, 3)  # 0.7164 beat 0.6196: continue
    stalls = [0.3, 0.5, 0.4, 0.45, 0.6, 0.5]
    assert not restore_before(1, stalls, 2)  # before the tail: never
    assert restore_before(3, stalls, 2)  # 0.4 <= 0.5: restart
    assert not restore_before(4, stalls, 2)  # after a restart the next epoch is the new reference, whatever it is
    assert not restore_before(5, stalls, 2)  # 0.6 > 0.45
    assert restore_before(6, stalls, 2)  # 0.5 <= 0.6
    assert restore_before(3, [0.5, 0.5, 0.5], 2)  # a tie does not improve
    assert not restore_before(3, [0.5, 0.5, 0.5], 0)  # no pre-tail stage: nothing to restart from


# Official names -> (lr is the backbone's, decayed), read off each size's config regexes by hand.
SIZE_GROUPS = {
    "n": {"backbone.stem.stem1.bn.weight": (True, True), "decoder.dec_score_head.0.bias": (False, False)},
    "s": {
        "backbone.stem.stem1.conv.weight": (True, True),
        "backbone.stem.stem1.lab.scale": (True, True),
        "backbone.stem.stem1.bn.weight": (False, False),  # S and M: backbone BatchNorm at the base lr, no decay
        "encoder.input_proj.0.norm.weight": (False, False),
        "decoder.dec_score_head.0.bias": (False, True),  # biases decay
        "decoder.dec_score_head.0.weight": (False, True),
    },
    "m": {"backbone.stem.stem1.bn.weight": (False, False), "decoder.dec_score_head.0.bias": (False, True)},
    "l": {
        "backbone.stem.stem1.bn.weight": (True, True),
        "encoder.input_proj.0.norm.weight": (False, False),
        "decoder.dec_score_head.0.bias": (False, True),
    },
    "x": {"backbone.stem.stem1.bn.weight": (True, True), "decoder.dec_score_head.0.bias": (False, True)},
}


@pytest.mark.parametrize("size", sorted(SIZE_GROUPS))
def test_each_size_gets_its_own_parameter_groups(size, tiny_data, tmp_path):
    from deim_ultra.nn.tasks import DEIMDetectionModel
    from deim_ultra.official_names import official_namer
    from deim_ultra.train import DEIMTrainer

    trainer = DEIMTrainer(overrides=dict(model=f"deim-{size}.yaml", data=str(tiny_data), project=str(tmp_path)))
    model = DEIMDetectionModel(f"deim-{size}.yaml", nc=3, verbose=False)
    args = trainer.args
    optimizer = trainer.build_optimizer(model, lr=args.lr0, momentum=args.momentum, decay=args.weight_decay)
    name = official_namer(model)
    where = {name(n): next(g for g in optimizer.param_groups if any(q is p for q in g["params"])) for n, p in
             model.named_parameters() if p.requires_grad}  # fmt: skip
    for official, (at_backbone_lr, decays) in SIZE_GROUPS[size].items():
        group = where[official]
        assert group["lr"] == (args.backbone_lr if at_backbone_lr else args.lr0), official
        assert group["weight_decay"] == (args.weight_decay if decays else 0.0), official
