"""Stock Ultralytics on a DEIM checkpoint: `YOLO(...)`, `yolo val` and `yolo predict` give DEIM's numbers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ultralytics import YOLO

from deim_ultra import DEIM

from helpers import EASY_IMGSZ, run_safe_loaded


def yolo_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run Ultralytics' own `yolo` command (the console script beside this Python)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(Path(sys.executable).with_name("yolo")), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def all_row(output: str) -> list[float]:
    """The numbers of the 'all' row of Ultralytics' validation table: images, instances, P, R, mAP50, mAP50-95."""
    row = next(line for line in output.splitlines() if line.split()[:1] == ["all"])
    return [float(v) for v in row.split()[1:]]


def test_yolo_class_routes_a_deim_checkpoint_to_the_rtdetr_pipeline(easy_trained, easy_data, tmp_path):
    settings = dict(data=str(easy_data), imgsz=EASY_IMGSZ, batch=2, plots=False, project=str(tmp_path))
    deim = DEIM(easy_trained).val(name="deim", **settings).box
    stock = YOLO(easy_trained)
    assert type(stock).__name__ == "RTDETR"
    theirs = stock.val(name="yolo", **settings).box
    assert deim.map50 > 0
    assert abs(theirs.map - deim.map) <= 0.001 and abs(theirs.map50 - deim.map50) <= 0.001
    image = sorted((easy_data.parent / "images" / "val").glob("*.png"))[0]
    ours = DEIM(easy_trained).predict(image, imgsz=EASY_IMGSZ, conf=0.001, verbose=False)[0].boxes
    stock_boxes = YOLO(easy_trained).predict(image, imgsz=EASY_IMGSZ, conf=0.001, verbose=False)[0].boxes
    assert len(ours) > 0 and torch.equal(ours.data, stock_boxes.data)


def test_yolo_val_command_prints_the_deim_map(easy_trained, easy_data, tmp_path):
    deim = DEIM(easy_trained).val(data=str(easy_data), imgsz=EASY_IMGSZ, batch=2, plots=False, project=str(tmp_path))
    result = yolo_cli(
        "val", f"model={easy_trained}", f"data={easy_data}", f"imgsz={EASY_IMGSZ}", "batch=2", "plots=False",
        f"project={tmp_path}", "name=yolo", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    *_, map50, map50_95 = all_row(result.stdout + result.stderr)
    # Ultralytics prints 3 significant digits
    assert f"{map50_95:.3g}" == f"{deim.box.map:.3g}" and f"{map50:.3g}" == f"{deim.box.map50:.3g}"
    assert deim.box.map50 > 0


def test_predict_visualize_saves_class_activation_maps(easy_trained, easy_data, tmp_path):
    """Ultralytics' `visualize=True` (LayerCAM over the head's inputs) reads RT-DETR's per-layer logits."""
    image = sorted((easy_data.parent / "images" / "val").glob("*.png"))[0]
    DEIM(easy_trained).predict(image, imgsz=EASY_IMGSZ, visualize=True, project=str(tmp_path), name="vis")
    assert list((tmp_path / "vis").rglob("*.png")) or list((tmp_path / "vis").rglob("*.jpg"))


def test_ultralytics_safe_load_accepts_deim_checkpoints(easy_trained, easy_data, tmp_path):
    """ULTRALYTICS_SAFE_LOAD=1 (torch weights_only unpickling with an allow-list) loads a DEIM checkpoint, which then
    predicts what an ordinary load predicts."""
    image = sorted((easy_data.parent / "images" / "val").glob("*.png"))[0]
    script = (
        "import sys, torch; from deim_ultra import DEIM; "
        f"r = DEIM(r'{easy_trained}').predict(r'{image}', imgsz={EASY_IMGSZ}, conf=0.001, verbose=False)[0]; "
        f"torch.save(r.boxes.data, r'{tmp_path / 'boxes.pt'}')"
    )
    run_safe_loaded(script)
    ours = DEIM(easy_trained).predict(image, imgsz=EASY_IMGSZ, conf=0.001, verbose=False)[0].boxes.data
    assert len(ours) > 0 and torch.equal(torch.load(tmp_path / "boxes.pt"), ours)


def test_solutions_run_a_deim_checkpoint(easy_trained, easy_data, tmp_path):
    """Ultralytics Solutions load models through `YOLO()`: a DEIM checkpoint gets the RT-DETR pipeline and its boxes
    are tracked and counted (shapely and lap, which Solutions install at run time otherwise, are dependencies)."""
    import cv2
    from ultralytics import solutions

    tracker = tmp_path / "low_thresholds.yaml"  # the easy model scores low: let its boxes start tracks
    tracker.write_text(
        "tracker_type: bytetrack\ntrack_high_thresh: 0.01\ntrack_low_thresh: 0.001\nnew_track_thresh: 0.01\n"
        "track_buffer: 30\nmatch_thresh: 0.8\nfuse_score: true\n"
    )
    frame = cv2.imread(str(sorted((easy_data.parent / "images" / "val").glob("*.png"))[0]))
    counter = solutions.ObjectCounter(
        model=str(easy_trained), region=[(0, 48), (96, 48)], imgsz=EASY_IMGSZ, conf=0.01, tracker=str(tracker),
        show=False, verbose=False,
    )  # fmt: skip
    assert type(counter.model).__name__ == "RTDETR"
    assert counter(frame).total_tracks > 0


def test_stock_export_decodes_as_rtdetr(easy_trained, easy_data, tmp_path):
    """An ONNX written by Ultralytics' own exporter (`YOLO(<DEIM .pt>).export()`) names the RT-DETR head in its
    metadata, so stock Ultralytics validates it to the checkpoint's mAP."""
    weights = tmp_path / "best.pt"
    weights.write_bytes(easy_trained.read_bytes())
    exported = YOLO(weights).export(format="onnx", imgsz=EASY_IMGSZ)
    settings = dict(data=str(easy_data), imgsz=EASY_IMGSZ, batch=1, plots=False, project=str(tmp_path))
    ours = DEIM(easy_trained).val(name="pt", **settings).box
    theirs = YOLO(exported).val(name="onnx", **settings).box
    assert type(YOLO(exported)).__name__ == "RTDETR"
    assert ours.map50 > 0 and abs(theirs.map - ours.map) <= 0.001 and abs(theirs.map50 - ours.map50) <= 0.001


def test_deim_takes_the_task_argument_of_ultralytics_models(easy_trained):
    """Code written for `YOLO(weights, task="detect")` (Ultralytics' own tests, `test_grayscale`) runs with DEIM."""
    assert DEIM(easy_trained, task="detect").task == "detect"
    with pytest.raises(ValueError, match="task='segment': DEIM models detect"):
        DEIM(easy_trained, task="segment")
