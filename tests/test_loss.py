"""Tests of the DEIM criterion: parity with the authors' loss terms, hand-computed MAL/VFL/FGL, matcher optimality,
union set, denoising and one-to-many terms, non-finite guarding."""

from __future__ import annotations

import math
from itertools import permutations
from pathlib import Path

import pytest
import torch
from ultralytics.models.utils.ops import get_cdn_group

from deim_ultra.loss import (
    HungarianMatcher,
    denoising_indices,
    distance_bins,
    fgl_loss,
    mal_loss,
    union_indices,
    vfl_loss,
)
from deim_ultra.loss.criterion import DEIMCriterion
from deim_ultra.loss.one_to_many import one_to_many_assign
from deim_ultra.nn.tasks import DEIMDetectionModel


def criterion(nc: int, **args) -> DEIMCriterion:
    """The criterion a DEIM-N model of `nc` classes builds for training with settings `args`, the shipped defaults
    (deim_ultra/cfg/default.yaml) for the rest."""
    model = DEIMDetectionModel("deim-n.yaml", nc=nc, verbose=False)
    model.args = args
    return model.init_criterion()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(x: float, t: float) -> float:
    """Binary cross-entropy of logit x against soft target t, written out."""
    p = sigmoid(x)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


@pytest.fixture(scope="module")
def official(parity_fixture: dict) -> tuple[dict, list[dict]]:
    """The authors' training-mode outputs and loss terms, and the fixture's targets in the criterion's format."""
    targets = [{"labels": t["labels"], "boxes": t["boxes_cxcywh_norm"]} for t in parity_fixture["targets"]]
    return parity_fixture["train_no_denoising"], targets


def test_parity_with_official_terms(official):
    data, targets = official
    weights = {name.removeprefix("loss_"): w for name, w in data["loss_weights"].items()}
    crit = DEIMCriterion(80, weights, "mal", data["mal_gamma"], reg_max=32, union_set=True)
    losses = crit(data["outputs"], targets)
    ref = data["loss_terms"]
    assert list(losses) == list(ref)
    for name, value in ref.items():
        assert losses[name].item() == pytest.approx(float(value), rel=1e-4), name
    assert sum(v.item() for v in losses.values()) == pytest.approx(sum(float(v) for v in ref.values()), rel=1e-5)
    # Hungarian on 4 + 7 GTs with 300 queries: every GT gets exactly one final-layer query.
    assert crit.last_pos_per_img == pytest.approx(5.5)


def test_shipped_settings_are_the_authors(official):
    data, _ = official
    crit = criterion(80)
    assert crit.gamma == data["mal_gamma"]
    authors = {name.removeprefix("loss_"): w for name, w in data["loss_weights"].items()}
    assert crit.weights == {name: w for name, w in authors.items() if name != "vfl"}


def test_class_loss_names_follow_cls_loss(official):
    data, targets = official
    for kind in ("vfl", "focal"):
        losses = criterion(80, cls_loss=kind)(data["outputs"], targets)
        expected = {n.replace("loss_mal", f"loss_{kind}") for n in data["loss_terms"]}
        assert set(losses) == expected
        assert losses[f"loss_{kind}"].item() != pytest.approx(float(data["loss_terms"]["loss_mal"]), rel=1e-3)


def test_eval_outputs_give_only_final_terms(official):
    data, targets = official
    outputs = {k: data["outputs"][k] for k in ("pred_logits", "pred_boxes")}
    losses = criterion(80)(outputs, targets)
    assert set(losses) == {"loss_mal", "loss_bbox", "loss_giou"}
    # The class term uses the layer's own matching and num_boxes, exactly as in training.
    assert losses["loss_mal"].item() == pytest.approx(float(data["loss_terms"]["loss_mal"]), rel=1e-4)


