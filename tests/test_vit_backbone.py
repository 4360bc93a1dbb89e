"""DEIMv2 ViT + Spatial Tuning Adapter backbone: shapes, official key layout and counts, input normalisation, ONNX."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from deim_ultra.nn.spatial_adapter import IMAGENET_MEAN, IMAGENET_STD, DINOv3Adapter
from deim_ultra.nn.vit import VisionTransformer, rope_angles

# YAML args after c1 of each DEIMv2 size (authors' configs/deimv2/deimv2_dinov3_{s,m,l,x}_coco.yml).
SIZES = {
    "S": ("vit_tiny", [3, 7, 11], 16, 192),
    "M": ("vit_tinyplus", [3, 7, 11], 16, 256),
    "L": ("dinov3_vits16", [5, 8, 11], 32, 224),
    "X": ("dinov3_vits16plus", [5, 8, 11], 64, 256),
}

# Parameter counts of the authors' DINOv3STAs built from those configs (DEIMv2 @ 0fff8d4, engine/backbone/
# dinov3_adapter.py, SyncBatchNorm swapped for BatchNorm2d; measured by /tmp/vit_oracle/oracle.py): whole backbone,
# and its ViT (`self.dinov3`) alone.
OFFICIAL_PARAMS = {
    "S": (5_689_360, 5_486_208),
    "M": (9_974_032, 9_674_240),
    "L": (22_173_408, 21_601_152),
    "X": (30_119_360, 28_697_472),
}

# Number of state-dict entries of the authors' backbones (same source).
OFFICIAL_KEYS = {"S": 190, "M": 190, "L": 230, "X": 254}


def build(size: str) -> DINOv3Adapter:
    """The backbone of DEIMv2-`size`, seeded, in eval mode."""
    torch.manual_seed(0)
    return DINOv3Adapter(3, *SIZES[size]).eval()


@pytest.fixture(scope="module", params=list(SIZES))
def backbone(request) -> tuple[str, DINOv3Adapter]:
    return request.param, build(request.param)


@pytest.mark.parametrize("hw", [(256, 256), (256, 192), (160, 224)])
def test_output_shapes_and_strides(backbone, hw):
    size, m = backbone
    with torch.no_grad():
        out = m(torch.rand(2, 3, *hw))
    h, w = hw
    assert m.out_channels == [SIZES[size][3]] * 3
    assert [tuple(t.shape) for t in out] == [(2, c, h // s, w // s) for c, s in zip(m.out_channels, (8, 16, 32))]
    assert all(torch.isfinite(t).all() for t in out)


def test_parameter_counts_equal_official(backbone):
    size, m = backbone
    total, vit = OFFICIAL_PARAMS[size]
    assert sum(p.numel() for p in m.parameters()) == total
    assert sum(p.numel() for p in m.dinov3.parameters()) == vit
    assert len(m.state_dict()) == OFFICIAL_KEYS[size]


def test_official_key_names(backbone):
    size, m = backbone
    sd = m.state_dict()
    shared = {
        "sta.stem.0.weight",
        "sta.stem.1.running_var",
        "sta.conv2.1.bias",
        "sta.conv3.1.weight",
        "sta.conv4.2.num_batches_tracked",
        "convs.0.weight",
        "norms.2.running_mean",
    }
    if size in ("S", "M"):
        vit = {
            "dinov3._model.cls_token",
            "dinov3._model.patch_embed.proj.bias",
            "dinov3._model.rope_embed.periods",
            "dinov3._model.blocks.0.attn.qkv.weight",
            "dinov3._model.blocks.11.mlp.fc2.bias",
        }
        absent = ("storage_tokens", "mask_token", "gamma", "bias_mask", ".norm.", "_model.norm")
    else:
        ffn = "w3" if size == "X" else "fc2"
        vit = {
            "dinov3.cls_token",
            "dinov3.storage_tokens",
            "dinov3.mask_token",
            "dinov3.rope_embed.periods",
            "dinov3.blocks.0.attn.qkv.bias_mask",
            "dinov3.blocks.5.ls1.gamma",
            f"dinov3.blocks.11.mlp.{ffn}.weight",
            "dinov3.norm.weight",
        }
        absent = ("_model",)
        assert sd["dinov3.storage_tokens"].shape == (1, 4, 384) and sd["dinov3.mask_token"].shape == (1, 384)
    assert shared | vit <= set(sd)
    assert not [k for k in sd if any(a in k for a in absent)]
    periods = next(v for k, v in sd.items() if k.endswith("rope_embed.periods"))
    # every size has 64 channels per head (192/3, 256/4, 384/6): 16 periods 100 ** (i / 16)
    assert torch.allclose(periods, 100.0 ** (torch.arange(16) / 16))
    # The input statistics are not state: official checkpoints hold none.
    assert not [k for k in sd if k in ("mean", "std")]
    assert {n for n, _ in m.named_buffers()} - set(sd) == {"mean", "std"}


def test_takes_unit_range_input_and_normalises_inside():
    m = build("S")
    x = torch.rand(1, 3, 128, 128)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = m(x)
        m.mean.zero_()
        m.std.fill_(1.0)
        # identity normalisation fed the ImageNet-normalised image: what the authors' pipeline computes
        reference = m((x - mean) / std)
        unnormalised = m(x)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, reference))
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(ours, unnormalised))


def test_dinov3_qkv_bias_mask_zeroes_k_and_is_finite():
    m = build("L")
    mask = m.dinov3.blocks[0].attn.qkv.bias_mask
    d = 384
    assert torch.equal(mask, torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)]))


def test_rope_rescale_is_random_in_training_only():
    m = build("L")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)  # LayerScale's 1e-5 start would hide the blocks' (position-dependent) contributions
        first, second = m(x), m(x)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        m.dinov3.train()  # BatchNorm stays in eval: only the ViT's RoPE changes
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(1)
        b = m(x)
        torch.manual_seed(2)
        c = m(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert any((u - v).abs().max() > 1e-4 for u, v in zip(a, c))
    # ViT-Tiny has no rescale: train and eval tokens agree
    tiny = build("S").dinov3
    with torch.no_grad():
        eval_tokens = tiny(x)
        train_tokens = tiny.train()(x)
    assert all(torch.equal(u, v) for u, v in zip(eval_tokens, train_tokens))


def test_rope_angle_layout():
    periods = torch.tensor([1.0, 10.0])
    angles = rope_angles(2, 4, periods)
    assert angles.shape == (8, 8)
    # token (row 1, col 3): normalised centre y = 2 * 0.75 - 1, x = 2 * 0.875 - 1
    y, x = 0.5, 0.75
    expected = 2 * np.pi * torch.tensor([y / 1, y / 10, x / 1, x / 10])
    assert torch.allclose(angles[7], torch.cat([expected, expected]))


def test_vit_rejects_bad_indexes():
    with pytest.raises(ValueError):
        VisionTransformer("vit_tiny", [7, 3, 11])
    with pytest.raises(ValueError):
        VisionTransformer("vit_tiny", [3, 7, 12])
    with pytest.raises(ValueError):
        DINOv3Adapter(1, *SIZES["S"])


@pytest.mark.parametrize("size", ["S", "X"])
def test_onnx_export_matches_pytorch(size):
    m = build(size)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the export's folding is exercised
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    torch.onnx.export(
        m,
        (torch.rand(1, 3, 256, 192),),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["p3", "p4", "p5"],
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}},
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    # the traced size and others: nothing size-dependent (RoPE grid, resize sizes) may be frozen into the graph
    for x in (torch.rand(1, 3, 256, 192), torch.rand(2, 3, 192, 320)):
        onnx_out = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch_out = m(x)
        for a, b in zip(onnx_out, torch_out):
            assert a.shape == tuple(b.shape)
            assert np.abs(a - b.numpy()).max() <= 1e-4
