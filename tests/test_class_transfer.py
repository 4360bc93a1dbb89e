"""Fine-tuning a COCO checkpoint on other classes: class rows follow class names (Ultralytics' `cls_remap`)."""

import math

import pytest
import torch
import yaml

from deim_ultra import DEIM
from deim_ultra.convert import convert_official_file
from deim_ultra.data.synthetic import make_synthetic_dataset

from helpers import deim_cli, official_weights

# Every tensor of DEIM-N with one row per class (layer 8 is the decoder); the embedding has a padding row after them.
CLASS_KEYS = (
    "model.8.enc_score_head.weight",
    "model.8.enc_score_head.bias",
    *(f"model.8.dec_score_head.{i}.{p}" for i in range(3) for p in ("weight", "bias")),
    "model.8.denoising_class_embed.weight",
)
COCO_DOG, COCO_PERSON = 16, 0
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # the authors' score-head bias init, a 1 % prior


def named_dataset(data, tmp_path, names: list[str]):
    """A generated shapes dataset (its data YAML) with its classes renamed."""
    cfg = yaml.safe_load(data.read_text())
    cfg.update(path=str(data.parent), names=dict(enumerate(names)))
    path = tmp_path / f"{'_'.join(names)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """An 80-class DEIM-N in the authors' `.pth` layout, converted the way users do (`deim convert`): COCO names."""
    folder = tmp_path_factory.mktemp("official")
    torch.save({"model": official_weights()}, folder / "deim_n_official.pth")
    path = convert_official_file(folder / "deim_n_official.pth", "deim-n.yaml")
    moved = folder / path.name
    path.replace(moved)
    return moved


def checkpoint_state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"].float().state_dict()


def start_of_training_state(model: DEIM, **train_kwargs) -> dict[str, torch.Tensor]:
    """The state of the model Ultralytics trains, captured when training starts (before any optimizer step)."""
    seen = {}
    model.add_callback(
        "on_train_start", lambda trainer: seen.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
    )
    model.train(epochs=1, imgsz=64, batch=4, workers=0, plots=False, val=False, **train_kwargs)
    return seen


def test_train_gives_named_classes_their_coco_rows_and_new_ones_fresh_rows(coco_checkpoint, tiny_data, tmp_path):
    data = named_dataset(tiny_data, tmp_path, ["dog", "person", "tree"])
    coco = checkpoint_state(coco_checkpoint)
    start = start_of_training_state(DEIM(coco_checkpoint), data=str(data), project=str(tmp_path))
    for key in CLASS_KEYS:
        assert torch.equal(start[key][0], coco[key][COCO_DOG]), key
        assert torch.equal(start[key][1], coco[key][COCO_PERSON]), key
        assert not any(torch.equal(start[key][2], row) for row in coco[key]), key  # tree: no COCO row
    for i in range(3):  # tree's score biases are the fresh initialisation's
        assert start[f"model.8.dec_score_head.{i}.bias"][2].item() == pytest.approx(PRIOR_BIAS)
    embedding = start["model.8.denoising_class_embed.weight"]
    assert embedding.shape == (4, 128) and torch.equal(embedding[3], torch.zeros(128))  # padding row kept
    assert torch.equal(start["model.0.stem1.conv.weight"], coco["model.0.stem1.conv.weight"])  # the rest transfers


def test_the_log_names_what_was_transferred(coco_checkpoint, tiny_data, tmp_path, caplog):
    data = named_dataset(tiny_data, tmp_path, ["Person", "tree", "chair"])
    caplog.set_level("INFO", logger="ultralytics")
    start_of_training_state(DEIM(coco_checkpoint), data=str(data), project=str(tmp_path))
    line = next(r.getMessage() for r in caplog.records if "transferred by name" in r.getMessage())
    assert "Person <- 0" in line and "chair <- 56" in line and "new classes, fresh rows: tree" in line
    assert "Transferred 665/674 items" in caplog.text  # the 9 class tensors hold fresh rows: not counted as transferred


