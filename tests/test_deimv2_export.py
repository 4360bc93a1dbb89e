"""DEIMv2 exports: one dynamic-batch ONNX graph per size family equal to PyTorch, the GridSample-free variant, and
OpenVINO. Weights are the authors' parity-fixture states (deimv2_{atto,s}_parity.pt): the LiteEncoder with a shared
box head, and the ViT with its adapter (normalising inside the graph), hybrid encoder and gated decoder."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from deim_ultra import DEIM, convert_official

from fixture_weights import fixture_state
from helpers import run_safe_loaded

FIXTURES = Path(__file__).parent / "fixtures"
IMGSZ = 320


def matched_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest box/score difference of two (Q, 6) detection sets after pairing detections of the same class."""
    cost = np.abs(a[:, None, :5] - b[None, :, :5]).max(-1) + 1e3 * (a[:, None, 5] != b[None, :, 5])
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


# Atto (LiteEncoder, no gate, shared box head) and S (ViT + adapter, hybrid encoder, gate) cover the DEIMv2 layers
# but N's CSP2 blocks in the `dfine` version, which ran these tests too before they were trimmed for CI time (dynamic
# ONNX against PyTorch: 7e-7) and which benchmarks/latency.py exports to ONNX and OpenVINO.
@pytest.fixture(scope="module", params=("atto", "s"))
def checkpoint(request, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """The size's fixture weights saved as a DEIM checkpoint, and 2 fixture images at IMGSZ (the second mirrored)."""
    fx = torch.load(FIXTURES / f"deimv2_{request.param}_parity.pt", weights_only=True)
    model = convert_official(
        fixture_state(fx["keys"], fx["kinds"], fx["kept"], fx["aliases"]), f"deimv2-{request.param}.yaml"
    )
    path = tmp_path_factory.mktemp(request.param) / f"deimv2-{request.param}.pt"
    model.save(path)
    x = torch.nn.functional.interpolate(fx["images"][:1].float() / 255, size=(IMGSZ, IMGSZ), mode="bilinear")
    return path, torch.cat([x, x.flip(-1)])


def test_dynamic_batch_onnx_matches_pytorch(checkpoint):
    path, x = checkpoint
    onnx_file = DEIM(path).export(format="onnx", imgsz=IMGSZ, dynamic=True)
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    model = DEIM(path).model.float().eval()
    for batch in (x[:1], x):
        with torch.no_grad():
            expected = model(batch)[0].numpy()
        got = session.run(None, {"images": batch.numpy()})[0]
        assert got.shape == expected.shape
        for i in range(len(batch)):
            assert matched_difference(got[i], expected[i]) <= 1e-4
    assert expected[:, :, 4].max() > 0.5  # the fixture weights give confident detections to compare, not noise


def test_gather_sampler_has_no_grid_sample_and_the_same_outputs(checkpoint, tmp_path):
    path, x = checkpoint
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    onnx_file = DEIM(copy).export(format="onnx", imgsz=IMGSZ, sampler="gather")
    ops = Counter(node.op_type for node in onnx.load(onnx_file).graph.node)
    assert ops["GridSample"] == 0
    got = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"]).run(None, {"images": x[:1].numpy()})[0]
    with torch.no_grad():
        expected = DEIM(path).model.float().eval()(x[:1])[0].numpy()
    assert matched_difference(got[0], expected[0]) <= 1e-4


def test_openvino_export_matches_pytorch(checkpoint, tmp_path):
    import openvino as ov

    path, x = checkpoint
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    folder = Path(DEIM(copy).export(format="openvino", imgsz=IMGSZ))
    # float32 execution: the CPU plugin's default on CPUs with AVX512-BF16 is bfloat16 (see test_export.py)
    compiled = ov.Core().compile_model(next(folder.glob("*.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x[:1].numpy())[0]
    with torch.no_grad():
        expected = DEIM(path).model.float().eval()(x[:1])[0].numpy()
    assert matched_difference(got[0], expected[0]) <= 1e-4


def test_stock_ultralytics_reads_the_checkpoint_and_its_export_as_rtdetr(checkpoint, tmp_path):
    """`YOLO(<DEIMv2 .pt>)` and `YOLO(<its ONNX>)` take the RT-DETR pipeline (they know heads by class name), so their
    boxes are DEIM's own, in pixels; with YOLO's pipeline they would be misread as normalised centres."""
    from ultralytics import YOLO

    path, x = checkpoint
    image = (x[0].permute(1, 2, 0).numpy()[..., ::-1] * 255).astype(np.uint8)  # BGR, as Ultralytics reads files
    settings = dict(imgsz=IMGSZ, conf=0.25, verbose=False)
    ours = DEIM(path).predict(image, **settings)[0].boxes
    stock = YOLO(path)
    assert type(stock).__name__ == "RTDETR"
    assert len(ours) > 0 and torch.allclose(stock.predict(image, **settings)[0].boxes.data, ours.data, atol=1e-4)
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    exported = YOLO(copy).export(format="onnx", imgsz=IMGSZ)
    assert type(YOLO(exported)).__name__ == "RTDETR"
    theirs = YOLO(exported).predict(image, **settings)[0].boxes
    assert len(theirs) == len(ours) and (theirs.xyxy - ours.xyxy).abs().max() <= 0.05  # pixels, float32 graph


def test_ultralytics_safe_load_accepts_deimv2_checkpoints(checkpoint, tmp_path):
    """ULTRALYTICS_SAFE_LOAD=1 (weights-only unpickling with an allow-list) loads DEIMv2's layers too."""
    path, x = checkpoint
    torch.save(x[:1], tmp_path / "x.pt")
    script = (
        "import torch; from deim_ultra import DEIM; "
        f"m = DEIM(r'{path}').model.float().eval(); "
        f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}'))[0], r'{tmp_path / 'y.pt'}')"
    )
    run_safe_loaded(script)
    with torch.no_grad():
        expected = DEIM(path).model.float().eval()(x[:1])[0]
    got = torch.load(tmp_path / "y.pt").detach().numpy()
    assert matched_difference(got[0], expected[0].numpy()) <= 1e-5  # another process: near ties may reorder