def test_mal_hand_computed_through_criterion():
    # One GT (class 0, w 0.2, h 0.1). Query 0 shares its centre with w = h = 0.2: IoU = 0.02 / 0.04 = 0.5.
    # Query 1 is far away and confident, a pure negative.
    x_pos, x_neg, q, gamma = 0.3, 1.2, 0.5, 1.5
    outputs = {
        "pred_logits": torch.tensor([[[x_pos], [x_neg]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.1]])}]
    losses = criterion(1, mal_gamma=gamma)(outputs, targets)
    positive = bce(x_pos, q**gamma)  # weight 1, target q**gamma
    negative = sigmoid(x_neg) ** gamma * -math.log(1 - sigmoid(x_neg))  # weight p**gamma, target 0
    assert losses["loss_mal"].item() == pytest.approx(positive + negative, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.1, rel=1e-5)  # |h 0.2 - 0.1| * weight 5
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - 0.5), rel=1e-5)  # hull == union -> GIoU == IoU


def test_mal_and_vfl_differ_on_confident_low_iou_match():
    # A confident (p = sigmoid(3)) positive matched with IoU 0.1: VFL scales the positive by q, MAL does not.
    x, q, gamma = 3.0, 0.1, 1.5
    onehot = torch.ones(1, 1, 1)
    iou = torch.tensor([[q]])
    losses = {}
    grads = {}
    for name, fn, alpha in (("mal", mal_loss, None), ("vfl", vfl_loss, 0.75)):
        logit = torch.tensor([[[x]]], requires_grad=True)
        loss = fn(logit, onehot, iou, gamma, alpha)
        loss.backward()
        losses[name], grads[name] = loss.item(), logit.grad.item()
    p = sigmoid(x)
    assert losses["mal"] == pytest.approx(bce(x, q**gamma), rel=1e-5)
    assert losses["vfl"] == pytest.approx(q * bce(x, q), rel=1e-5)
    assert grads["mal"] == pytest.approx(p - q**gamma, rel=1e-5)
    assert grads["vfl"] == pytest.approx(q * (p - q), rel=1e-5)
    assert grads["mal"] > 5 * grads["vfl"]  # MAL pushes the over-confident score down far harder


def test_vfl_negative_weighted_by_alpha():
    x, gamma, alpha = -0.4, 2.0, 0.75
    loss = vfl_loss(torch.tensor([[[x]]]), torch.zeros(1, 1, 1), torch.zeros(1, 1), gamma, alpha)
    assert loss.item() == pytest.approx(alpha * sigmoid(x) ** gamma * bce(x, 0.0), rel=1e-5)


def test_matcher_finds_optimum_not_greedy_choice():
    # Identical boxes, so only the class cost decides. Image 0: query 0 is best for GT 0 (class 0), but giving it
    # GT 0 leaves query 1 with p = 0.01 for class 1; the optimum crosses over. Image 1 has a single GT.
    probs = torch.tensor([[[0.9, 0.8], [0.8, 0.01], [0.05, 0.05]], [[0.1, 0.2], [0.1, 0.7], [0.3, 0.1]]])
    logits = torch.logit(probs)
    boxes = torch.full((2, 3, 4), 0.3)
    gt_box = torch.full((1, 4), 0.3)
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": gt_box.repeat(2, 1)},
        {"labels": torch.tensor([1]), "boxes": gt_box},
    ]
    (q0, g0), (q1, g1) = HungarianMatcher()(logits, boxes, targets)
    assert dict(zip(q0.tolist(), g0.tolist())) == {0: 1, 1: 0}
    assert dict(zip(q1.tolist(), g1.tolist())) == {1: 0}


def test_matcher_agrees_with_brute_force():
    torch.manual_seed(0)
    logits, boxes = torch.randn(1, 5, 4), torch.rand(1, 5, 4) * 0.4 + 0.2
    gt_boxes = torch.rand(3, 4) * 0.4 + 0.2
    labels = torch.tensor([2, 0, 2])
    q, g = HungarianMatcher()(logits, boxes, [{"labels": labels, "boxes": gt_boxes}])[0]

    def pair_cost(i: int, j: int) -> float:
        p = torch.sigmoid(logits[0, i, labels[j]]).item()
        cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
        a, b = boxes[0, i].tolist(), gt_boxes[j].tolist()
        l1 = sum(abs(u - v) for u, v in zip(a, b))
        ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
        bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
        inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
        union = a[2] * a[3] + b[2] * b[3] - inter
        hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
        return 2 * cls + 5 * l1 - 2 * (inter / union - (hull - union) / hull)

    best = min(permutations(range(5), 3), key=lambda qs: sum(pair_cost(qi, j) for j, qi in enumerate(qs)))
    assert dict(zip(g.tolist(), q.tolist())) == dict(enumerate(best))


