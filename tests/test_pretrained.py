"""The ImageNet HGNetv2 start through the real training path: `pretrained=<.pth>`, `pretrained=True`, offline."""

from pathlib import Path

import pytest
import torch
from ultralytics.utils import SETTINGS

from deim_ultra import DEIM
from deim_ultra.nn.tasks import DEIMDetectionModel

from helpers import deim_cli, official_state

TRAIN = dict(epochs=1, imgsz=64, batch=4, workers=0, plots=False, val=False)
WARNING = "pretrained=True: ImageNet backbone PPHGNetV2_B0_stage1.pth is not in"


def write_backbone_file(path: Path, yaml: str = "deim-n.yaml", seed: int = 1) -> dict[str, torch.Tensor]:
    """Save a backbone in the authors' `PPHGNetV2_B*_stage1.pth` layout (with a classifier head); return its state."""
    torch.manual_seed(seed)
    state = official_state(*DEIMDetectionModel(yaml, verbose=False).hgnetv2_layers())
    torch.save({**state, "head.fc.weight": torch.zeros(1000, 2048)}, path)
    return state


def train_capturing_backbone(tmp_path: Path, tiny_data: Path, **kwargs) -> dict[str, torch.Tensor]:
    """Train DEIM-N through `DEIM.train`; return its backbone state as training starts (before any step)."""
    model, captured = DEIM("deim-n.yaml"), {}

    def capture(trainer) -> None:
        state = official_state(*trainer.model.hgnetv2_layers())
        captured.update({k: v.detach().clone() for k, v in state.items()})

    model.add_callback("on_pretrain_routine_end", capture)
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", **TRAIN, **kwargs)
    return captured


def cli_train(tiny_data: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    """`deim train` of DEIM-N on the tiny set with TRAIN's settings, from `tmp_path`."""
    settings = [f"{k}={v}" for k, v in TRAIN.items()]
    return deim_cli(
        "train",
        "model=deim-n.yaml",
        f"data={tiny_data}",
        f"project={tmp_path}",
        *settings,
        *extra,
        cwd=tmp_path,
        env=env,
    )


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def test_backbone_file_through_python_train(tiny_data, tmp_path):
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    file_state = write_backbone_file(path)
    assert_same_state(train_capturing_backbone(tmp_path, tiny_data, pretrained=str(path)), file_state)


def test_backbone_file_through_cli(tiny_data, tmp_path):
    path = tmp_path / "PPHGNetV2_B0_stage1.pth"
    write_backbone_file(path)
    result = cli_train(tiny_data, tmp_path, f"pretrained={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Backbone initialised from ImageNet weights '{path}'" in result.stdout + result.stderr
    assert (tmp_path / "train" / "weights" / "last.pt").is_file()


def test_pretrained_true_takes_the_file_from_the_weights_dir(tiny_data, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    file_state = write_backbone_file(weights / "PPHGNetV2_B0_stage1.pth", seed=2)
    monkeypatch.setitem(SETTINGS, "weights_dir", str(weights))
    assert_same_state(train_capturing_backbone(tmp_path, tiny_data), file_state)  # pretrained=True is the default


def test_pretrained_true_offline_warns_once_and_trains_from_random(tiny_data, tmp_path):
    result = cli_train(tiny_data, tmp_path, env={"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if WARNING in line]
    assert len(lines) == 1, lines
    assert "https://github.com/Peterande/storage/releases/download/dfinev1.0/PPHGNetV2_B0_stage1.pth" in lines[0]
    assert "random weights" in lines[0] and "PPHGNetV2_B0_stage1.pth" in lines[0].split("Fix:")[1]
    assert (tmp_path / "train" / "weights" / "last.pt").is_file()


def test_backbone_file_of_another_size_is_refused(tiny_data, tmp_path):
    path = tmp_path / "PPHGNetV2_B2_stage1.pth"
    write_backbone_file(path, yaml="deim-m.yaml")
    with pytest.raises(ValueError, match="PPHGNetV2_B2_stage1.pth does not match"):
        DEIM("deim-n.yaml").train(data=str(tiny_data), project=str(tmp_path), pretrained=str(path), **TRAIN)
    result = cli_train(tiny_data, tmp_path, f"pretrained={path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "deim train failed: ValueError: HGNetv2 checkpoint" in result.stderr + result.stdout


def test_missing_backbone_file_is_named(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_backbone.pth"):
        DEIM("deim-n.yaml").train(
            data=str(tiny_data), project=str(tmp_path), pretrained="no_such_backbone.pth", **TRAIN
        )
