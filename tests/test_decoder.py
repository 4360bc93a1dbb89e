"""D-FINE decoder head against the official DEIM-N numbers (parity fixture) and its training-time contracts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ultralytics.nn.modules.head import RTDETRDecoder

from deim_ultra.nn.decoder import DFINEDecoder, anchor_logits
from deim_ultra.nn.fdr import weighting_function

# deim-n.yaml's decoder row: nc, hidden, ffn, layers, points, queries, denoising, noise, reg_max, reg_scale, ...
N_ARGS = dict(
    nc=80,
    hidden_dim=128,
    ffn_dim=512,
    num_layers=3,
    num_points=[6, 6],
    num_queries=300,
    num_denoising=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
    reg_max=32,
    reg_scale=4.0,
    eval_idx=-1,
    act="silu",
    feat_strides=[16, 32],
)
# Official decoder parameters from the fixture (state dict minus the anchors/valid_mask buffers), less the 3 x 12
# num_points_scale entries and both copies of the shared up/reg_scale (buffers here), plus the denoising embedding.
N_TRAIN_PARAMS = 1_218_143 - 36 - 4 + 81 * 128
N_DEPLOY_DROP = 2 * (128 * 80 + 80) + 2 * (20 * 64 + 64 + 64 + 1)  # score heads and LQEs of layers 0 and 1


@pytest.fixture(scope="module")
def official_decoder(parity_fixture: dict) -> DFINEDecoder:
    """The N decoder loaded with the fixture's `decoder.*` weights (only the denoising embedding is absent there)."""
    model = DFINEDecoder([128, 128], **N_ARGS)
    state = {k.removeprefix("decoder."): v for k, v in parity_fixture["state_dict"].items() if k.startswith("decoder.")}
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["denoising_class_embed.weight"]
    assert result.unexpected_keys == []
    return model


@pytest.fixture
def decoder(official_decoder: DFINEDecoder) -> DFINEDecoder:
    """A private copy of the loaded decoder that a test may switch modes of or convert."""
    return copy.deepcopy(official_decoder)


def _dn_batch(parity_fixture: dict) -> dict:
    """The fixture's targets in the batch format of `DFINEDecoder.forward`."""
    targets = parity_fixture["targets"]
    return {
        "cls": torch.cat([t["labels"] for t in targets]),
        "bboxes": torch.cat([t["boxes_cxcywh_norm"] for t in targets]),
        "batch_idx": torch.cat([torch.full((len(t["labels"]),), i) for i, t in enumerate(targets)]),
        "gt_groups": [len(t["labels"]) for t in targets],
    }


def _shapes(obj):
    """Nested structure of `obj` with tensors replaced by their shapes."""
    if isinstance(obj, dict):
        return {k: _shapes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shapes(v) for v in obj]
    return tuple(obj.shape)