def test_union_set_keeps_most_frequent_gt_per_query():
    layers = [
        [(torch.tensor([4, 9]), torch.tensor([0, 1]))],
        [(torch.tensor([4, 2]), torch.tensor([1, 0]))],
        [(torch.tensor([4, 9]), torch.tensor([0, 1]))],
        [(torch.tensor([7, 2]), torch.tensor([1, 2]))],  # query 2: GT 0 once, GT 2 once -> tie -> lowest GT
    ]
    ((q, g),) = union_indices(layers, [3])
    assert dict(zip(q.tolist(), g.tolist())) == {2: 0, 4: 0, 7: 1, 9: 1}


def test_distance_bins_and_fgl_by_hand():
    up, scale = torch.tensor([0.5]), torch.tensor([4])
    s = 3 ** (1 / 15)
    w17, w18 = s - 1, s**2 - 1
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    # Edge distance from the centre, in decoder units: d = dist * reg_scale / size - reg_scale / 2 with size 0.2,
    # so dist = (d + 2) * 0.05. Left: d = -5 below the first bin (-4); top: a quarter of the way from bin 16 (0) to
    # bin 17; right: d = 5 beyond the last bin (4); bottom: midway between bins 17 and 18. The GT box stays valid.
    d = [-5.0, 0.25 * w17, 5.0, (w17 + w18) / 2]
    dist = [(x + 2) * 0.05 for x in d]
    x0, y0, x1, y1 = 0.5 - dist[0], 0.5 - dist[1], 0.5 + dist[2], 0.5 + dist[3]
    assert x1 > x0 and y1 > y0
    gt = torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]], dtype=torch.float64)
    left, weight_right = distance_bins(ref.double(), gt, 32, up, scale)
    assert left.tolist() == [0, 16, 31, 17]
    assert weight_right.tolist() == pytest.approx([0.0, 0.25, 1.0, 0.5], abs=1e-5)

    corners = torch.randn(1, 4 * 33, dtype=torch.float64)
    logp = torch.log_softmax(corners.view(4, 33), -1)
    iou = 0.6
    per_edge = [logp[0, 0], 0.75 * logp[1, 16] + 0.25 * logp[1, 17], logp[2, 32], 0.5 * logp[3, 17] + 0.5 * logp[3, 18]]
    expected = -iou * sum(per_edge)
    assert fgl_loss(corners, left, weight_right, torch.tensor([iou], dtype=torch.float64)).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


LAYER_KEYS = ("pred_logits", "pred_boxes", "pred_corners", "ref_points")


def _layers(bs: int, nq: int, nc: int, n: int = 2, reg_max: int = 32) -> list[dict]:
    """n random D-FINE-shaped layer dicts sharing reference points, each with the last layer as teacher."""
    ref = torch.cat([torch.rand(bs, nq, 2) * 0.6 + 0.2, torch.rand(bs, nq, 2) * 0.2 + 0.1], -1)
    layers = [
        {
            "pred_logits": torch.randn(bs, nq, nc),
            "pred_boxes": (ref + 0.02 * torch.randn_like(ref)).clamp(0.01, 0.99),
            "pred_corners": torch.randn(bs, nq, 4 * (reg_max + 1)),
            "ref_points": ref,
        }
        for _ in range(n)
    ]
    for layer in layers:
        layer.update(teacher_corners=layers[-1]["pred_corners"], teacher_logits=layers[-1]["pred_logits"])
    return layers


def _training_dict(layers: list[dict]) -> dict:
    """Decoder training dict: final layer (without teacher), distance hyper-parameters, earlier layers as aux."""
    final = {k: layers[-1][k] for k in LAYER_KEYS}
    return {**final, "up": torch.tensor([0.5]), "reg_scale": torch.tensor([4.0]), "aux_outputs": layers[:-1]}


