"""DEIMv2 built from the shipped YAMLs: the authors' parameter counts, and their checkpoints convert (`.pth`, and the
Hugging Face layout, whose `model.safetensors` stores a shared tensor under one of its names only)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from deim_ultra import DEIM, convert_official
from deim_ultra.nn.tasks import DEIMDetectionModel

from helpers import hugging_face_layout, official_state, official_weights

# model.parameters() of the authors' DEIMv2 models (Intellindust-AI-Lab/DEIMv2 0fff8d4, built from their configs on
# CPU): training layout, then deploy layout. Their README rounds the deploy counts to 0.5M, 1.0M, 1.5M, 3.6M, 9.7M,
# 18.1M, 32.2M and 50.3M.
AUTHORS_PARAMS = {
    "atto": (508_985, 494_159),
    "femto": (983_945, 962_311),
    "pico": (1_539_539, 1_514_285),
    "n": (3_600_421, 3_571_527),
    "s": (9_779_838, 9_707_403),
    "m": (18_357_750, 18_106_355),
    "l": (32_551_214, 32_178_043),
    "x": (51_211_736, 50_260_163),
}
FDR_CONSTANTS = 2  # `up` and `reg_scale`: frozen parameters in the authors' models, buffers in ours
IMAGES = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + FDR_CONSTANTS


@pytest.mark.parametrize("size", AUTHORS_PARAMS)
def test_parameter_counts_equal_the_authors(size):
    model = DEIMDetectionModel(f"deimv2-{size}.yaml", verbose=False)
    train, deploy = AUTHORS_PARAMS[size]
    assert count(model) == train
    model.eval().fuse(verbose=False)
    assert count(model) == deploy


def test_small_sizes_share_one_box_head_and_n_does_not():
    heads = DEIMDetectionModel("deimv2-atto.yaml", verbose=False).model[-1].dec_bbox_head
    assert heads[0] is heads[1] is heads[2]
    heads = DEIMDetectionModel("deimv2-n.yaml", verbose=False).model[-1].dec_bbox_head
    assert heads[0] is not heads[1]


def eval_outputs(model: DEIM) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model.model.eval()(IMAGES)[1][-1]
    return {k: out[k] for k in ("pred_logits", "pred_boxes")}


def test_a_hugging_face_checkpoint_with_a_shared_box_head_converts(tmp_path):
    state = official_weights("deimv2-atto.yaml")
    files = hugging_face_layout(state)
    assert "decoder.dec_bbox_head.0.layers.0.weight" in files
    assert "decoder.dec_bbox_head.1.layers.0.weight" not in files  # the shared head is stored once
    repo = tmp_path / "DEIMv2_HGNetv2_ATTO_COCO"
    repo.mkdir()
    save_file(files, repo / "model.safetensors")
    (repo / "config.json").write_text(json.dumps({"config": {}}))
    converted = DEIM(repo / "model.safetensors")
    assert converted.model.yaml["yaml_file"].endswith("deimv2-atto.yaml")  # chosen by the tensors' shapes
    reference = convert_official(state, "deimv2-atto.yaml")
    for name, value in eval_outputs(reference).items():
        assert torch.equal(eval_outputs(converted)[name], value), name
    heads = converted.model.model[-1].dec_bbox_head
    assert heads[0] is heads[2]  # still one module after loading
    assert convert_official(repo, "deimv2-atto.yaml").model.names[0] == "person"  # the folder converts as well
    assert torch.equal(eval_outputs(DEIM(repo))["pred_logits"], eval_outputs(reference)["pred_logits"])


def test_a_deimv2_pth_converts_by_its_shapes(tmp_path):
    state = official_weights("deimv2-n.yaml")
    torch.save({"ema": {"module": state}}, tmp_path / "finetuned.pth")
    model = DEIM(tmp_path / "finetuned.pth")
    assert model.model.yaml["yaml_file"].endswith("deimv2-n.yaml")
    reference = convert_official(state, "deimv2-n.yaml")
    assert torch.equal(eval_outputs(model)["pred_logits"], eval_outputs(reference)["pred_logits"])


def test_a_checkpoint_of_another_family_is_not_mistaken_for_deimv2(tmp_path):
    torch.save({"model": official_weights("deim-n.yaml")}, tmp_path / "deim_n.pth")
    assert DEIM(tmp_path / "deim_n.pth").model.yaml["yaml_file"].endswith("deim-n.yaml")


@pytest.mark.parametrize("size", ["atto", "pico"])
def test_pruned_backbones_start_from_the_b0_tensors_that_fit(size, tiny_data, tmp_path, caplog):
    """The authors' pruned sizes load B0's ImageNet file as far as it fits (Atto's narrower stage 3 keeps fewer)."""
    torch.manual_seed(1)
    b0 = official_state(*DEIMDetectionModel("deimv2-n.yaml", verbose=False).hgnetv2_layers())
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    torch.save({**b0, "head.fc.weight": torch.zeros(1000, 2048)}, path)
    seen = {}
    model = DEIM(f"deimv2-{size}.yaml")
    model.add_callback(
        "on_pretrain_routine_end",
        lambda t: seen.update({k: v.clone() for k, v in official_state(*t.model.hgnetv2_layers()).items()}),
    )
    caplog.set_level("INFO", logger="ultralytics")
    model.train(data=str(tiny_data), pretrained=str(path), epochs=1, imgsz=64, batch=4, workers=0, val=False,
                plots=False, project=str(tmp_path))  # fmt: skip
    fitting = [k for k, v in seen.items() if k in b0 and b0[k].shape == v.shape and "num_batches" not in k]
    assert all(torch.equal(seen[k], b0[k]) for k in fitting)
    assert (
        f"({len(fitting)} of {sum('num_batches' not in k for k in seen)} tensors fit this pruned backbone"
        in caplog.text
    )
    assert any(k not in b0 or b0[k].shape != seen[k].shape for k in seen) == (size == "atto")
