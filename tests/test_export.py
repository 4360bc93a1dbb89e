"""ONNX export: one dynamic-batch graph equal to PyTorch, the same mAP, float16-safe constants, a GridSample-free
variant with the same numbers."""

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from scipy.optimize import linear_sum_assignment

from deim_ultra import DEIM

from helpers import EASY_IMGSZ as IMGSZ


@pytest.fixture(scope="module")
def exports(easy_trained, tmp_path_factory) -> dict[str, Path]:
    """Dynamic-batch exports of `easy_trained`, with the default sampler and with `sampler="gather"`."""
    out = {}
    for sampler in ("grid_sample", "gather"):
        folder = tmp_path_factory.mktemp(sampler)
        weights = folder / "best.pt"
        weights.write_bytes(easy_trained.read_bytes())
        out[sampler] = Path(DEIM(weights).export(format="onnx", imgsz=IMGSZ, dynamic=True, sampler=sampler))
    return out


def images(easy_data: Path, n: int) -> np.ndarray:
    """(n, 3, IMGSZ, IMGSZ) float32 RGB val images in [0, 1] (the set's images are IMGSZ square already)."""
    files = sorted((easy_data.parent / "images" / "val").glob("*.png"))[:n]
    return np.stack([cv2.imread(str(f))[..., ::-1].transpose(2, 0, 1) / 255 for f in files]).astype(np.float32)


