"""Foreign and wrong checkpoints: one-line errors naming the mismatch, and no pickle payload ever runs."""

import logging
import os

import pytest
import torch

from deim_ultra import DEIM, convert_official
from deim_ultra.checkpoints.safety import UnsafeCheckpointError
from deim_ultra.nn.tasks import DEIMDetectionModel


class Payload:
    """Unpickling this calls os.system, which here creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    """A `.pt` shaped like an Ultralytics checkpoint and a `.pth` shaped like an official one, each with a payload."""
    marker = tmp_path / "payload_ran"
    pt, pth = tmp_path / "evil.pt", tmp_path / "evil.pth"
    torch.save({"model": Payload(marker), "train_args": {}}, pt)
    torch.save({"model": {"backbone.stem.stem1.conv.weight": torch.zeros(1)}, "extra": Payload(marker)}, pth)
    return pt, pth, marker


def test_malicious_pickles_are_refused_without_running(evil, tiny_data, tmp_path):
    pt, pth, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="evil.pt' refused: loading it would call posix.system"):
        DEIM(pt)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth' refused: .*posix.system"):
        convert_official(pth)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth' refused"):  # the backbone loader reads it
        DEIM("deim-n.yaml").train(data=str(tiny_data), pretrained=str(pth), epochs=1, imgsz=64, project=str(tmp_path))
    with pytest.raises(UnsafeCheckpointError, match="evil.pt' refused"):  # Ultralytics would unpickle it fully
        DEIM("deim-n.yaml").train(data=str(tiny_data), pretrained=str(pt), epochs=1, imgsz=64, project=str(tmp_path))
    assert not marker.exists()


def test_the_payload_would_have_run(evil):
    """The fixture is a real payload: an unguarded load executes it."""
    pt, _, marker = evil
    torch.load(pt, weights_only=False)
    assert marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("these are not weights")
    with pytest.raises(ValueError, match=r"'.*notes.pt' is not a PyTorch checkpoint"):
        DEIM(notes)


def test_a_checkpoint_of_another_class_count_fine_tunes_and_says_which_layers_restart(tiny_data, tmp_path, caplog):
    five = DEIM("deim-n.yaml")
    five.model = DEIMDetectionModel("deim-n.yaml", nc=5, verbose=False)
    five.save(tmp_path / "five.pt")
    caplog.set_level(logging.INFO, logger="ultralytics")
    model = DEIM(tmp_path / "five.pt")
    model.train(data=str(tiny_data), epochs=1, imgsz=64, batch=4, workers=0, plots=False, project=str(tmp_path))
    message = next(r.getMessage() for r in caplog.records if "Fine-tuning a 5-class checkpoint" in r.getMessage())
    assert "on 3 classes" in message and "enc_score_head.weight" in message and "backbone" not in message
    assert model.trainer.model.nc == 3
