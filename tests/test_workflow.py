"""End to end: the `deim` CLI and the DEIM class train, validate, predict and export like Ultralytics models."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import deim_cli

IMGSZ = 160


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """Train DEIM-N for 2 epochs through the CLI; return the run directory."""
    work = tmp_path_factory.mktemp("cli")
    args = f"model=deim-n.yaml data={tiny_data} epochs=2 imgsz={IMGSZ} batch=4 workers=0 project={work} name=run"
    result = deim_cli("train", *args.split(), cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "run"


def val_image(tiny_data: Path) -> Path:
    return sorted((tiny_data.parent / "images" / "val").glob("*.png"))[0]


def test_train_writes_checkpoints_and_results(trained):
    assert (trained / "weights" / "best.pt").is_file()
    assert (trained / "weights" / "last.pt").is_file()
    header, *rows = (trained / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 2
    for column in ("train/mal", "train/bbox", "train/giou", "train/fgl", "train/ddf", "metrics/mAP50-95(B)"):
        assert column in header, header


def test_cli_val_evaluates_every_label(trained, tiny_data, tmp_path):
    result = deim_cli(
        "val",
        f"model={trained / 'weights' / 'best.pt'}",
        f"data={tiny_data}",
        f"imgsz={IMGSZ}",
        "batch=2",
        f"project={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    labels = sum(len(p.read_text().splitlines()) for p in (tiny_data.parent / "labels" / "val").glob("*.txt"))
    summary = next(line for line in (result.stdout + result.stderr).splitlines() if line.split()[:1] == ["all"])
    assert int(summary.split()[2]) == labels  # images, then instances


def test_cli_predict_writes_normalised_boxes(trained, tiny_data, tmp_path):
    result = deim_cli(
        "predict",
        f"model={trained / 'weights' / 'best.pt'}",
        f"source={val_image(tiny_data)}",
        f"imgsz={IMGSZ}",
        "conf=0.0",
        "save_txt=True",
        "save_conf=True",
        f"project={tmp_path}",
        "name=pred",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = np.loadtxt(next((tmp_path / "pred" / "labels").glob("*.txt")), ndmin=2)
    assert rows.shape[1] == 6  # class, x, y, w, h, conf
    assert ((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1)).all()
    assert set(rows[:, 0].astype(int)) <= {0, 1, 2}


def detections(results) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = results[0].boxes
    return boxes.xyxy.cpu().numpy(), boxes.conf.cpu().numpy(), boxes.cls.cpu().numpy()


def assert_same_detections(a, b, px: float = 1.0, score: float = 1e-3):
    """Every detection of `a` has one in `b` with the same class, box within `px` and score within `score`."""
    (boxes_a, conf_a, cls_a), (boxes_b, conf_b, cls_b) = a, b
    assert 0 < len(boxes_a) <= len(boxes_b)
    for box, conf, cls in zip(boxes_a, conf_a, cls_a):
        close = (np.abs(boxes_b - box).max(1) <= px) & (np.abs(conf_b - conf) <= score) & (cls_b == cls)
        assert close.any(), (box, conf, cls)


def test_onnx_export_matches_pytorch_and_stock_ultralytics(trained, tiny_data, tmp_path):
    from ultralytics import RTDETR, YOLO

    from deim_ultra import DEIM

    best = trained / "weights" / "best.pt"
    onnx = Path(DEIM(best).export(format="onnx", imgsz=IMGSZ))
    assert onnx.suffix == ".onnx" and onnx.is_file()
    image = str(val_image(tiny_data))
    # A briefly trained model scores low: take the top detections, and look each up among the other's top 2x
    # (near-tied scores may order differently at the cut).
    kwargs = dict(imgsz=IMGSZ, conf=0.0, verbose=False)
    reference = detections(DEIM(best).predict(image, max_det=20, **kwargs))
    assert_same_detections(reference, detections(DEIM(onnx).predict(image, max_det=40, **kwargs)))
    assert_same_detections(reference, detections(RTDETR(onnx).predict(image, max_det=40, **kwargs)))
    stock = YOLO(onnx)  # routes to Ultralytics' RT-DETR pipeline from the export's metadata
    assert isinstance(stock, RTDETR)
    assert_same_detections(reference, detections(stock.predict(image, max_det=40, **kwargs)))


def test_resuming_a_finished_run_is_refused(trained, tiny_data):
    from deim_ultra import DEIM

    with pytest.raises(ValueError, match="holds no optimizer state .* nothing to resume"):
        DEIM(trained / "weights" / "last.pt").train(resume=True)  # Ultralytics alone starts a new run on coco8
    result = deim_cli("train", "resume=True", f"model={trained / 'weights' / 'last.pt'}", cwd=trained)
    assert result.returncode == 1 and "nothing to resume" in result.stdout + result.stderr
    result = deim_cli("train", f"resume={trained / 'weights' / 'last.pt'}", cwd=trained)  # the path form
    assert result.returncode == 1 and "nothing to resume" in result.stdout + result.stderr
    result = deim_cli("train", "resume=True", cwd=trained)  # no checkpoint at all: `yolo train resume` habits
    assert result.returncode == 1 and "this model was built from a YAML" in result.stdout + result.stderr


def test_a_run_from_an_args_yaml_leaves_that_run_alone(trained, tiny_data, tmp_path):
    from deim_ultra import DEIM

    before = {p.name: p.read_bytes() for p in (trained / "weights").glob("*.pt")}
    DEIM("deim-n.yaml").train(cfg=str(trained / "args.yaml"), epochs=1, imgsz=64, project=str(tmp_path), name="new")
    assert (tmp_path / "new" / "weights" / "last.pt").is_file()  # the args.yaml's own save_dir is not reused
    assert {p.name: p.read_bytes() for p in (trained / "weights").glob("*.pt")} == before


def test_a_run_from_an_args_yaml_takes_its_recipe_and_does_not_resume(trained, tiny_data, tmp_path):
    from ultralytics.utils import YAML

    from deim_ultra import DEIM

    args = YAML.load(trained / "args.yaml")  # a recipe-none run that was itself resumed once
    YAML.save(tmp_path / "args.yaml", {**args, "recipe": "none", "resume": str(trained / "weights" / "last.pt")})
    DEIM("deim-n.yaml").train(cfg=str(tmp_path / "args.yaml"), epochs=1, imgsz=64, project=str(tmp_path), name="new")
    new = YAML.load(tmp_path / "new" / "args.yaml")
    assert new["recipe"] == "none" and not new["resume"]  # not deim-n.yaml's recipe n, not a resume of that last.pt


def test_checkpoint_reloads_in_fresh_process(trained, tiny_data):
    from deim_ultra import DEIM

    best = trained / "weights" / "best.pt"
    image = val_image(tiny_data)
    code = (
        "import sys, numpy as np; from deim_ultra import DEIM; "
        f"b = DEIM(r'{best}').predict(r'{image}', imgsz={IMGSZ}, conf=0.0, max_det=20, verbose=False)[0].boxes; "
        "np.save(sys.argv[1], np.concatenate([b.xyxy.numpy(), b.conf.numpy()[:, None], b.cls.numpy()[:, None]], 1))"
    )
    out = trained / "fresh.npy"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True, timeout=300)
    fresh = np.load(out)
    here = detections(DEIM(best).predict(str(image), imgsz=IMGSZ, conf=0.0, max_det=20, verbose=False))
    assert_same_detections(here, (fresh[:, :4], fresh[:, 4], fresh[:, 5]), px=1e-3, score=1e-5)


def test_unknown_key_fails_with_hint(tiny_data, tmp_path):
    result = deim_cli("train", "model=deim-n.yaml", f"data={tiny_data}", "epochz=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "'epochz' is not a valid" in result.stdout + result.stderr
    assert "epochs" in result.stdout + result.stderr
    assert "Arguments received" not in result.stdout + result.stderr  # no `yolo` help before the hint
    assert "See `deim help`" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "mode, pair, message",
    [
        ("predict", "sampler=gather", "'sampler' is a DEIM export setting: `deim predict` does not use it"),
        ("val", "cls_loss=vfl", "'cls_loss' is a DEIM train setting: `deim val` does not use it"),
        ("train", "sampler=gather", "'sampler' is a DEIM export setting: `deim train` does not use it"),
    ],
)
def test_deim_setting_of_another_mode_is_refused_in_one_line(mode, pair, message, tmp_path):
    result = deim_cli(mode, "model=deim-n.yaml", pair, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_val_folder_is_one_line_naming_it(tiny_data, tmp_path):
    data = tmp_path / "data.yaml"
    data.write_text(tiny_data.read_text().replace("val: images/val", "val: images/nothere"))
    result = deim_cli("train", "model=deim-n.yaml", f"data={data}", "epochs=1", "imgsz=64", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "deim train failed: DatasetError" in result.stdout + result.stderr
        and "nothere" in result.stdout + result.stderr
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_deim_keys_are_accepted_and_documented(tmp_path):
    from deim_ultra.cli import parse

    mode, overrides = parse(["train", "cls_loss=vfl", "mal_gamma=2.0", "o2m=True"])
    assert (mode, overrides) == ("train", {"cls_loss": "vfl", "mal_gamma": 2.0, "o2m": True})
    result = deim_cli("help", cwd=tmp_path)
    assert result.returncode == 0 and "mal_gamma" in result.stdout and "cls_loss" in result.stdout


def test_missing_dataset_yaml_is_named(tmp_path):
    result = deim_cli("train", "model=deim-n.yaml", "data=no_such_data.yaml", "epochs=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "no_such_data.yaml" in result.stdout + result.stderr


def test_the_settings_file_is_no_model_yaml():
    from deim_ultra import DEIM

    with pytest.raises(FileNotFoundError, match="Model YAML 'default.yaml' not found") as error:
        DEIM("default.yaml")
    assert "deim-n.yaml" in str(error.value) and "default.yaml," not in str(error.value)


def test_missing_model_yaml_is_named(tmp_path):
    from deim_ultra import DEIM

    with pytest.raises(FileNotFoundError, match="deim-q.yaml"):
        DEIM("deim-q.yaml")
    result = deim_cli("val", "model=deim-q.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "deim-q.yaml" in result.stdout + result.stderr


def test_foreign_checkpoint_is_refused(tmp_path):
    from ultralytics import YOLO

    from deim_ultra import DEIM

    yolo = tmp_path / "yolo.pt"
    YOLO("yolov8n.yaml").save(yolo)
    with pytest.raises(TypeError, match="not a DEIM model"):
        DEIM(yolo)
    with pytest.raises(FileNotFoundError, match="official.pth' not found"):
        DEIM(tmp_path / "official.pth")


def test_shipped_yamls_build_by_bare_name():
    from deim_ultra.nn.tasks import DEIMDetectionModel

    model = DEIMDetectionModel("deim-n.yaml", nc=3, verbose=False).eval()
    with torch.no_grad():
        y, _ = model(torch.zeros(1, 3, IMGSZ, IMGSZ))
    assert y.shape == (1, 300, 6)


def test_resuming_a_finished_run_through_the_trainer_says_there_is_nothing_to_resume(trained):
    """Ultralytics' final strip drops the optimizer and the DEIM settings from last.pt: the trainer says so instead of
    failing on the missing settings (KeyError 'auto')."""
    from deim_ultra.train import DEIMTrainer

    with pytest.raises(ValueError, match="holds no optimizer state .* nothing to resume"):
        DEIMTrainer(overrides={"resume": str(trained / "weights" / "last.pt")}).train()


def test_cli_reads_arguments_as_yolo_does(trained, tiny_data, tmp_path):
    """The task word after the mode, `--key=value`, a trailing comma and bare flags (`save_txt`, `save_conf`)."""
    result = deim_cli(
        "predict", "detect", f"model={trained / 'weights' / 'best.pt'}", f"--source={val_image(tiny_data)}",
        f"imgsz={IMGSZ},", "conf=0.0", "save_txt", "save_conf", f"project={tmp_path}", "name=p", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / "p" / "labels" / f"{val_image(tiny_data).stem}.txt").read_text().splitlines()
    assert rows and all(len(row.split()) == 6 for row in rows)  # class, box and the confidence save_conf adds
    assert (tmp_path / "p" / f"{val_image(tiny_data).stem}.jpg").is_file()  # the annotated image, saved by default


def test_cli_takes_the_mode_and_task_word_in_either_order():
    from deim_ultra.cli import parse

    expected = ("train", {"model": "deim-n.yaml", "save": True})
    assert parse(["detect", "train", "model=deim-n.yaml", "save"]) == expected
    assert parse(["train", "detect", "model=deim-n.yaml", "save"]) == expected
    assert parse(["model=deim-n.yaml", "train", "save"]) == expected
    with pytest.raises(SyntaxError, match="task 'segment': DEIM models detect"):
        parse(["train", "segment", "model=deim-n.yaml"])


def test_cli_runs_ultralytics_special_commands(tmp_path):
    import ultralytics

    import deim_ultra

    result = deim_cli("version", cwd=tmp_path)
    expected = f"deim-ultra {deim_ultra.__version__}, ultralytics {ultralytics.__version__}"
    assert result.returncode == 0 and expected in result.stdout
    result = deim_cli("settings", cwd=tmp_path)  # Ultralytics' own command, run by its entrypoint
    assert result.returncode == 0 and "settings_version" in result.stdout + result.stderr
    result = deim_cli("cfg", cwd=tmp_path)  # Ultralytics' settings, then DEIM's
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "lr0:" in out and "recipe:" in out and "policy_epochs:" in out


def test_cli_tracks_a_video_offline(trained, tiny_data, tmp_path):
    """`deim track` on a short video: the tracker's `lap` dependency comes with the package (Ultralytics would try to
    install it at run time, which fails offline)."""
    import cv2

    video = tmp_path / "clip.mp4"
    frame = cv2.imread(str(val_image(tiny_data)))
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, frame.shape[1::-1])
    for shift in range(6):
        writer.write(np.roll(frame, shift * 2, axis=1))
    writer.release()
    tracker = tmp_path / "low_thresholds.yaml"  # a model trained 2 epochs scores low: let its boxes start tracks
    tracker.write_text(
        "tracker_type: bytetrack\ntrack_high_thresh: 0.01\ntrack_low_thresh: 0.001\nnew_track_thresh: 0.01\n"
        "track_buffer: 30\nmatch_thresh: 0.8\nfuse_score: true\n"
    )
    result = deim_cli(
        "track", f"model={trained / 'weights' / 'best.pt'}", f"source={video}", f"imgsz={IMGSZ}", "conf=0.01",
        f"tracker={tracker}", "save_txt", f"project={tmp_path}", "name=t", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "requirement" not in (result.stdout + result.stderr).lower()  # no run-time install attempted
    # Frame 1 starts a track for every box (a model trained 2 epochs gives later frames too little to match).
    first = (tmp_path / "t" / "labels" / "clip_1.txt").read_text().splitlines()
    assert first and all(len(row.split()) == 6 for row in first)  # class, box and the track id
    assert sorted(int(row.split()[5]) for row in first) == list(range(1, len(first) + 1))
