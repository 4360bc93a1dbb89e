"""COCO json datasets: trained and validated as the same set in YOLO labels is, category ids kept to the end."""

import io
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml

from deim_ultra import DEIM
from deim_ultra.data.coco_write import yolo_to_coco
from deim_ultra.data.synthetic import make_synthetic_dataset

from helpers import deim_cli

IMGSZ = 96
CATEGORY_IDS = [3, 1_099_511_627_783]  # sparse, one beyond 32 bits (COCO json allows any integer)
NAMES = ["red box", "green blob"]  # the json's names, not the data YAML's


def as_coco(data_yaml: Path, category_ids=CATEGORY_IDS, names=NAMES) -> Path:
    """The dataset root with its labels also written as COCO json (COCO 2017 layout), categories renamed."""
    root = yolo_to_coco(data_yaml, category_ids=category_ids)
    for file in (root / "annotations").glob("*.json"):
        content = json.loads(file.read_text())
        for category, name in zip(content["categories"], names):
            category["name"] = name
        file.write_text(json.dumps(content))
    return root


def edit_json(file: Path, edit) -> None:
    content = json.loads(file.read_text())
    edit(content)
    file.write_text(json.dumps(content))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """Two classes, 1-2 large shapes per 96-px image (a set DEIM-N from scratch detects something on in minutes), as
    YOLO labels (root/data.yaml) and COCO json (root/annotations)."""
    root = tmp_path_factory.mktemp("coco_easy")
    data = make_synthetic_dataset(root, n_train=16, n_val=4, imgsz=IMGSZ, nc=2, max_objects=2, min_size=30, max_size=60)
    return as_coco(data)


