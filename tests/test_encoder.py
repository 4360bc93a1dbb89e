"""Hybrid encoder: official key layout and parameter counts, parity with the authors' DEIM-N encoder, deploy fusing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deim_ultra.nn.encoder import HybridEncoder
from deim_ultra.nn.encoder_blocks import CSPLayer, sincos_pos_embed_2d
from deim_ultra.nn.hgnetv2 import HGStage, HGStem
from deim_ultra.nn.tasks import DEIMDetectionModel

# The authors' configs: (c1, hidden_dim, ffn_dim, expansion, depth_mult, strides) per size.
SIZES = {
    "N": ([512, 1024], 128, 512, 0.34, 0.5, [16, 32]),
    "S": ([256, 512, 1024], 256, 1024, 0.5, 0.34, [8, 16, 32]),
    "M": ([384, 768, 1536], 256, 1024, 1.0, 0.67, [8, 16, 32]),
    "L": ([512, 1024, 2048], 256, 1024, 1.0, 1.0, [8, 16, 32]),
    "X": ([512, 1024, 2048], 384, 2048, 1.0, 1.0, [8, 16, 32]),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def official_encoder_state(parity_fixture: dict) -> dict[str, torch.Tensor]:
    sd = parity_fixture["state_dict"]
    return {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}


def b0_backbone_features(parity_fixture: dict) -> list[torch.Tensor]:
    """The official B0's train-mode stride-16/32 features for the fixture images: [(2,512,40,40), (2,1024,20,20)]."""
    sd = parity_fixture["state_dict"]
    layers = DEIMDetectionModel("deim-n.yaml", verbose=False).model
    (stem,) = (m for m in layers if isinstance(m, HGStem))
    stages = [m for m in layers if isinstance(m, HGStage)]
    for module, prefix in [(stem, "backbone.stem."), *((s, f"backbone.stages.{i}.") for i, s in enumerate(stages))]:
        module.load_state_dict({k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)})
    feats, x = [], stem(parity_fixture["images"])
    for stage in stages:
        x = stage(x)
        feats.append(x)
    return feats[2:]


def randomize_bn_stats(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters so that fusing is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_n_matches_official_layout_and_parameter_count(parity_fixture):
    enc = HybridEncoder(*SIZES["N"])
    official = {k: tuple(v.shape) for k, v in official_encoder_state(parity_fixture).items()}
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == official
    assert n_params(enc) == 703_824  # the authors' encoder, training layout (the parity fixture's encoder.* parameters)
    assert enc.out_channels == [128, 128]


@torch.no_grad()
def test_n_reproduces_official_encoder_features(parity_fixture):
    """Eval-mode outputs on the fixture's backbone features match the authors' encoder maps.

    The fixture's eval tensors were recorded after its train-mode forward on the same images, which advanced every
    BatchNorm's running statistics once beyond the stored state dict (num_batches_tracked 3 -> 4); that pass is
    replayed first (the encoder's train-mode input is the backbone's train-mode output). Without it the maps differ
    by about 0.05.
    """
    enc = HybridEncoder(*SIZES["N"])
    enc.load_state_dict(official_encoder_state(parity_fixture))
    enc.train()(b0_backbone_features(parity_fixture))
    outs = enc.eval()(parity_fixture["intermediates_eval"]["backbone"])
    for ours, official in zip(outs, parity_fixture["intermediates_eval"]["encoder"]):
        assert ours.shape == official.shape
        assert (ours - official).abs().max().item() <= 1e-4


@torch.no_grad()
def test_fuse_keeps_outputs_drops_5436_params_and_is_idempotent():
    torch.manual_seed(0)
    enc = HybridEncoder(*SIZES["N"])
    randomize_bn_stats(enc)
    enc.eval()
    feats = [torch.randn(2, 512, 8, 8), torch.randn(2, 1024, 4, 4)]
    before, count = enc(feats), n_params(enc)
    enc.fuse()
    # 8 RepVGG blocks of 21 channels: two BNs (84) and the 1x1 conv (441) give way to a 21-wide bias, 504 each;
    # each folded ConvNorm loses its BN and gains a bias, i.e. its width: lateral 128, SCDown 2*128, ELAN cv1 2*256,
    # cv4 2*128, post-CSP 3x3 convs 4*21, CSP conv1/conv2 8*21 -> 1404.
    assert count - n_params(enc) == 8 * 504 + 1404 == 5436
    bn_left = [name for name, m in enc.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_left == ["input_proj.0.norm", "input_proj.1.norm"]  # the authors' deploy layout keeps these
    after = enc(feats)
    for a, b in zip(after, before):
        assert (a - b).abs().max().item() <= 1e-4
    enc.fuse()
    assert count - n_params(enc) == 5436
    for a, b in zip(enc(feats), after):
        assert torch.equal(a, b)


def test_fused_convs_keep_the_frozen_state_of_a_loaded_model():
    """A checkpoint loads frozen (Ultralytics' summary counts 0 gradients); fusion must not thaw its encoder."""
    frozen = HybridEncoder(*SIZES["N"]).eval().requires_grad_(False)
    frozen.fuse()
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = HybridEncoder(*SIZES["N"]).eval()
    trainable.fuse()
    assert all(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize(
    "size, branch, blocks",  # branch = round(expansion * hidden // 2), blocks = round(3 * depth_mult)
    [("N", 21, 2), ("S", 64, 1), ("M", 128, 2), ("L", 128, 3), ("X", 192, 3)],
)
def test_elan_widths_and_depths(size: str, branch: int, blocks: int):
    enc = HybridEncoder(*SIZES[size])
    n_levels = len(SIZES[size][0])
    assert len(enc.fpn_blocks) == len(enc.pan_blocks) == len(enc.lateral_convs) == n_levels - 1
    csp = [m for m in enc.modules() if isinstance(m, CSPLayer)]
    assert len(csp) == 4 * (n_levels - 1)
    assert all(len(m.bottlenecks) == blocks and m.conv1.out_channels == branch for m in csp)
    assert enc.fpn_blocks[0].cv4.conv.in_channels == 2 * SIZES[size][1] + 2 * branch


@torch.no_grad()
def test_three_levels_any_input_size():
    """S-size encoder on a non-square 160 x 96 input keeps each level's resolution; training and eval agree in shape."""
    torch.manual_seed(0)
    enc = HybridEncoder([32, 48, 64], 32, 64, 0.5, 0.34, [8, 16, 32])
    feats = [torch.randn(2, 32, 20, 12), torch.randn(2, 48, 10, 6), torch.randn(2, 64, 5, 3)]
    for mode in (True, False):
        outs = enc.train(mode)(feats)
        assert [tuple(o.shape) for o in outs] == [(2, 32, 20, 12), (2, 32, 10, 6), (2, 32, 5, 3)]


def test_pos_embed_token_order_and_frequencies():
    """Token t gets u = t // h, v = t % h (the authors' meshgrid(w, h, 'ij') order); omega_k = 1e4**(-4k / dim)."""
    pe = sincos_pos_embed_2d(2, 3, 8)
    assert pe.shape == (1, 6, 8)
    omega = [1.0, 0.01]
    for t in range(6):
        u, v = t // 2, t % 2
        expected = [f(c * w) for f, c in ((math.sin, u), (math.cos, u), (math.sin, v), (math.cos, v)) for w in omega]
        assert pe[0, t].tolist() == pytest.approx(expected, abs=1e-6)