@pytest.mark.parametrize(
    "names",
    [
        ["person", "chair", "diningtable"],  # the crash of the issue: 3 classes, two COCO names
        ["chair", "person", "dog"],  # all known, reordered
        ["tree", "rock", "cloud"],  # none known
    ],
)
def test_any_overlap_trains(coco_checkpoint, tiny_data, tmp_path, names):
    data = named_dataset(tiny_data, tmp_path, names)
    coco = checkpoint_state(coco_checkpoint)
    start = start_of_training_state(DEIM(coco_checkpoint), data=str(data), project=str(tmp_path))
    coco_ids = {"person": 0, "chair": 56, "dog": 16}
    for i, name in enumerate(names):
        row, theirs = start["model.8.enc_score_head.weight"][i], coco["model.8.enc_score_head.weight"]
        if name in coco_ids:
            assert torch.equal(row, theirs[coco_ids[name]]), name
        else:
            assert not any(torch.equal(row, r) for r in theirs), name


def test_refining_on_fewer_and_on_more_of_its_own_classes(coco_checkpoint, tiny_data, tmp_path):
    """A fine-tuned model fine-tuned again on fewer of its classes (the issue's second crash), and on more."""
    three = named_dataset(tiny_data, tmp_path, ["chair", "person", "dog"])
    first = DEIM(coco_checkpoint)
    first.train(data=str(three), epochs=1, imgsz=64, batch=4, workers=0, plots=False, project=str(tmp_path))
    best = first.trainer.best if first.trainer.best.exists() else first.trainer.last
    two_classes = make_synthetic_dataset(tmp_path / "two", n_train=8, n_val=4, imgsz=160, nc=2, seed=1)
    two = named_dataset(two_classes, tmp_path, ["person", "chair"])
    theirs = checkpoint_state(best)
    start = start_of_training_state(DEIM(best), data=str(two), project=str(tmp_path))
    assert torch.equal(start["model.8.enc_score_head.weight"][0], theirs["model.8.enc_score_head.weight"][1])
    assert torch.equal(start["model.8.enc_score_head.weight"][1], theirs["model.8.enc_score_head.weight"][0])
    four_classes = make_synthetic_dataset(tmp_path / "four", n_train=8, n_val=4, imgsz=160, nc=4, seed=2)
    four = named_dataset(four_classes, tmp_path, ["tree", "dog", "chair", "person"])  # more classes than it has
    start = start_of_training_state(DEIM(best), data=str(four), project=str(tmp_path))
    for i, source in ((1, 2), (2, 0), (3, 1)):
        assert torch.equal(start["model.8.enc_score_head.weight"][i], theirs["model.8.enc_score_head.weight"][source])
    assert start["model.8.denoising_class_embed.weight"].shape == (5, 128)


def test_cls_remap_false_copies_by_position_only(coco_checkpoint, tiny_data, tmp_path, caplog):
    data = named_dataset(tiny_data, tmp_path, ["dog", "person", "tree"])
    caplog.set_level("INFO", logger="ultralytics")
    start = start_of_training_state(DEIM(coco_checkpoint), data=str(data), project=str(tmp_path), cls_remap=False)
    coco = checkpoint_state(coco_checkpoint)
    assert not torch.equal(start["model.8.enc_score_head.weight"][0], coco["model.8.enc_score_head.weight"][16])
    assert "Fine-tuning a 80-class checkpoint on 3 classes without class names to match" in caplog.text


def test_cli_train_transfers_rows_by_name(coco_checkpoint, tiny_data, tmp_path):
    """`deim train`: with lr0=0 no step moves a weight, so the saved model holds the rows training started from."""
    data = named_dataset(tiny_data, tmp_path, ["dog", "person", "tree"])
    args = ["epochs=1", "imgsz=64", "batch=4", "workers=0", "plots=False", "lr0=0", f"project={tmp_path}", "name=cli"]
    result = deim_cli("train", f"model={coco_checkpoint}", f"data={data}", *args, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "dog <- 16, person <- 0; new classes, fresh rows: tree" in result.stdout + result.stderr
    saved, coco = checkpoint_state(tmp_path / "cli" / "weights" / "last.pt"), checkpoint_state(coco_checkpoint)
    for key in CLASS_KEYS:  # checkpoints are stored in float16
        assert torch.equal(saved[key][0], coco[key][COCO_DOG].half().float()), key
        assert torch.equal(saved[key][1], coco[key][COCO_PERSON].half().float()), key