@pytest.fixture(scope="module")
def trained(coco_root, tmp_path_factory) -> Path:
    """The run folder of `deim train data=<COCO folder>` (12 epochs: a non-zero mAP to compare)."""
    project = tmp_path_factory.mktemp("coco_run")
    result = deim_cli(
        "train", "model=deim-n.yaml", f"data={coco_root}", "epochs=12", f"imgsz={IMGSZ}", "batch=4", "workers=0",
        "plots=False", "policy_epochs=[1,2,10]", "warmup_iters=1", "lr0=2e-3", "backbone_lr=1e-3", "seed=0",
        f"project={project}", "name=run", cwd=project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (project / "run" / "train.log").write_text(result.stdout + result.stderr)
    return project / "run"


def test_cli_trains_on_a_coco_folder_with_the_json_classes(trained):
    model = DEIM(trained / "weights" / "best.pt")
    assert model.names == dict(enumerate(NAMES))
    assert model.category_ids == dict(enumerate(CATEGORY_IDS))
    log = (trained / "train.log").read_text()
    assert "instances_train.cache" in log  # the label cache sits beside the json
    stripped = [line for line in log.splitlines() if "Optimizer stripped from" in line]
    assert stripped and not any(".tmp" in line for line in stripped)  # the checkpoints, not their temporary files
    # The final evaluation of a COCO json run is COCO's too, with the dataset's own ids in predictions.json.
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in log
    predictions = json.loads((trained / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= set(CATEGORY_IDS)


def test_coco_val_equals_yolo_val_and_reports_coco_ap(trained, coco_root, tmp_path):
    best = trained / "weights" / "best.pt"
    settings = dict(imgsz=IMGSZ, batch=2, project=str(tmp_path), plots=False, save_json=True)
    yolo = DEIM(best).val(data=str(coco_root / "data.yaml"), name="yolo", **settings)
    coco = DEIM(best).val(data=str(coco_root), name="coco", **settings)
    assert yolo.box.map50 > 0
    assert abs(coco.box.map - yolo.box.map) <= 0.001
    assert coco.coco["AP"] > 0 and abs(coco.coco["AP"] - yolo.box.map) < 0.1
    # COCO's evaluation of the YOLO labels (ground truth rebuilt from them) scores the checkpoint's category ids too.
    assert yolo.coco["AP"] == pytest.approx(coco.coco["AP"], abs=1e-3)
    truth = json.loads((coco_root / "annotations" / "instances_val.json").read_text())
    predictions = json.loads((tmp_path / "coco" / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} <= {image["id"] for image in truth["images"]}
    assert {p["category_id"] for p in predictions} <= set(CATEGORY_IDS)


def test_cli_val_with_save_json_prints_coco_ap_with_the_original_ids(trained, coco_root, tmp_path):
    result = deim_cli(
        "val", f"model={trained / 'weights' / 'best.pt'}", f"data={coco_root}", "save_json=True", f"imgsz={IMGSZ}",
        f"project={tmp_path}", "name=v", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in out
    assert "category id" in out and "red box" in out and " 1099511627783 " in out  # the per-class table
    predictions = json.loads((tmp_path / "v" / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= set(CATEGORY_IDS)


def roboflow_placeholder(content: dict) -> None:
    """Roboflow's COCO export: category 0 is the dataset, the supercategory of the real ones, with no box."""
    for category in content["categories"]:
        category["supercategory"] = "shapes-x1y2"
    content["categories"].insert(0, dict(id=0, name="shapes-x1y2", supercategory="none"))


def test_roboflow_and_yaml_layouts_read_the_same_dataset(trained, coco_root, tmp_path):
    """The same images and json in Roboflow's export layout (with its dataset-name category), as a data YAML naming
    json files kept elsewhere with explicit image folders, and with file names relative to the dataset root: each
    validates to the COCO 2017 layout's numbers with the same classes."""
    roboflow = tmp_path / "roboflow"
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(coco_root / "images" / split, roboflow / folder)
        shutil.copy(coco_root / "annotations" / f"instances_{split}.json", roboflow / folder / "_annotations.coco.json")
        edit_json(roboflow / folder / "_annotations.coco.json", roboflow_placeholder)
    root_relative = tmp_path / "root_relative"
    (root_relative / "annotations").mkdir(parents=True)
    (root_relative / "images").symlink_to(coco_root / "images")
    for split in ("train", "val"):
        content = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        for image in content["images"]:
            image["file_name"] = f"images/{split}/{image['file_name']}"
        (root_relative / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    labels = tmp_path / "labels_only"
    shutil.copytree(coco_root / "annotations", labels)
    data_yaml = tmp_path / "coco.yaml"
    data_yaml.write_text(yaml.safe_dump(dict(
        path=str(labels), train="instances_train.json", val="instances_val.json",
        train_images=str(coco_root / "images" / "train"), val_images=str(coco_root / "images" / "val"),
    )))  # fmt: skip
    best = trained / "weights" / "best.pt"
    settings = dict(imgsz=IMGSZ, batch=2, project=str(tmp_path), plots=False)
    reference = DEIM(best).val(data=str(coco_root), name="coco2017", **settings).box.map
    for name, data in (("roboflow", roboflow), ("yaml", data_yaml), ("root_relative", root_relative)):
        metrics = DEIM(best).val(data=str(data), name=name, **settings)
        assert metrics.box.map == pytest.approx(reference, abs=1e-6), name
        assert metrics.names == dict(enumerate(NAMES))


def test_export_metadata_carries_the_category_ids(trained, tmp_path):
    weights = tmp_path / "best.pt"
    shutil.copy(trained / "weights" / "best.pt", weights)
    exported = DEIM(weights).export(format="onnx", imgsz=IMGSZ)
    metadata = {p.key: p.value for p in onnx.load(exported).metadata_props}
    assert yaml.safe_load(metadata["category_ids"]) == CATEGORY_IDS
    assert DEIM(exported).category_ids == dict(enumerate(CATEGORY_IDS))


def test_val_only_dataset_and_a_lone_json_validate(trained, coco_root, tmp_path):
    """Evaluating on a downloaded val split alone: a folder with only instances_val.json, or that json itself."""
    val_only = tmp_path / "val_only"
    (val_only / "annotations").mkdir(parents=True)
    shutil.copy(coco_root / "annotations" / "instances_val.json", val_only / "annotations")
    shutil.copytree(coco_root / "images" / "val", val_only / "val")
    best = trained / "weights" / "best.pt"
    settings = dict(imgsz=IMGSZ, batch=2, project=str(tmp_path), plots=False)
    reference = DEIM(best).val(data=str(coco_root), name="full", **settings).box.map
    folder = DEIM(best).val(data=str(val_only), name="folder", **settings)
    lone = DEIM(best).val(data=str(val_only / "annotations" / "instances_val.json"), name="json", **settings)
    assert folder.box.map == pytest.approx(reference, abs=1e-6) and lone.box.map == pytest.approx(reference, abs=1e-6)
    assert folder.coco["AP"] > 0


def test_a_changed_json_is_read_again(coco_root, trained, tmp_path):
    """The label cache is keyed on the json's bytes: an annotation removed after a first val is gone in the next."""
    root = tmp_path / "copy"
    shutil.copytree(coco_root, root)
    settings = dict(data=str(root), imgsz=IMGSZ, batch=2, project=str(tmp_path), plots=False, save_json=False)
    before = DEIM(trained / "weights" / "best.pt").val(name="before", **settings).nt_per_class.sum()
    assert (root / "annotations" / "instances_val.cache").is_file()
    edit_json(root / "annotations" / "instances_val.json", lambda c: c["annotations"].pop())
    after = DEIM(trained / "weights" / "best.pt").val(name="after", **settings).nt_per_class.sum()
    assert after == before - 1


def pycocotools_ap(truth: Path, predictions: Path) -> float:
    """COCO AP50-95 by pycocotools itself, from the json files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(truth))
    evaluation = COCOeval(gt, gt.loadRes(str(predictions)), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0])


def test_crowd_boxes_are_crowd_regions_for_coco_and_no_targets(trained, coco_root, tmp_path):
    """A crowd box (iscrowd=1) over a whole val image is no Ultralytics target, and COCO's AP is pycocotools' on the
    json as written: detections inside the crowd region are ignored, which scores otherwise than without it."""
    root = tmp_path / "crowd"
    shutil.copytree(coco_root, root)
    truth = root / "annotations" / "instances_val.json"
    best = trained / "weights" / "best.pt"
    plain = DEIM(best).val(data=str(root), imgsz=IMGSZ, project=str(tmp_path), name="val_plain")
    crowd_box = dict(id=9999, image_id=1, category_id=CATEGORY_IDS[0], bbox=[0, 0, IMGSZ, IMGSZ], area=IMGSZ**2)
    edit_json(truth, lambda c: c["annotations"].append({**crowd_box, "iscrowd": 1}))
    crowd = DEIM(best).val(data=str(root), imgsz=IMGSZ, project=str(tmp_path), name="val_crowd")
    assert crowd.nt_per_class.sum() == plain.nt_per_class.sum()
    predictions = tmp_path / "val_crowd" / "predictions.json"
    assert crowd.coco["AP"] == pytest.approx(pycocotools_ap(truth, predictions), abs=1e-9)
    assert crowd.coco["AP"] != pytest.approx(plain.coco["AP"], abs=1e-6)  # the region changed COCO's score


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory) -> tuple[str, object]:
    """One training run on a COCO folder holding one of each bad entry; returns its log and trainer."""
    tmp = tmp_path_factory.mktemp("coco_bad")
    data = make_synthetic_dataset(tmp / "data", n_train=8, n_val=2, imgsz=64, nc=2, max_objects=3, seed=1)
    root = as_coco(data)
    images = sorted((root / "images" / "train").glob("*.png"))
    images[1].write_bytes(b"not an image")  # unreadable
    cv2.imwrite(str(images[2]), (cv2.imread(str(images[2])).astype(np.uint16) * 257))  # 16-bit, as satellite tiles

    def edit(content):
        content["categories"] += [dict(id=7, name="5"), dict(id=8, name=NAMES[0])]  # numeric, duplicate
        ann, first = content["annotations"], content["annotations"][0]
        ann += [
            {**first, "id": 1001, "category_id": 999},  # category not listed
            {k: v for k, v in first.items() if k != "bbox"} | {"id": 1002},  # no bbox
            {**first, "id": 1003, "bbox": [5, 5, -4, 10]},  # negative width
            {**first, "id": 1004, "iscrowd": 1},  # crowd: no training target
        ]
        content["annotations"] = [a for a in ann if a["image_id"] != 5]  # image 5 (000004.png): a background
        content["images"] += [
            {**content["images"][3], "file_name": "elsewhere.png"},  # repeats image id 4
            dict(id=500, file_name="missing.png", width=64, height=64),  # file missing
            dict(id=501, file_name=content["images"][5]["file_name"]),  # repeats a file name
            dict(id=[9], file_name="listed_id.png"),  # an id that is no integer or string
        ]
        content["images"][6].update(width=128, height=96)  # not the file's 64x64

    edit_json(root / "annotations" / "instances_train.json", edit)
    edit_json(
        root / "annotations" / "instances_val.json",
        lambda c: c["categories"].extend([dict(id=7, name="5"), dict(id=8, name=NAMES[0])]),
    )
    model = DEIM("deim-n.yaml")
    handler = logging.StreamHandler(stream := io.StringIO())
    logging.getLogger("ultralytics").addHandler(handler)
    try:
        model.train(data=str(root), epochs=1, imgsz=64, batch=4, workers=0, val=False, plots=False,
                    project=str(tmp), name="run", pretrained=False)  # fmt: skip
    finally:
        logging.getLogger("ultralytics").removeHandler(handler)
    return stream.getvalue(), model.trainer


@pytest.mark.parametrize(
    "message",
    [
        "1 categories with a numeric name (kept as the class name; it is not the class index): id 7 '5'",
        "1 categories repeating an earlier name (renamed <name>_<id>): id 8 'red box'",
        "1 annotations of a category id not in categories, skipped: id 1001 (image 1), category 999",
        "2 annotations whose bbox is missing, not 4 numbers, or of negative size, skipped: id 1002 (image 1), id 1003",
        "1 images repeating an earlier image id, skipped (their annotations go to the first): id 4 'elsewhere.png'",
        "1 images repeating an earlier file_name, skipped: id 501 '000005.png'",
        "1 images whose id is neither an integer nor a string, skipped: images[11] (id [9]) 'listed_id.png'",
        "missing.png: ignoring corrupt image/label: image id 500 of",
        "000001.png: ignoring corrupt image/label: image id 2 of",
        "1 16-bit image(s) scaled to 8 bits per channel",
        "000006.png: ignoring corrupt image/label: image id 7 of",
        "gives 128x96, the file is 64x64, so its boxes may not fit the pixels",
    ],
)
def test_each_bad_entry_is_named_and_the_rest_trains(bad_run, message):
    log, _ = bad_run
    assert message in log


def test_bad_entries_leave_the_right_targets(bad_run):
    """Classes follow the json's categories (4, two of them renamed); the crowd box and the skipped annotations are no
    targets; the unreadable and missing images and the one of the wrong size are left out; the image without
    annotations is a background."""
    _, trainer = bad_run
    assert trainer.data["names"] == {0: NAMES[0], 1: NAMES[1], 2: "5", 3: f"{NAMES[0]}_8"}
    assert trainer.data["category_ids"] == [*CATEGORY_IDS, 7, 8]
    labels = {Path(lb["im_file"]).name: lb for lb in trainer.train_loader.dataset.labels}
    assert "000001.png" not in labels and "missing.png" not in labels and "000006.png" not in labels
    assert len(labels) == 6
    truth = json.loads((Path(trainer.args.data) / "annotations" / "instances_train.json").read_text())
    first_image_boxes = [a for a in truth["annotations"] if a["image_id"] == 1 and a["id"] < 1000]
    assert len(labels["000000.png"]["cls"]) == len(first_image_boxes)  # none of 1001-1004 became a target
    assert len(labels["000004.png"]["cls"]) == 0
    assert torch.load(trainer.last, weights_only=False)["model"].category_ids == [*CATEGORY_IDS, 7, 8]
