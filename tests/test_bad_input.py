"""Broken training data is skipped with a message naming the file, and never turns into silently wrong targets."""

import logging
import shutil

import numpy as np
import pytest
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils import IterableSimpleNamespace

from deim_ultra.cfg import DEIM_CFG_DICT
from deim_ultra.data.dataset import DEIMDataset


@pytest.fixture
def broken(tiny_data, tmp_path):
    """A copy of the tiny dataset with a corrupt image, an out-of-range class, a malformed and an empty label file
    and a zero-area box."""
    root = tmp_path / "broken"
    shutil.copytree(tiny_data.parent, root)
    images = sorted((root / "images" / "train").glob("*.png"))
    labels = root / "labels" / "train"
    images[0].write_bytes(b"not an image")
    (labels / f"{images[1].stem}.txt").write_text("99 0.5 0.5 0.2 0.2\n")  # class id out of range (nc=3)
    (labels / f"{images[2].stem}.txt").write_text("0 0.5 0.5\n")  # malformed: 3 columns
    (labels / f"{images[3].stem}.txt").write_text("")  # empty: a background image, kept
    (labels / f"{images[4].stem}.txt").write_text("1 0.5 0.5 0.0 0.2\n2 0.3 0.3 0.2 0.2\n")  # a zero-width box
    yaml_file = root / tiny_data.name
    yaml_file.write_text(yaml_file.read_text().replace(str(tiny_data.parent), str(root)))
    data = check_det_dataset(str(yaml_file))
    return data, images


def test_broken_files_are_skipped_and_named(broken, caplog):
    data, images = broken
    caplog.set_level(logging.INFO, logger="ultralytics")
    hyp = IterableSimpleNamespace(**DEIM_CFG_DICT)
    dataset = DEIMDataset(img_path=data["train"], imgsz=160, augment=True, hyp=hyp, data=data, stage="dense_o2o")
    log = caplog.text
    kept = {p.split("/")[-1] for p in dataset.im_files}
    for skipped in images[:3]:
        assert skipped.name not in kept
        assert skipped.name in log  # Ultralytics' "ignoring corrupt image/label" line names each file
    assert images[3].name in kept and images[4].name in kept
    for i in range(len(dataset)):
        boxes = dataset[i]["bboxes"].numpy()
        assert (boxes[:, 2:] > 0).all() and np.isfinite(boxes).all()  # the zero-width box never reaches the loss


def test_unreadable_weight_files_are_named(tmp_path):
    import torch

    from deim_ultra import DEIM, convert_official

    garbage, a_list = tmp_path / "garbage.pth", tmp_path / "list.pt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save([1, 2], a_list)
    with pytest.raises(ValueError, match="garbage.pth"):
        convert_official(garbage)
    with pytest.raises(ValueError, match="list.pt"):
        convert_official(a_list)
    with pytest.raises(TypeError, match="list.pt"):
        DEIM(a_list)


def test_yolo_checkpoint_as_pretrained_is_refused(tiny_data, tmp_path):
    from ultralytics import YOLO

    from deim_ultra import DEIM

    yolo = tmp_path / "yolo.pt"
    YOLO("yolov8n.yaml").save(yolo)  # Ultralytics would transfer 0 of its layers and train from random weights
    with pytest.raises(TypeError, match=r"pretrained=.*yolo.pt holds a DetectionModel, not a DEIM or RT-DETR model"):
        DEIM("deim-n.yaml").train(
            data=str(tiny_data), pretrained=str(yolo), epochs=1, imgsz=64, workers=0, project=str(tmp_path)
        )


def test_mistyped_paths_do_not_fall_back_to_shipped_files(tmp_path):
    from deim_ultra.cfg import resolve_data_yaml, resolve_model_yaml

    with pytest.raises(FileNotFoundError, match="deim-s.yaml"):
        resolve_model_yaml(tmp_path / "deim-s.yaml")
    assert resolve_model_yaml("deim-s.yaml").parent.name == "cfg"
    assert resolve_data_yaml(str(tmp_path / "deepforest.yaml")) == str(tmp_path / "deepforest.yaml")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(policy_epochs=[5, 2, 8]), "e0 <= e1"),
        (dict(policy_epochs=[1, 2]), "three epochs"),
        (dict(policy_epochs=[1, 2, 30]), "epochs"),
        (dict(optimizer="SGD"), "recipe=none"),
        (dict(close_mosaic=5, policy_epochs=[1, 2, 3]), "give one of the two"),
    ],
)
def test_recipe_settings_that_cannot_work_are_refused(tiny_data, tmp_path, settings, message):
    from deim_ultra.train import DEIMTrainer

    with pytest.raises(ValueError, match=message):
        DEIMTrainer(
            overrides=dict(model="deim-n.yaml", data=str(tiny_data), epochs=10, project=str(tmp_path), **settings)
        )


def test_zero_area_targets_are_ignored_by_the_loss(caplog):
    import torch

    from deim_ultra.nn.tasks import DEIMDetectionModel

    torch.manual_seed(0)
    model = DEIMDetectionModel("deim-n.yaml", nc=3, verbose=False).eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        preds = model(images)
    clean = {
        "img": images,
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]] * 2),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }
    dirty = {
        **clean,
        "cls": torch.tensor([[0.0], [2.0], [1.0]]),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.4, 0.4, 0.0, 0.1], [0.5, 0.5, 0.2, 0.3]]),
    }
    caplog.set_level(logging.WARNING, logger="ultralytics")
    assert model.loss(dirty, preds)[0].item() == pytest.approx(model.loss(clean, preds)[0].item(), rel=1e-6)
    assert "zero-area" in caplog.text