def matched_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference of box and score between two (Q, 6) [cx, cy, w, h, score, class] sets, after pairing each
    detection with one of the other set of the same class (optimal assignment on the largest coordinate gap)."""
    cost = np.abs(a[:, None, :5] - b[None, :, :5]).max(-1) + 1e3 * (a[:, None, 5] != b[None, :, 5])
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


def test_one_dynamic_batch_export_matches_pytorch_for_batch_1_and_3(easy_trained, exports, easy_data):
    session = ort.InferenceSession(str(exports["grid_sample"]), providers=["CPUExecutionProvider"])
    model = DEIM(easy_trained).model.float().eval()
    for n in (1, 3):
        x = images(easy_data, n)
        onnx_out = session.run(None, {"images": x})[0]
        with torch.no_grad():
            torch_out = model(torch.from_numpy(x))[0].numpy()
        assert onnx_out.shape == torch_out.shape and onnx_out.shape[0] == n
        for i in range(n):
            assert matched_difference(onnx_out[i], torch_out[i]) <= 1e-4
    larger = np.ascontiguousarray(np.repeat(np.repeat(images(easy_data, 1), 2, 2), 2, 3))  # another input size
    with torch.no_grad():
        torch_out = model(torch.from_numpy(larger))[0].numpy()
    onnx_out = session.run(None, {"images": larger})[0]
    assert onnx_out.shape == torch_out.shape and matched_difference(onnx_out[0], torch_out[0]) <= 1e-4


def test_half_precision_forward_stays_finite_and_close(easy_trained, easy_data):
    """What a float16 engine computes: the model in float16 gives finite outputs within float16 tolerance of float32.

    (Ultralytics exports `half=True` ONNX / TensorRT on a GPU only; this runs the same arithmetic in PyTorch on CPU.)
    """
    model = DEIM(easy_trained).model.float().eval()
    x = torch.from_numpy(images(easy_data, 2))
    with torch.no_grad():
        full = model(x)[0].numpy()
        half = model.half()(x.half())[0].float().numpy()
    assert np.isfinite(half).all()
    for i in range(2):
        assert matched_difference(half[i], full[i]) <= 1e-2


def test_onnx_validates_to_the_pytorch_map(easy_trained, exports, easy_data, tmp_path):
    settings = dict(data=str(easy_data), imgsz=IMGSZ, batch=2, project=str(tmp_path), plots=False)
    pytorch = DEIM(easy_trained).val(name="pt", **settings).box
    exported = DEIM(exports["grid_sample"]).val(name="onnx", **settings).box
    assert pytorch.map50 > 0
    assert abs(exported.map - pytorch.map) <= 0.001 and abs(exported.map50 - pytorch.map50) <= 0.001


def test_exported_constants_fit_float16(exports):
    """No +inf anchor masking (the authors' export has one) and no constant beyond float16's range; opset >= 17."""
    for path in exports.values():
        assert onnx.load(str(path)).opset_import[0].version >= 17
        for tensor in onnx.load(str(path)).graph.initializer:
            value = numpy_helper.to_array(tensor)
            if value.dtype.kind == "f" and value.size:
                assert np.isfinite(value).all() and np.abs(value).max() <= 65504, tensor.name


def test_gather_sampler_has_no_grid_sample_and_the_same_outputs(exports, easy_data):
    ops = {k: Counter(n.op_type for n in onnx.load(str(p)).graph.node) for k, p in exports.items()}
    assert ops["grid_sample"]["GridSample"] > 0 and ops["gather"]["GridSample"] == 0
    x = images(easy_data, 2)
    out = {
        k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
        for k, p in exports.items()
    }
    for i in range(2):
        assert matched_difference(out["gather"][i], out["grid_sample"][i]) <= 1e-5


def test_sampling_points_need_no_broadcast_over_coordinate_pairs(exports):
    """The cross-attention builds its sampling points without an elementwise op broadcasting over trailing (x, y)
    pairs: ONNX Runtime's CPU kernels take ~0.3 ms for each such op at 300 queries, three per decoder layer, 5% of
    DEIM-N's latency (docs/benchmarks.md)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(exports["grid_sample"])))
    shapes = {v.name: [d.dim_value or -1 for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    elementwise = [n for n in model.graph.node if "cross_attn" in n.name and n.op_type in {"Add", "Sub", "Mul", "Div"}]
    assert len(elementwise) >= 3  # the points' arithmetic and the weighting of the samples, per layer
    for node in elementwise:
        a, b = (shapes[i] for i in node.input)  # KeyError: a shape inference could not follow
        scalar = min(np.prod(a), np.prod(b)) == 1
        assert a == b or scalar or 2 not in (a[-1], b[-1]), f"{node.name}: {a} with {b}"


def test_openvino_export_matches_pytorch(easy_trained, easy_data, tmp_path):
    """Ultralytics' OpenVINO export of a DEIM model: the IR run at float32 equals PyTorch; `DEIM(folder)` predicts.

    OpenVINO's CPU plugin runs at bfloat16 by default on CPUs with AVX512-BF16 (this one): Ultralytics' AutoBackend
    keeps that default, so its outputs are compared to PyTorch's at bfloat16 tolerance only.
    """
    import openvino as ov

    weights = tmp_path / "best.pt"
    weights.write_bytes(easy_trained.read_bytes())
    folder = Path(DEIM(weights).export(format="openvino", imgsz=IMGSZ))
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(next(folder.glob("*.xml"))), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    model = DEIM(easy_trained).model.float().eval()
    x = images(easy_data, 1)
    with torch.no_grad():
        reference = model(torch.from_numpy(x))[0].numpy()
    assert matched_difference(compiled(x)[0][0], reference[0]) <= 1e-4
    image = str(sorted((easy_data.parent / "images" / "val").glob("*.png"))[0])
    ours = DEIM(easy_trained).predict(image, imgsz=IMGSZ, conf=0.0, max_det=5, verbose=False)[0].boxes
    theirs = DEIM(folder).predict(image, imgsz=IMGSZ, conf=0.0, max_det=5, verbose=False)[0].boxes
    assert len(theirs) == 5 and np.abs(theirs.conf.numpy() - ours.conf.numpy()).max() <= 0.05


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_export_calibrates_on_the_training_data_and_scores_like_float(fmt, easy_trained, easy_data, tmp_path):
    """`quantize=8` without `data`: calibrated on the data the checkpoint trained on (Ultralytics would fetch COCO8,
    offline here), quantized for real, and scoring like the float model (ONNX Runtime's static quantization of the
    matmuls and convs; OpenVINO's NNCF with the sigmoids in float). Accuracy on a trained model: docs/benchmarks.md."""
    weights = tmp_path / "best.pt"
    weights.write_bytes(easy_trained.read_bytes())
    exported = Path(DEIM(weights).export(format=fmt, quantize=8, imgsz=IMGSZ))
    assert "int8" in exported.name
    if fmt == "onnx":
        assert Counter(n.op_type for n in onnx.load(str(exported)).graph.node)["QuantizeLinear"] > 0
    else:
        assert "FakeQuantize" in (next(exported.glob("*.xml"))).read_text()
    image = str(sorted((easy_data.parent / "images" / "val").glob("*.png"))[0])
    settings = dict(imgsz=IMGSZ, conf=0.0, max_det=5, verbose=False)
    full, quantized = (DEIM(m).predict(image, **settings)[0].boxes for m in (weights, exported))
    assert len(quantized) == 5 and np.abs(quantized.conf.numpy() - full.conf.numpy()).max() <= 0.1


def test_int8_export_without_data_or_training_data_is_refused(tmp_path):
    weights = tmp_path / "untrained.pt"
    DEIM("deim-n.yaml").save(weights)
    with pytest.raises(ValueError, match=r"data=<your data.yaml>"):
        DEIM(weights).export(format="onnx", int8=True, imgsz=IMGSZ)


def test_int8_export_calibrates_on_a_shipped_dataset_by_name(easy_trained, tmp_path):
    """`data=shapes.yaml` names a dataset that ships with the package, as `train` and `val` take it."""
    weights = tmp_path / "best.pt"
    weights.write_bytes(easy_trained.read_bytes())
    exported = Path(DEIM(weights).export(format="onnx", quantize=8, data="shapes.yaml", imgsz=IMGSZ))
    assert exported.name == "best_int8.onnx"
    assert Counter(n.op_type for n in onnx.load(str(exported)).graph.node)["QuantizeLinear"] > 0
