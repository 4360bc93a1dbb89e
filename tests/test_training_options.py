"""Loss options reach training: `cls_loss=vfl` and `o2m=True` train and show in the logged columns."""

import csv
from pathlib import Path

import pytest

from deim_ultra import DEIM


def train_one_epoch(tiny_data: Path, tmp_path: Path, **options) -> tuple[DEIM, dict]:
    model = DEIM("deim-n.yaml")
    model.train(
        data=str(tiny_data),
        epochs=1,
        imgsz=160,
        batch=4,
        workers=0,
        project=str(tmp_path),
        name="run",
        plots=False,
        **options,
    )
    with open(tmp_path / "run" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    return model, {k.strip(): v for k, v in row.items()}


def test_vfl_replaces_mal_in_the_loss_columns(tiny_data, tmp_path):
    model, row = train_one_epoch(tiny_data, tmp_path, cls_loss="vfl")
    assert "train/vfl" in row and "train/mal" not in row
    assert float(row["train/vfl"]) > 0
    assert model.trainer.model.criterion.cls_loss == "vfl"


def test_o2m_adds_one_to_many_terms(tiny_data, tmp_path):
    model, row = train_one_epoch(tiny_data, tmp_path, o2m=True)
    trained = model.trainer.model.train()
    assert trained.criterion.o2m
    batch = next(iter(model.trainer.train_loader))
    images = batch["img"].float() / 255
    targets = [
        {
            "labels": batch["cls"][batch["batch_idx"] == i].long().view(-1),
            "boxes": batch["bboxes"][batch["batch_idx"] == i],
        }
        for i in range(len(images))
    ]
    terms = trained.criterion(trained.predict(images), targets)
    assert {"loss_mal_o2m", "loss_bbox_o2m", "loss_giou_o2m"} <= set(terms)
    assert float(row["train/pos_per_img"]) > 0


@pytest.mark.parametrize("o2m", [False, True])
def test_o2m_terms_and_positive_count_from_the_criterion(o2m, tiny_data):
    """On one batch, o2m adds `_o2m` terms and never lowers the positives per image."""
    import torch
    from ultralytics.data.utils import check_det_dataset

    from deim_ultra.nn.tasks import DEIMDetectionModel

    torch.manual_seed(0)
    model = DEIMDetectionModel("deim-n.yaml", nc=3, verbose=False)
    model.args = {"o2m": o2m}
    data = check_det_dataset(str(tiny_data))
    labels = sorted(Path(data["train"]).parent.parent.glob("labels/train/*.txt"))[:2]
    rows = [torch.tensor([[float(x) for x in line.split()] for line in p.read_text().splitlines()]) for p in labels]
    # Queries placed exactly on the GT boxes: every GT has a perfect candidate, so o2m must find matches.
    batch = {
        "img": torch.rand(2, 3, 160, 160),
        "cls": torch.cat([r[:, :1] for r in rows]),
        "bboxes": torch.cat([r[:, 1:] for r in rows]),
        "batch_idx": torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)]),
    }
    with torch.no_grad():
        model.train()
        outputs = model.predict(batch["img"])
        for i, r in enumerate(rows):
            outputs["pred_boxes"][i, : len(r)] = r[:, 1:]
            outputs["pred_boxes"][i, len(r) : 2 * len(r)] = r[:, 1:]  # a second, duplicate candidate per GT
        _, items = model.loss(batch, outputs)
        terms = model.criterion(outputs, [{"labels": r[:, 0].long(), "boxes": r[:, 1:]} for r in rows])
    assert any(k.endswith("_o2m") for k in terms) == o2m
    one_to_one = sum(len(r) for r in rows) / 2
    if o2m:  # duplicates on each GT are extra positives under one-to-many matching
        assert items["pos_per_img"].item() > one_to_one
    else:
        assert items["pos_per_img"].item() == one_to_one
