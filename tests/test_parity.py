"""DEIM-N converted from the authors' weights reproduces the authors' tensors (../shared/parity).

The fixture was recorded in this order, so the test follows it: a train-mode pass with denoising off (its outputs and
loss terms are `train_no_denoising`; it also moves BatchNorm running statistics one step), then eval mode (`eval`),
then the deploy conversion and post-processing (`postprocessed`). Near-tied encoder scores may select the same
queries in another order, so per-query tensors are compared after matching queries one to one.
"""

import pytest
import torch

from deim_ultra import convert_official

from helpers import assert_same_queries, match_queries


@pytest.fixture(scope="module")
def run(parity_fixture):
    """Convert, then replay the authors' sequence: train-mode pass, eval pass, deploy pass."""
    model = convert_official(parity_fixture["state_dict"], "deim-n.yaml").model
    model.model[-1].num_denoising = 0
    images, targets = parity_fixture["images"], parity_fixture["targets"]
    batch = {
        "img": images,
        "cls": torch.cat([t["labels"] for t in targets]).float()[:, None],
        "bboxes": torch.cat([t["boxes_cxcywh_norm"] for t in targets]),
        "batch_idx": torch.cat([torch.full((len(t["labels"]),), i) for i, t in enumerate(targets)]),
    }
    model.train()
    with torch.no_grad():
        train_out = model.predict(images)
        model.criterion = model.init_criterion()
        terms = model.criterion(train_out, [{"labels": t["labels"], "boxes": t["boxes_cxcywh_norm"]} for t in targets])
        total, groups = model.loss(batch, train_out)
    model.eval()
    with torch.no_grad():
        eval_out = model(images)[1][-1]
        model.fuse(verbose=False)
        detections = model(images)[0]
    return dict(train=train_out, terms=terms, total=total, groups=groups, eval=eval_out, detections=detections)


def test_train_outputs_match(run, parity_fixture):
    ref = parity_fixture["train_no_denoising"]["outputs"]
    assert_same_queries(run["train"]["pred_logits"], run["train"]["pred_boxes"], ref["pred_logits"], ref["pred_boxes"])


def test_loss_terms_match(run, parity_fixture):
    ref = parity_fixture["train_no_denoising"]["loss_terms"]
    terms = run["terms"]
    assert sorted(terms) == sorted(ref) and len(ref) == 20
    for name, value in ref.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4), name
    assert run["total"].item() == pytest.approx(sum(ref.values()), rel=1e-5)
    for kind in ("mal", "bbox", "giou", "fgl", "ddf"):  # the trainer's loss columns are sums of the official terms
        expected = sum(v for k, v in ref.items() if k.split("_")[1] == kind)
        assert run["groups"][kind].item() == pytest.approx(expected, rel=1e-4), kind  # each term is within 1e-4


def test_eval_outputs_match(run, parity_fixture):
    ref = parity_fixture["eval"]
    assert_same_queries(
        run["eval"]["pred_logits"], run["eval"]["pred_boxes"], ref["pred_logits"], ref["pred_boxes_cxcywh_norm"]
    )


def test_postprocessed_detections_match(run, parity_fixture):
    ref = parity_fixture["postprocessed"]
    y = run["detections"]  # (B, 300, 6): cx, cy, w, h normalised, score, class
    w, h = 640, 480
    cx, cy, bw, bh = y[..., 0] * w, y[..., 1] * h, y[..., 2] * w, y[..., 3] * h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    for i in range(y.shape[0]):
        scores, ref_scores = y[i, :, 4], ref["scores"][i]
        assert (scores.sort(descending=True)[0] - ref_scores.sort(descending=True)[0]).abs().max() <= 1e-4
        ours = torch.cat([boxes[i], scores[:, None] * 1e4, y[i, :, 5:6] * 1e4], -1)  # match on score/label first
        theirs = torch.cat([ref["boxes_xyxy_orig"][i], ref_scores[:, None] * 1e4, ref["labels"][i, :, None] * 1e4], -1)
        matched = theirs[match_queries(ours, theirs)]
        assert (boxes[i] - matched[:, :4]).abs().max() <= 1e-2
        assert torch.equal(y[i, :, 5], matched[:, 5] / 1e4)