def test_denoising_terms_names_and_normalisation():
    bs, nq, nc = 2, 8, 3
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.1, 0.3]])},
    ]
    batch = {
        "cls": torch.tensor([0, 2, 1]),
        "bboxes": torch.cat([t["boxes"] for t in targets]),
        "batch_idx": torch.tensor([0, 0, 1]),
        "gt_groups": [2, 1],
    }
    torch.manual_seed(0)
    *_, meta = get_cdn_group(batch, nc, nq, torch.randn(nc, 4), num_dn=6, training=True)
    groups, num_dn = meta["dn_num_group"], meta["dn_num_split"][0]
    assert groups == 3
    outputs = _training_dict(_layers(bs, nq, nc))
    outputs["dn_outputs"] = dn = _layers(bs, num_dn, nc)
    outputs["dn_pre_outputs"] = {"pred_logits": torch.randn(bs, num_dn, nc), "pred_boxes": dn[0]["pred_boxes"]}
    outputs["dn_meta"] = meta

    losses = criterion(nc)(outputs, targets)
    dn_names = {n for n in losses if "_dn_" in n}
    per_layer = ("mal", "bbox", "giou", "fgl", "ddf")
    assert dn_names == {f"loss_{t}_dn_{i}" for i in range(2) for t in per_layer} | {
        "loss_mal_dn_pre",
        "loss_bbox_dn_pre",
        "loss_giou_dn_pre",
    }
    # The last dn layer is its own teacher: DDF is exactly zero there, non-zero on the earlier one.
    assert losses["loss_ddf_dn_1"].item() == 0.0
    assert losses["loss_ddf_dn_0"].item() > 0.0

    # Positive dn queries of group k for image i sit at k * 2 * max_gt + j and reconstruct GT j.
    max_gt = 2
    l1 = 0.0
    for i, t in enumerate(targets):
        for k in range(groups):
            for j, box in enumerate(t["boxes"]):
                l1 += (dn[1]["pred_boxes"][i, k * 2 * max_gt + j] - box).abs().sum().item()
    # Normalised by num_boxes (3 GTs) * dn groups, not by the GO set or the number of dn queries.
    assert losses["loss_bbox_dn_1"].item() == pytest.approx(5 * l1 / (3 * groups), rel=1e-5)


def test_denoising_indices_follow_subsampled_gts():
    meta = {
        "dn_pos_idx": [torch.tensor([0, 1, 4, 5]), torch.tensor([0, 4])],
        "dn_gt_idx": [torch.tensor([1, 3]), torch.tensor([5])],
        "dn_num_group": 2,
    }
    (q0, g0), (q1, g1) = denoising_indices(meta, [4, 2])  # image 1's GTs are batch rows 4, 5
    assert q0.tolist() == [0, 1, 4, 5] and g0.tolist() == [1, 3, 1, 3]
    assert q1.tolist() == [0, 4] and g1.tolist() == [1, 1]


MS_DETR_O2M = Path(__file__).parent / "fixtures" / "ms_detr_o2m_assign.pt"


@pytest.mark.parametrize("case", ["q20", "q60", "q200"])
def test_one_to_many_assignment_equals_the_authors_stage2_assigner(case):
    """Pairs and their order as MS-DETR's `Stage2Assigner` gave them on recorded inputs (tests/fixtures/README.md);
    q20 and q60 each hold an image with more positives than the cap, so the random draw counts."""
    fixture = torch.load(MS_DETR_O2M, weights_only=True)
    recorded = fixture["cases"][case]
    for b, (target, (query, gt)) in enumerate(zip(recorded["targets"], recorded["pairs"])):
        torch.manual_seed(fixture["seed"])
        ((q, g),) = one_to_many_assign(recorded["pred_logits"][b : b + 1], recorded["pred_boxes"][b : b + 1], [target])
        assert q.tolist() == query.tolist() and g.tolist() == gt.tolist(), f"{case} image {b}"


