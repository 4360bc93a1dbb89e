"""Training options reach training: `cls_loss=vfl` and `o2m=True` (MS-DETR) train and show in the logged columns;
recipes l and x freeze the stem and the backbone's BatchNorm."""

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


def onnx_graph(path: Path) -> tuple[set[str], int]:
    """The operator types of an ONNX file and how many weights it holds: float tensors of more than one value (the
    scalar and shape constants the exporter folds depend on the operators' order)."""
    import numpy as np
    import onnx

    graph = onnx.load(str(path)).graph
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1]
    return {node.op_type for node in graph.node}, sum(int(np.prod(t.dims)) for t in weights)


def test_o2m_trains_every_layer_and_deploys_like_the_plain_model(tiny_data, tmp_path):
    """MS-DETR's mixed supervision: the trained checkpoint records it, every decoder layer has one-to-many terms, and
    the checkpoint validates and exports with the plain model's operators and weights (the branch is training-only;
    the layers keep MS-DETR's order, cross-attention first)."""
    model, _ = train_one_epoch(tiny_data, tmp_path, o2m=True)
    best = tmp_path / "run" / "weights" / "best.pt"
    trained = DEIM(best)
    assert trained.model.yaml["o2m"] and trained.model.model[-1].decoder.layers[0].cross_attention_first
    net = trained.model.train()
    batch = next(iter(model.trainer.train_loader))
    images = batch["img"].float() / 255
    targets = [
        {
            "labels": batch["cls"][batch["batch_idx"] == i].long().view(-1),
            "boxes": batch["bboxes"][batch["batch_idx"] == i],
        }
        for i in range(len(images))
    ]
    net.args = {}
    terms = net.init_criterion()(net.predict(images), targets)
    layers = len(net.model[-1].decoder.layers)
    assert {f"loss_{k}_o2m_{i}" for k in ("mal", "bbox", "giou") for i in range(layers)} <= set(terms)

    metrics = DEIM(best).val(data=str(tiny_data), imgsz=160, batch=4, workers=0, plots=False, project=str(tmp_path))
    assert metrics.box.map == pytest.approx(model.trainer.metrics["metrics/mAP50-95(B)"], abs=1e-6)  # the final val
    train_one_epoch(tiny_data, tmp_path / "plain")
    exported = onnx_graph(DEIM(best).export(format="onnx", imgsz=160))
    reference = onnx_graph(DEIM(tmp_path / "plain" / "run" / "weights" / "best.pt").export(format="onnx", imgsz=160))
    assert exported == reference  # the same operators and weights: the one-to-many FFNs are not exported


@pytest.mark.parametrize("o2m", [False, True])
def test_o2m_terms_and_positive_count_from_the_criterion(o2m, tiny_data):
    """On one batch, mixed supervision adds `_o2m_<layer>` terms and never lowers the positives per image."""
    from ultralytics.data.utils import check_det_dataset

    from deim_ultra.nn.tasks import build_detection_model

    torch.manual_seed(0)
    model = build_detection_model("deim-n.yaml", nc=3, verbose=False, o2m=o2m)
    model.args = {}
    data = check_det_dataset(str(tiny_data))
    labels = sorted(Path(data["train"]).parent.parent.glob("labels/train/*.txt"))[:2]
    rows = [torch.tensor([[float(x) for x in line.split()] for line in p.read_text().splitlines()]) for p in labels]
    batch = {
        "img": torch.rand(2, 3, 160, 160),
        "cls": torch.cat([r[:, :1] for r in rows]),
        "bboxes": torch.cat([r[:, 1:] for r in rows]),
        "batch_idx": torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)]),
    }
    with torch.no_grad():
        model.train()
        outputs = model.predict(batch["img"])
        # The last layer's one-to-many queries placed on the GT boxes, twice: each GT has two perfect candidates.
        for layer in outputs.get("o2m_outputs", [])[-1:]:
            for i, r in enumerate(rows):
                layer["pred_boxes"][i, : len(r)] = r[:, 1:]
                layer["pred_boxes"][i, len(r) : 2 * len(r)] = r[:, 1:]
        _, items = model.loss(batch, outputs)
        terms = model.criterion(outputs, [{"labels": r[:, 0].long(), "boxes": r[:, 1:]} for r in rows])
    assert sorted(k for k in terms if "_o2m_" in k) == (
        sorted(f"loss_{k}_o2m_{i}" for k in ("mal", "bbox", "giou") for i in range(3)) if o2m else []
    )
    one_to_one = sum(len(r) for r in rows) / 2
    if o2m:  # both duplicates of each GT are one-to-many positives of the last layer
        assert items["pos_per_img"].item() > one_to_one
    else:
        assert items["pos_per_img"].item() == one_to_one


def test_fine_tuning_across_the_o2m_setting_says_what_changed(tiny_data, tmp_path, caplog):
    """A plain checkpoint fine-tuned with o2m=True: the log says the layer order changes and the one-to-many FFNs
    start from random weights; Ultralytics transfers every other tensor."""
    train_one_epoch(tiny_data, tmp_path / "plain")
    caplog.set_level("INFO", logger="ultralytics")
    _, _ = train_one_epoch(
        tiny_data, tmp_path / "o2m", model=str(tmp_path / "plain" / "run" / "weights" / "last.pt"), o2m=True
    )
    assert "trained without MS-DETR's mixed supervision and this model has it on" in caplog.text
    assert "one-to-many FFNs (o2m_ffn) start from random weights" in caplog.text


def test_o2m_is_refused_for_ultralytics_rtdetr_layers(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="Ultralytics' RT-DETR decoder"):
        train_one_epoch(tiny_data, tmp_path, model="rtdetr-l.yaml", o2m=True)


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


@pytest.mark.parametrize("setting", [{"o2m": "no"}, {"freeze_norm": "yes"}, {"loss_bbox": "5"}, {"warmup_iters": 1.5}])
def test_a_deim_setting_of_the_wrong_type_is_refused(setting, tiny_data, tmp_path):
    """`deim train o2m=no` reaches the trainer as the string 'no', which would switch mixed supervision on."""
    ((key, value),) = setting.items()
    with pytest.raises(TypeError, match=f"'{key}={value}' is of invalid type"):
        train_one_epoch(tiny_data, tmp_path, **setting)
