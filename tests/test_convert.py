"""`convert_official` / `deim convert`: official checkpoints in every layout load strictly, or fail naming keys."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from deim_ultra import DEIM, convert_official

from helpers import deim_cli


@pytest.fixture(scope="module")
def official(parity_fixture) -> dict:
    return parity_fixture["state_dict"]


def eval_logits(deim: DEIM, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return deim.model.eval()(images)[1][-1]["pred_logits"]


@pytest.mark.parametrize("layout", ["model", "ema", "raw"])
def test_checkpoint_layouts_load_the_same_weights(official, layout, tmp_path):
    perturbed = {k: v + 1 if k.endswith("enc_score_head.bias") else v for k, v in official.items()}
    ckpt = {"model": official, "ema": {"module": perturbed}} if layout == "ema" else {"model": official}
    path = tmp_path / "official.pth"
    torch.save(official if layout == "raw" else ckpt, path)
    model = convert_official(path, "deim-n.yaml").model
    bias = model.model[-1].enc_score_head.bias
    expected = perturbed if layout == "ema" else official  # EMA weights win when present
    assert torch.equal(bias, expected["decoder.enc_score_head.bias"])
    assert model.names[0] == "person" and len(model.names) == 80  # COCO names for an 80-class checkpoint


def test_missing_and_unexpected_keys_are_listed(official):
    broken = {k: v for k, v in official.items() if k != "encoder.lateral_convs.0.norm.weight"}
    broken["decoder.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        convert_official(broken, "deim-n.yaml")
    assert "encoder.lateral_convs.0.norm.weight" in str(error.value)
    assert "decoder.extra_head.weight" in str(error.value)


def test_wrong_size_is_reported(official):
    with pytest.raises(ValueError, match="deim-s.yaml"):
        convert_official(official, "deim-s.yaml")


def test_other_class_count_is_taken_from_checkpoint(official):
    nc = 5
    sliced = {
        k: v[:nc] if any(h in k for h in ("score_head", "denoising_class_embed")) else v for k, v in official.items()
    }
    model = convert_official(sliced, "deim-n.yaml").model
    assert model.model[-1].nc == nc and model.model[-1].enc_score_head.out_features == nc


def test_cli_convert_writes_loadable_checkpoint(official, parity_fixture, tmp_path):
    torch.save({"model": official}, tmp_path / "deim_n_official.pth")
    cmd = [sys.executable, "-m", "deim_ultra.cli", "convert", "weights=deim_n_official.pth", "model=deim-n.yaml"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    images = parity_fixture["images"][:1]
    loaded, direct = DEIM(tmp_path / "deim_n_official.pt"), convert_official(official, "deim-n.yaml")
    assert torch.equal(eval_logits(loaded, images), eval_logits(direct, images))  # float32 kept


def random_official_n(path) -> None:
    """Save a randomly initialised DEIM-N under the official key names, as the authors' `.pth` layout."""
    from deim_ultra.official_names import official_namer

    model = DEIM("deim-n.yaml").model
    namer = official_namer(model)
    torch.save({"model": {namer(k): v for k, v in model.state_dict().items()}}, path)


def test_cli_convert_into_another_size_says_so_in_a_few_lines(tmp_path):
    random_official_n(tmp_path / "n.pth")
    result = deim_cli("convert", "weights=n.pth", "model=deim-s.yaml", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert "does not match" in out and "deim-s.yaml (is it another size?)" in out and "tensors differ in shape" in out
    assert len(out.strip().splitlines()) < 5, out  # torch's message lists every mismatched tensor, 249 lines
    assert not (tmp_path / "n.pt").exists()


def test_cli_convert_of_an_ultralytics_checkpoint_points_to_deim(tmp_path):
    DEIM("deim-n.yaml").save(tmp_path / "best.pt")  # what training writes: pickled modules, not a weights file
    result = deim_cli("convert", "weights=best.pt", "model=deim-n.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "is an Ultralytics / deim-ultra checkpoint" in result.stdout + result.stderr
    assert "load it with DEIM('best.pt')" in result.stdout + result.stderr


def test_dfine_checkpoint_converts_into_a_relu_yaml(official, parity_fixture, tmp_path):
    """D-FINE has DEIM's layout with ReLU in the decoder: the same weights load into a YAML that says relu."""
    from deim_ultra.cfg import resolve_model_yaml

    dfine_yaml = tmp_path / "dfine-n.yaml"
    dfine_yaml.write_text(resolve_model_yaml("deim-n.yaml").read_text().replace(", silu,", ", relu,"))
    dfine = convert_official(official, dfine_yaml)
    assert isinstance(dfine.model.model[-1].decoder.layers[0].act, torch.nn.ReLU)
    deim = convert_official(official, "deim-n.yaml")
    images = parity_fixture["images"][:1]
    assert not torch.allclose(eval_logits(dfine, images), eval_logits(deim, images))


def official_layout(model) -> dict[str, torch.Tensor]:
    """`model`'s state dict under the official key names, as the authors' checkpoints store it."""
    from deim_ultra.convert import official_prefixes

    ours_to_official = {v: k for k, v in official_prefixes(model).items()}
    state = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in ours_to_official if key.startswith(p))
        state[ours_to_official[prefix] + key[len(prefix) :]] = value
    return state


def test_anchor_buffers_of_another_input_size_are_rebuilt(caplog):
    """A checkpoint trained at 128 px caches 8x8 + 4x4 = 80 anchors; deim-n.yaml's 640 px needs 40x40 + 20x20."""
    from deim_ultra.nn.tasks import DEIMDetectionModel

    torch.manual_seed(0)
    state = official_layout(DEIMDetectionModel("deim-n.yaml", verbose=False))
    at_640 = state["decoder.anchors"].clone()
    assert at_640.shape == (1, 2000, 4)
    small = {**state, "decoder.anchors": torch.zeros(1, 80, 4), "decoder.valid_mask": torch.ones(1, 80, 1).bool()}
    with caplog.at_level("INFO"):
        converted = convert_official(small, "deim-n.yaml")
    assert "'decoder.anchors' (1, 80, 4) was cached for another input size" in caplog.text
    assert torch.equal(converted.model.model[-1].anchors, at_640)
    image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    kwargs = dict(imgsz=640, conf=0.0, max_det=50, verbose=False)
    boxes = converted.predict(image, **kwargs)[0].boxes
    reference = convert_official(state, "deim-n.yaml").predict(image, **kwargs)[0].boxes
    assert len(boxes) == 50
    assert torch.equal(boxes.data, reference.data)