def one_gt_and_queries(num_queries: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """One GT of class 1; queries 0-8 share its centre and height with IoU 1.0 ... 0.3 (narrower), the rest far away.
    With p = 0.5 everywhere the quality is 0.7 * IoU + 0.15: queries 0-7 reach 0.4, query 8 (IoU 0.3) does not."""
    ious = [1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.3]
    boxes = torch.tensor([[0.5, 0.5, 0.2 * r, 0.2] for r in ious] + [[0.05, 0.05, 0.02, 0.02]] * (num_queries - 9))
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    return torch.zeros(1, num_queries, 2), boxes[None], targets


def test_one_to_many_takes_the_best_k_or_as_many_as_the_cap_keeps():
    logits, boxes, targets = one_gt_and_queries(40)  # cap 10 >= 8 positives: the best 6 (K)
    ((q, g),) = one_to_many_assign(logits, boxes, targets)
    assert q.tolist() == [5, 4, 3, 2, 1, 0] and g.tolist() == [0] * 6  # lowest quality first
    logits, boxes, targets = one_gt_and_queries(20)  # cap int(0.25 * 20) = 5 of the 8 positives: 5 pairs
    ((q, g),) = one_to_many_assign(logits, boxes, targets)
    assert q.tolist() == [4, 3, 2, 1, 0]


def test_one_to_many_terms_of_every_layer():
    logits, boxes, targets = one_gt_and_queries(40)
    outputs = {
        "pred_logits": logits,
        "pred_boxes": boxes,
        "o2m_outputs": [{"pred_logits": logits, "pred_boxes": boxes}] * 2,
    }
    crit = criterion(2)
    losses = crit(outputs, targets)
    assert {f"loss_{k}_o2m_{i}" for k in ("mal", "bbox", "giou") for i in (0, 1)} <= set(losses)
    l1 = sum(0.2 * (1 - r) for r in (1.0, 0.9, 0.8, 0.7, 0.6, 0.55))  # the six pairs, one GT: num_boxes 1
    assert losses["loss_bbox_o2m_1"].item() == pytest.approx(5 * l1, rel=1e-5)
    # MS-DETR's focal loss at p = 0.5: each of the 6 positives (class 1) costs 0.25 * 0.5**2 * ln 2, each of the other
    # 40 * 2 - 6 (query, class) entries 0.75 * 0.5**2 * ln 2; weight 2.
    focal = (6 * 0.25 + 74 * 0.75) * 0.25 * math.log(2)
    assert losses["loss_mal_o2m_0"].item() == pytest.approx(2 * focal, rel=1e-5)
    assert crit.last_pos_per_img == 6.0  # the Hungarian match (query 0) is one of the six


def test_a_query_two_gts_took_is_classified_as_its_best():
    from deim_ultra.loss.criterion import Matched, best_pair_per_query

    # Pairs lowest quality first: query 3 of image 0 went to GT class 2, then (better) to GT class 0.
    match = Matched(
        batch=torch.tensor([0, 0, 1, 0]),
        query=torch.tensor([3, 5, 3, 3]),
        labels=torch.tensor([2, 1, 1, 0]),
        boxes=torch.arange(16.0).view(4, 4),
    )
    best = best_pair_per_query(match)
    pairs = sorted(zip(best.batch.tolist(), best.query.tolist(), best.labels.tolist()))
    assert pairs == [(0, 3, 0), (0, 5, 1), (1, 3, 1)]


def test_non_finite_term_reaches_the_total():
    """A NaN term is not replaced by 0: the total must show it, so the trainer skips the step (test_nonfinite.py)
    instead of training on a loss with a term silently removed."""
    torch.manual_seed(0)
    outputs = _training_dict(_layers(1, 6, 2))
    outputs["aux_outputs"][0]["pred_corners"] = torch.full_like(outputs["pred_corners"], float("nan"))
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    losses = criterion(2)(outputs, targets)
    assert losses["loss_fgl_aux_0"].isnan() and losses["loss_ddf_aux_0"].isnan()
    assert torch.isfinite(losses["loss_fgl"]) and losses["loss_fgl"] > 0
    assert sum(losses.values()).isnan()


def test_matcher_orders_saturated_scores_from_half_precision_inputs():
    """Two confident queries for one GT: p = sigmoid(10) and sigmoid(14) are both 1.0 in fp16, where the focal cost
    is -inf for both and the box cost vanishes next to it. In fp32 the surer query (cost 2 * -10.5 against 2 * -7.5)
    wins despite its box being 0.1 further (L1 cost 5 * 0.1, GIoU cost below 2 * 0.5)."""
    logits = torch.tensor([[[10.0], [14.0]]], dtype=torch.float16)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.55, 0.55, 0.2, 0.2]]], dtype=torch.float16)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with torch.autocast("cpu", dtype=torch.float16):
        ((query, gt),) = HungarianMatcher()(logits, boxes, targets)
    assert query.tolist() == [1] and gt.tolist() == [0]