def _eval(decoder: DFINEDecoder, feats: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Eval-mode forward without gradients: the detections and the eval layer's dict."""
    decoder.eval()
    with torch.no_grad():
        y, raw = decoder(feats)
    return y, raw[-1]


def test_eval_matches_official(decoder: DFINEDecoder, parity_fixture: dict):
    y, out = _eval(decoder, parity_fixture["intermediates_eval"]["encoder"])
    assert (out["pred_logits"] - parity_fixture["eval"]["pred_logits"]).abs().max() <= 1e-4
    assert (out["pred_boxes"] - parity_fixture["eval"]["pred_boxes_cxcywh_norm"]).abs().max() <= 1e-4
    assert set(out) == {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "up", "reg_scale"}

    ref = parity_fixture["postprocessed"]
    assert y.shape == (2, 300, 6)
    ours_sorted = y[..., 4].sort(-1, descending=True).values
    assert (ours_sorted - ref["scores"].sort(-1, descending=True).values).abs().max() <= 1e-4
    # Near-tied scores may reorder, so match each official detection to ours by class and score, then compare boxes.
    cx, cy, w, h = (y[..., :4] * torch.tensor([640, 480, 640, 480])).unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    for b in range(2):
        same = (ref["labels"][b][:, None] == y[b, :, 5].long()[None]) & (
            (ref["scores"][b][:, None] - y[b, :, 4][None]).abs() <= 1e-4
        )
        err = (ref["boxes_xyxy_orig"][b][:, None] - boxes[b][None]).abs().amax(-1).masked_fill(~same, math.inf)
        assert err.amin(1).max() <= 1e-2


def test_deploy_drops_training_only_parts(decoder: DFINEDecoder, parity_fixture: dict):
    before = sum(p.numel() for p in decoder.parameters())
    decoder.eval().convert_to_deploy()
    assert before - sum(p.numel() for p in decoder.parameters()) == N_DEPLOY_DROP
    keys = decoder.state_dict().keys()
    assert "dec_score_head.2.weight" in keys and "dec_score_head.1.weight" not in keys
    assert (
        "decoder.lqe_layers.2.reg_conf.layers.0.weight" in keys
        and "decoder.lqe_layers.0.reg_conf.layers.0.weight" not in keys
    )
    _, out = _eval(decoder, parity_fixture["intermediates_eval"]["encoder"])
    assert (out["pred_logits"] - parity_fixture["eval"]["pred_logits"]).abs().max() <= 1e-4
    assert (out["pred_boxes"] - parity_fixture["eval"]["pred_boxes_cxcywh_norm"]).abs().max() <= 1e-4


def test_training_layout_matches_official_keys_and_count(parity_fixture: dict):
    model = DFINEDecoder([128, 128], **N_ARGS)
    assert sum(p.numel() for p in model.parameters()) == N_TRAIN_PARAMS
    assert model.up is model.decoder.up and model.reg_scale is model.decoder.reg_scale
    official = {
        k.removeprefix("decoder."): v.shape for k, v in parity_fixture["state_dict"].items() if k.startswith("decoder.")
    }
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == {**official, "denoising_class_embed.weight": (81, 128)}


def test_fresh_anchor_buffers_match_official(parity_fixture: dict):
    model = DFINEDecoder([128, 128], **N_ARGS)
    official_anchors = parity_fixture["state_dict"]["decoder.anchors"]
    assert torch.equal(model.valid_mask, parity_fixture["state_dict"]["decoder.valid_mask"])
    # A tolerance, not equality: log's last bit differs between CPUs' vector paths.
    assert (model.anchors - official_anchors).abs().max() <= 1e-6


def test_off_image_anchors_are_finite_logits_with_the_sigmoid_of_ultralytics_inf():
    # At 640 px the stride-8 level of S-X (N has none) has cells within eps of the border, which Ultralytics'
    # generator marks +inf.
    shapes = [[80, 80], [40, 40], [20, 20]]
    theirs, their_valid = RTDETRDecoder._generate_anchors(shapes, torch.zeros(1), grid_size=0.05)
    ours, valid = anchor_logits(shapes, torch.zeros(1))
    invalid = ~valid.expand_as(ours)
    assert torch.equal(valid, their_valid) and invalid.any()
    assert (ours[~invalid] - theirs[~invalid]).abs().max() <= 1e-6 and theirs[invalid].isinf().all()
    # The proposal head adds an offset before the sigmoid; the box must still be exactly 1, and float16 must hold it.
    for offset in (-10.0, 0.0, 10.0):
        assert torch.equal((ours[invalid] + offset).sigmoid(), (theirs[invalid] + offset).sigmoid())
    assert torch.isfinite(ours.half()).all()


def test_train_outputs_have_official_structure(decoder: DFINEDecoder, parity_fixture: dict):
    decoder.train()
    out = decoder(parity_fixture["intermediates_eval"]["encoder"])
    assert _shapes(out) == _shapes(parity_fixture["train_no_denoising"]["outputs"])
    # Without dropout or denoising the training forward on the same memory reproduces the eval numbers.
    assert (out["pred_logits"] - parity_fixture["eval"]["pred_logits"]).abs().max() <= 1e-4
    assert out["aux_outputs"][0]["teacher_corners"] is out["pred_corners"]
    # Queries are detached from the proposals: the decoder loss alone gives the proposal heads no gradient.
    out["pred_boxes"].sum().backward()
    assert decoder.enc_bbox_head.layers[-1].weight.grad is None
    assert decoder.dec_bbox_head[0].layers[-1].weight.grad.abs().sum() > 0  # FDR chains corners across layers


def test_train_denoising_outputs_and_mask(decoder: DFINEDecoder, parity_fixture: dict):
    feats, batch = parity_fixture["intermediates_eval"]["encoder"], _dn_batch(parity_fixture)
    decoder.train()
    with torch.no_grad():
        plain = decoder(feats)
        torch.manual_seed(0)
        first = decoder(feats, batch)
        torch.manual_seed(1)
        second = decoder(feats, batch)
    meta = first["dn_meta"]
    num_dn = meta["dn_num_split"][0]
    assert meta["dn_num_split"] == [num_dn, 300] and num_dn == 2 * 7 * meta["dn_num_group"]
    assert [len(i) for i in meta["dn_pos_idx"]] == [4 * meta["dn_num_group"], 7 * meta["dn_num_group"]]
    assert len(first["dn_outputs"]) == 3
    for layer in first["dn_outputs"]:
        assert set(layer) == set(first["aux_outputs"][0])
        assert layer["pred_logits"].shape == (2, num_dn, 80)
        assert layer["pred_corners"].shape == (2, num_dn, 132)
    assert first["dn_pre_outputs"]["pred_boxes"].shape == (2, num_dn, 4)
    assert _shapes({k: v for k, v in first.items() if not k.startswith("dn_")}) == _shapes(plain)
    # Different noise changes the denoising queries but not the regular ones, which must not attend to them.
    assert (first["dn_outputs"][-1]["pred_boxes"] - second["dn_outputs"][-1]["pred_boxes"]).abs().max() > 1e-3
    for key in ("pred_logits", "pred_boxes"):
        assert (first[key] - second[key]).abs().max() <= 1e-5
        assert (first[key] - plain[key]).abs().max() <= 1e-4


def _moved_ok(new: torch.Tensor, old: torch.Tensor, half: torch.Tensor, u_min: torch.Tensor) -> torch.Tensor:
    """Whether edges `new` lie u * `half` from `old` with u in [u_min, u_min + 1], or were clipped to the image."""
    u = (new - old).abs() / half
    clipped = (new <= 1e-4) | (new >= 1 - 1e-4)
    return clipped | ((u >= u_min - 1e-3) & (u <= u_min + 1 + 1e-3))


def test_denoising_boxes_follow_official_noise(decoder: DFINEDecoder, parity_fixture: dict):
    batch = _dn_batch(parity_fixture)
    decoder.train()
    torch.manual_seed(0)
    _, dn_bbox, attn_mask, meta = decoder._denoising_group(batch, 300)
    num_dn, groups = meta["dn_num_split"][0], meta["dn_num_group"]
    slots = num_dn // (2 * groups)  # 7: the larger image's box count
    assert attn_mask[num_dn:, :num_dn].all() and not attn_mask[num_dn:, num_dn:].any()
    slot = torch.arange(num_dn) % slots
    negative = torch.arange(num_dn) // slots % 2 == 1
    boxes, flipped = dn_bbox.sigmoid(), 0
    for b, gt in enumerate(parity_fixture["targets"]):
        n = len(gt["labels"])
        # Padding slots hold the official all-zero box, i.e. inverse_sigmoid(0) = log(1e-5) logits.
        assert torch.all(dn_bbox[b, slot >= n] == math.log(1e-5))
        real = slot < n
        ref = gt["boxes_cxcywh_norm"][slot[real]]
        cx, cy, w, h = boxes[b, real].unbind(-1)
        lo, hi = torch.stack([cx - w / 2, cy - h / 2], -1), torch.stack([cx + w / 2, cy + h / 2], -1)
        gt_lo, gt_hi, half = ref[:, :2] - ref[:, 2:] / 2, ref[:, :2] + ref[:, 2:] / 2, ref[:, 2:] / 2
        # Edges may have crossed (the official noise then keeps |size|), so try both edge orders; each edge moved by
        # u * half-size with u in [0, 1) for positives and [1, 2) for negatives, unless it was clipped to the image.
        u_min = negative[real].float()[:, None]
        straight = _moved_ok(lo, gt_lo, half, u_min) & _moved_ok(hi, gt_hi, half, u_min)
        crossed = _moved_ok(hi, gt_lo, half, u_min) & _moved_ok(lo, gt_hi, half, u_min)
        assert (straight | crossed).all()
        flipped += int((crossed & ~straight).any(-1).sum())
        # Crossed edges keep |size| rather than collapsing to the inverse-sigmoid floor (size 1e-5).
        assert (w > 2e-5).all() and (h > 2e-5).all()
    assert flipped > 0  # the draw exercised crossed edges


def test_other_input_size_regenerates_anchors(official_decoder: DFINEDecoder):
    torch.manual_seed(0)
    feats = [torch.randn(1, 128, 10, 10), torch.randn(1, 128, 5, 5)]  # a 160 x 160 input at strides 16, 32
    y, out = _eval(copy.deepcopy(official_decoder), feats)
    assert out["pred_logits"].shape == (1, 125, 80)  # every anchor becomes a query when there are fewer than 300
    cached = DFINEDecoder([128, 128], **N_ARGS, eval_spatial_size=(160, 160))
    weights = {k: v for k, v in official_decoder.state_dict().items() if k not in ("anchors", "valid_mask")}
    assert cached.load_state_dict(weights, strict=False).missing_keys == ["anchors", "valid_mask"]
    _, expected = _eval(cached, feats)
    assert torch.equal(out["pred_boxes"], expected["pred_boxes"]) and torch.equal(
        out["pred_logits"], expected["pred_logits"]
    )


def test_export_mode_returns_topk_tensor(decoder: DFINEDecoder, parity_fixture: dict):
    decoder.export, decoder.max_det = True, 100
    decoder.eval()
    with torch.no_grad():
        y = decoder(parity_fixture["intermediates_eval"]["encoder"])
    assert isinstance(y, torch.Tensor) and y.shape == (2, 100, 6)
    assert (y[..., 4] - parity_fixture["postprocessed"]["scores"][:, :100]).abs().max() <= 1e-4


@pytest.mark.parametrize("reg_scale", [4.0, 8.0])
def test_weighting_function(reg_scale: float):
    w = weighting_function(32, torch.tensor([0.5]), torch.tensor([reg_scale])).double()
    step = (0.5 * reg_scale + 1) ** (2 / 30)
    right = [step**k - 1 for k in range(1, 16)]
    expected = torch.tensor([-reg_scale, *[-v for v in reversed(right)], 0.0, *right, reg_scale], dtype=torch.float64)
    assert w.shape == (33,)
    assert (w - expected).abs().max() <= 1e-5
    assert w[16] == 0 and abs(w[31] - 0.5 * reg_scale) <= 1e-5  # the last geometric bin reaches up * reg_scale


def test_input_projection_only_where_widths_differ():
    three_levels = dict(hidden_dim=256, num_layers=1, num_denoising=0, num_points=[3, 6, 3], feat_strides=[8, 16, 32])
    model = DFINEDecoder([384, 256, 384], **{**N_ARGS, **three_levels})
    keys = model.state_dict().keys()
    assert {"input_proj.0.conv.weight", "input_proj.0.norm.running_mean", "input_proj.2.conv.weight"} <= keys
    assert not any(k.startswith("input_proj.1.") for k in keys)
    assert "denoising_class_embed.weight" not in keys
    model.eval()
    with torch.no_grad():
        y, (*_, out) = model([torch.randn(1, 384, 80, 80), torch.randn(1, 256, 40, 40), torch.randn(1, 384, 20, 20)])
    assert out["pred_boxes"].shape == (1, 300, 4) and y.shape == (1, 300, 6)
