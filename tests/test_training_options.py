"""Training options reach training: `cls_loss=vfl` and `o2m=True` train and show in the logged columns; recipes l
and x freeze the stem and the backbone's BatchNorm."""

import csv
from pathlib import Path

import pytest
import torch

from deim_ultra import DEIM


def train_one_epoch(tiny_data: Path, tmp_path: Path, model: str = "deim-n.yaml", **options) -> tuple[DEIM, dict]:
    model = DEIM(model)
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


def test_recipe_l_keeps_the_stem_and_the_backbone_statistics_of_its_start(tiny_data, tmp_path):
    """Fine-tuning under recipe l (the authors' L/X: `freeze_at: 0`, `freeze_norm: True`) leaves the stem's weights
    and every backbone BatchNorm (statistics and affine) as the checkpoint had them, while the rest trains."""
    from torchvision.ops import FrozenBatchNorm2d

    start, _ = train_one_epoch(tiny_data, tmp_path / "n", recipe="n")  # trained BatchNorm statistics to start from
    checkpoint = tmp_path / "n" / "run" / "weights" / "last.pt"
    before = {k: v.float() for k, v in DEIM(checkpoint).model.state_dict().items()}
    tuned, _ = train_one_epoch(tiny_data, tmp_path / "l", model=str(checkpoint), recipe="l", lr0=1e-3)
    layers = tuned.trainer.model.model
    after = tuned.trainer.model.state_dict()

    backbone_norms = [m for layer in layers[:5] for m in layer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    frozen = [(n, m) for n, m in layers[:5].named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert not backbone_norms and len(frozen) > 10
    for name, _ in frozen:
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            key = f"model.{name}.{buffer}"
            assert torch.equal(after[key], before[key]), key
    assert before["model.0.stem1.bn.running_var"].std() > 0  # the start is trained, not BatchNorm's defaults
    stem = [k for k in after if k.startswith("model.0.")]  # convolutions, learnable affines, frozen norms
    assert len(stem) > 10 and all(torch.equal(after[k], before[k]) for k in stem)
    stage = "model.1.blocks.0.layers.0.conv.weight"
    encoder_norm = next(k for k in after if k.startswith("model.5.") and k.endswith("running_mean"))
    assert not torch.equal(after[stage], before[stage])  # the stages train
    assert not torch.equal(after[encoder_norm], before[encoder_norm])  # the encoder's BatchNorm keeps learning
    saved = DEIM(tmp_path / "l" / "run" / "weights" / "last.pt").model
    assert any(isinstance(m, FrozenBatchNorm2d) for m in saved.model[0].modules())


def test_recipe_n_trains_the_stem_and_the_backbone_norms(tiny_data, tmp_path):
    model, _ = train_one_epoch(tiny_data, tmp_path, recipe="n")
    layers = model.trainer.model.model
    assert model.trainer.args.freeze is None and not model.trainer.args.freeze_norm
    assert all(p.requires_grad for p in layers[0].parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in layers[0].modules())