@pytest.mark.parametrize("cls_loss, gamma", [("mal", 1.5), ("vfl", 2.0), ("focal", 2.0)])
def test_each_class_loss_gets_its_own_recipe_gamma(cls_loss, gamma):
    """MAL runs with DEIM's 1.5; VFL and focal keep RT-DETR's / D-FINE's 2.0 whatever mal_gamma says."""
    x_neg = 1.2  # one confident query, no GT in the image: a pure negative, loss = weight * -log(1 - p)
    outputs = {"pred_logits": torch.tensor([[[x_neg]]]), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    losses = criterion(1, cls_loss=cls_loss)(outputs, targets)
    p = sigmoid(x_neg)
    alpha = {"mal": 1.0, "vfl": 0.75, "focal": 1 - 0.75}[cls_loss]
    expected = alpha * p**gamma * -math.log(1 - p)
    assert losses[f"loss_{cls_loss}"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_criterion_computes_in_float32_from_half_precision_outputs(dtype, autocast_dtype):
    """Under autocast the decoder hands the criterion half-precision tensors; the loss is still computed in float32
    (as the authors run it, autocast off), so it equals the loss of the same values given in float32."""
    from deim_ultra.loss.criterion import as_float32

    torch.manual_seed(0)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.1, 0.3]])},
    ]
    outputs = _training_dict(_layers(2, 16, 3))
    outputs["pred_logits"] = outputs["pred_logits"] * 12  # saturated scores: their fp16 focal costs overflow

    def cast(tree):  # down to `dtype`, like the outputs of a forward under autocast
        if isinstance(tree, torch.Tensor):
            return tree.to(dtype) if tree.is_floating_point() else tree
        if isinstance(tree, dict):
            return {k: cast(v) for k, v in tree.items()}
        return [cast(v) for v in tree] if isinstance(tree, list) else tree

    half = cast(outputs)
    with torch.autocast("cpu", dtype=autocast_dtype):
        in_autocast = criterion(3)(half, targets)
    reference = criterion(3)(as_float32(half), targets)
    assert in_autocast.keys() == reference.keys()
    for name, value in in_autocast.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, reference[name]), name


@pytest.mark.parametrize(
    "pred, loss",
    [
        ([0.5, 0.5, -0.1, -0.1], 1.0),  # both edges crossed: a point at the GT's centre, IoU 0, hull = the GT
        ([0.5, 0.5, -0.1, 0.2], 1.0),  # width crossed: a vertical line through the GT, IoU 0, hull = the GT
        ([0.5, 0.5, 0.0, 0.0], 1.0),
    ],
)
def test_inverted_predicted_boxes_are_zero_size_boxes(pred, loss):
    """FDR's edge distances can cross and give a negative width or height. Like the authors' conversion, the loss takes
    such a box as zero-size: 1 - GIoU stays in [0, 2] (a negative area would give 0.75 and 1.5 here) and the IoU that
    MAL targets and the matcher use is 0."""
    from deim_ultra.loss.localization import box_losses, paired_iou

    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    _, giou = box_losses(torch.tensor([pred]), gt)
    assert giou.item() == pytest.approx(loss)
    assert paired_iou(torch.tensor([pred]), gt).item() == 0.0
    cost = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)
    indices = cost(
        torch.zeros(1, 2, 3),
        torch.tensor([[pred, [0.5, 0.5, 0.19, 0.19]]]),
        [{"labels": torch.tensor([0]), "boxes": gt}],
    )
    assert indices[0][0].tolist() == [1]  # the real box wins the match over the degenerate one
