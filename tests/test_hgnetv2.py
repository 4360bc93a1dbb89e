"""HGNetv2 backbone layers: official key layout, parameter count, parity with the authors' B0, pretrained loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deim_ultra.nn.hgnetv2 import HGStage, HGStem, load_hgnetv2_pretrained
from deim_ultra.nn.tasks import DEIMDetectionModel

from helpers import official_state

# The shipped model whose backbone is each HGNetv2 variant (the authors' configs).
VARIANT_MODELS = {"B0": "deim-n.yaml", "B2": "deim-m.yaml", "B4": "deim-l.yaml", "B5": "deim-x.yaml"}


def build(variant: str) -> tuple[HGStem, list[HGStage]]:
    """Stem and four stages of the shipped model YAML, as its parser builds them from the layers' args."""
    layers = DEIMDetectionModel(VARIANT_MODELS[variant], verbose=False).model
    (stem,) = (m for m in layers if isinstance(m, HGStem))
    return stem, [m for m in layers if isinstance(m, HGStage)]


def run(stem: nn.Module, stages: list[nn.Module], images: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's output for ``images`` (B, 3, H, W)."""
    outputs, x = [], stem(images)
    for stage in stages:
        x = stage(x)
        outputs.append(x)
    return outputs


def test_b0_state_dict_matches_official_layout(parity_fixture):
    ours = {k: tuple(v.shape) for k, v in official_state(*build("B0"), prefix="backbone.").items()}
    official = {k: tuple(v.shape) for k, v in parity_fixture["state_dict"].items() if k.startswith("backbone.")}
    assert ours == official


def test_b0_trainable_parameter_count():
    stem, stages = build("B0")
    # Counted from the authors' DEIM-N state dict: all backbone.* tensors except BatchNorm buffers.
    assert sum(p.numel() for m in (stem, *stages) for p in m.parameters()) == 1_850_396


def test_b0_reproduces_official_features(parity_fixture):
    """Stages 2 and 3 of B0 with the official weights match the authors' eval-mode feature maps.

    The fixture's eval tensors were recorded after its train-mode forward (`train_no_denoising`) on the same images,
    which advanced every BatchNorm's running statistics by one momentum update beyond the stored state dict
    (num_batches_tracked 3 -> 4). That pass is replayed here; without it the features differ by about 0.09.
    """
    stem, stages = build("B0")
    sd = parity_fixture["state_dict"]
    for module, prefix in [(stem, "backbone.stem."), *((s, f"backbone.stages.{i}.") for i, s in enumerate(stages))]:
        module.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    images = parity_fixture["images"]
    with torch.no_grad():
        run(stem, stages, images)  # train mode: the BatchNorm update described above
        for m in (stem, *stages):
            m.eval()
        outputs = run(stem, stages, images)
    for ours, official in zip(outputs[2:], parity_fixture["intermediates_eval"]["backbone"]):
        assert ours.shape == official.shape
        assert (ours - official).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["B4", "B5"])
def test_stage_channels_strides_and_no_lab(variant):
    stem, stages = build(variant)
    outputs = run(stem, stages, torch.rand(1, 3, 64, 64))
    expected_channels = [128, 512, 1024, 2048]  # B4 and B5 differ in depth and stem width only
    strides = (4, 8, 16, 32)
    assert [tuple(o.shape) for o in outputs] == [(1, c, 64 // s, 64 // s) for c, s in zip(expected_channels, strides)]
    assert [s.out_channels for s in stages] == expected_channels
    assert not any(".lab." in k for k in official_state(stem, stages))


def randomized_b0() -> tuple[HGStem, list[HGStage]]:
    """B0 whose every parameter and BatchNorm statistic is random, so a copied value cannot equal a fresh init."""
    stem, stages = build("B0")
    with torch.no_grad():
        for m in (stem, *stages):
            for t in m.state_dict().values():
                if t.is_floating_point():
                    t.uniform_(0.5, 1.5)
    return stem, stages


@pytest.mark.parametrize("layout", ["model_dict", "plain", "plain_without_counters"])
def test_load_pretrained_copies_every_tensor(tmp_path: Path, layout: str):
    source = randomized_b0()
    state = official_state(*source)
    if layout == "plain_without_counters":  # converted checkpoints may lack BatchNorm's step counters
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1000, 2048)  # classification head: to be ignored
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save({"model": state} if layout == "model_dict" else state, path)

    target = build("B0")
    load_hgnetv2_pretrained(target[0], target[1], path)
    loaded = official_state(*target)
    for key, value in official_state(*source).items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key


def test_load_pretrained_reports_missing_and_unexpected_keys(tmp_path: Path):
    state = official_state(*randomized_b0())
    del state["stages.2.blocks.1.layers.0.conv1.conv.weight"]
    state["stages.4.blocks.0.layers.0.conv.weight"] = torch.zeros(1)
    path = tmp_path / "broken_B0.pth"
    torch.save({"model": state}, path)

    stem, stages = build("B0")
    before = {k: v.clone() for k, v in official_state(stem, stages).items()}
    with pytest.raises(ValueError) as err:
        load_hgnetv2_pretrained(stem, stages, path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys: stages.2.blocks.1.layers.0.conv1.conv.weight" in message
    assert "unexpected keys: stages.4.blocks.0.layers.0.conv.weight" in message
    after = official_state(stem, stages)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a failed load must leave the model untouched"


def test_load_pretrained_reports_shape_mismatch(tmp_path: Path):
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save(official_state(*build("B0")), path)
    stem, stages = build("B2")
    with pytest.raises(ValueError, match=r"shape mismatches: .*stem\.stem1\.conv\.weight \(16, 3, 3, 3\) vs model"):
        load_hgnetv2_pretrained(stem, stages, path)
