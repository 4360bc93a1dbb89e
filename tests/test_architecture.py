"""DEIM-N..X built from the shipped YAMLs have the authors' exact parameter counts, train and deploy layout."""

import pytest
import torch

from deim_ultra.convert import load_official_weights, official_prefixes
from deim_ultra.nn.tasks import DEIMDetectionModel

# The authors' models' model.parameters() counts: training layout, then deploy layout (fused, heads dropped).
AUTHORS_PARAMS = {
    "n": (3_782_693, 3_753_799),
    "s": (10_321_877, 10_237_491),
    "m": (19_590_064, 19_248_189),
    "l": (31_289_848, 30_769_891),
    "x": (62_715_480, 61_695_555),
}


FDR_CONSTANTS = 2  # `up` and `reg_scale`: frozen parameters in the authors' models, buffers in ours


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + FDR_CONSTANTS


@pytest.mark.parametrize("size", AUTHORS_PARAMS)
def test_parameter_counts_equal_the_authors(size):
    model = DEIMDetectionModel(f"deim-{size}.yaml", verbose=False)
    train, deploy = AUTHORS_PARAMS[size]
    assert count(model) == train
    model.eval().fuse(verbose=False)
    assert count(model) == deploy


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics, so that folding them into convs is actually exercised."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def test_deploy_conversion_keeps_detections():
    torch.manual_seed(0)
    model = DEIMDetectionModel("deim-n.yaml", nc=3, verbose=False).eval()
    randomise_batchnorm(model)
    images = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        before = model(images)[0]
        model.fuse(verbose=False)
        after = model(images)[0]
    assert model.is_fused()
    # Rows are sorted by score, and tied scores may come out in either order: compare the sets of detections.
    gap = (before[:, :, None, :] - after[:, None, :, :]).abs().amax(-1)  # (B, 300 before, 300 after)
    assert gap.amin(2).max() < 1e-4 and gap.amin(1).max() < 1e-4


def test_converter_is_size_generic():
    """An official-layout state dict of DEIM-S (3 levels, other layer indices) converts back strictly."""
    torch.manual_seed(0)
    source = DEIMDetectionModel("deim-s.yaml", verbose=False)
    prefixes = official_prefixes(source)
    # S has three encoder inputs, hence three Pick layers before the head: the decoder is layer 9 (8 for N).
    expected = {
        "backbone.stem.": "model.0.",
        **{f"backbone.stages.{i}.": f"model.{i + 1}." for i in range(4)},
        "encoder.": "model.5.",
        "decoder.": "model.9.",
    }
    assert prefixes == expected
    ours_to_official = {v: k for k, v in prefixes.items()}
    official = {}
    for key, value in source.state_dict().items():
        prefix = next(p for p in ours_to_official if key.startswith(p))
        official[ours_to_official[prefix] + key[len(prefix) :]] = value
    assert {k.split(".")[0] for k in official} == {"backbone", "encoder", "decoder"}
    target = DEIMDetectionModel("deim-s.yaml", verbose=False)
    load_official_weights(target, official)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
