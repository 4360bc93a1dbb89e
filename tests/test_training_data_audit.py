"""Broken, odd and mislabelled training data, through `train()`: each file named once with what was done to it, the
skipped count reported every epoch, and a training set with nothing usable refused before the first epoch."""

import logging
import shutil

import cv2
import numpy as np
import pytest

from deim_ultra import DEIM
from deim_ultra.data.audit import DatasetError

from helpers import deim_cli

SETTINGS = dict(epochs=1, imgsz=64, batch=4, workers=0, policy_epochs=[1, 1, 1], warmup_iters=1, plots=False)


def dataset_copy(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data.parent, root)
    for cache in root.rglob("*.cache"):
        cache.unlink()
    yaml_file = root / tiny_data.name
    yaml_file.write_text(yaml_file.read_text().replace(str(tiny_data.parent), str(root)))
    images = sorted((root / "images" / "train").glob("*.png"))
    return yaml_file, images, root / "labels" / "train"


def test_every_broken_or_converted_training_file_is_named(tiny_data, tmp_path, caplog):
    yaml_file, images, labels = dataset_copy(tiny_data, tmp_path)
    label = {i: labels / f"{images[i].stem}.txt" for i in range(len(images))}
    original = {i: cv2.imread(str(images[i])) for i in (2, 3, 4)}
    images[0].write_bytes(images[0].read_bytes()[:300])  # truncated PNG
    label[1].write_text("-1 0.5 0.5 0.2 0.2\n")  # negative class id
    cv2.imwrite(str(images[2]), cv2.cvtColor(original[2], cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(images[3]), cv2.cvtColor(original[3], cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(images[4]), original[4].astype(np.uint16) * 257)  # 16-bit, same picture
    cv2.imwrite(str(images[5]), cv2.resize(cv2.imread(str(images[5])), (8000, 6000)))
    label[6].write_text("0 0.5 0.5 0.0 0.2\n" + label[6].read_text())  # a zero-area box among valid ones
    label[7].write_text("0 1.4 0.5 0.2 0.2\n")  # outside the image

    caplog.set_level(logging.INFO, logger="ultralytics")
    model = DEIM("deim-n.yaml")
    model.train(data=str(yaml_file), project=str(tmp_path), name="run", **SETTINGS)
    log = [r.getMessage() for r in caplog.records]

    def line(*parts):
        return [m for m in log if all(p in m for p in parts)]

    assert line(images[0].name, "ignoring corrupt image/label", "runcated")
    assert line(images[1].name, "ignoring corrupt image/label", "negative label values")
    assert line(images[7].name, "ignoring corrupt image/label", "out of bounds")
    assert line("3 of 8 images skipped")
    assert line("1 grayscale image(s) converted to 3 channels", images[2].name)
    assert line("1 image(s) with an alpha channel or a palette converted to 3-channel BGR", images[3].name)
    assert line("1 16-bit image(s) scaled to 8 bits per channel", images[4].name)
    assert line("1 image(s) over 40 megapixels", images[5].name)
    assert line("1 zero-area boxes ignored", images[6].name)
    assert line("Epoch 1: 3 broken training images skipped")
    dataset = model.trainer.train_loader.dataset
    loaded = {f.split("/")[-1]: i for i, f in enumerate(dataset.im_files)}
    assert len(loaded) == 5
    gray = cv2.cvtColor(cv2.cvtColor(original[2], cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    for i, expected in ((2, gray), (3, original[3]), (4, original[4])):  # the loader's repair: the 8-bit BGR picture
        image = dataset.load_image(loaded[images[i].name])[0]
        resized = cv2.resize(expected, (64, 64), interpolation=cv2.INTER_LINEAR)  # the loader's resize to imgsz
        assert np.abs(image.astype(int) - resized.astype(int)).max() <= 1  # 16-bit -> 8-bit may round up by 1


@pytest.mark.parametrize(
    "row, error, message",
    [
        ("0 0.5 0.5 0.0 0.2", ValueError, r"no usable box .* 8 with zero-area boxes"),  # the scan keeps them all
        ("0 0.5 0.5 0.2", RuntimeError, r"(?s)No valid images found.*labels require 5 columns, 4 columns detected"),
    ],
)
def test_a_training_set_without_usable_boxes_fails_before_training(tiny_data, tmp_path, row, error, message):
    yaml_file, _, labels = dataset_copy(tiny_data, tmp_path)
    for file in labels.glob("*.txt"):
        file.write_text(row + "\n")
    model = DEIM("deim-n.yaml")
    epochs = []
    model.add_callback("on_train_epoch_start", lambda t: epochs.append(t.epoch))
    with pytest.raises(error, match=message):
        model.train(data=str(yaml_file), project=str(tmp_path), name="run", **SETTINGS)
    assert epochs == []


def one_based(labels, keep_top_class: bool) -> None:
    """Shift every class id up by one (0..2 -> 1..3 with nc=3); with `keep_top_class` False only images 0 and 1 get
    a box of class 3, so the scan keeps the other six."""
    for i, file in enumerate(sorted(labels.glob("*.txt"))):
        rows = [r.split() for r in file.read_text().splitlines()]
        shifted = [[str(int(r[0]) + 1), *r[1:]] for r in rows]
        if not keep_top_class:
            shifted = [[("3" if i < 2 and j == 0 else str(1 + int(r[0]) % 2)), *r[1:]] for j, r in enumerate(rows)]
        file.write_text("\n".join(" ".join(r) for r in shifted) + "\n")


def test_one_based_class_ids_are_named_as_the_likely_off_by_one(tiny_data, tmp_path, caplog):
    yaml_file, images, labels = dataset_copy(tiny_data, tmp_path)
    one_based(labels, keep_top_class=False)
    caplog.set_level(logging.INFO, logger="ultralytics")
    DEIM("deim-n.yaml").train(data=str(yaml_file), project=str(tmp_path), name="run", **SETTINGS)
    assert "class ids look 1-based: no box has class 0 and the largest id is 3" in caplog.text
    assert "2 of 8 images skipped" in caplog.text


def test_one_based_ids_in_every_image_fail_with_the_hint(tiny_data, tmp_path):
    yaml_file, _, labels = dataset_copy(tiny_data, tmp_path)
    one_based(labels, keep_top_class=True)  # every image holds a class-2 box, now 3: the scan keeps none
    with pytest.raises(DatasetError, match="(?s)No valid images found.*class ids look 1-based.*subtract 1"):
        DEIM("deim-n.yaml").train(data=str(yaml_file), project=str(tmp_path), name="run", **SETTINGS)
    cli = deim_cli("train", "model=deim-n.yaml", f"data={yaml_file}", "epochs=1", "imgsz=64", "workers=0", cwd=tmp_path)
    assert cli.returncode == 1  # one error line with the hint, no traceback
    assert "deim train failed: DatasetError" in cli.stdout + cli.stderr and "subtract 1" in cli.stdout + cli.stderr
    assert "Traceback" not in cli.stdout + cli.stderr
