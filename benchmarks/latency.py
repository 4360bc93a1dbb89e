"""Latency of exported detectors at batch 1, 640 px, measured side by side in one process.

Exports, from YAML with random weights (latency does not depend on weights), through each model's own Ultralytics
exporter: DEIM-N and DEIM-S (ONNX, ONNX with `sampler=gather`, OpenVINO), DEIM-N trained with MS-DETR's mixed
supervision (`deim-n-o2m`: its deploy graph, ONNX and OpenVINO), DEIMv2 Atto, Pico, N and S (ONNX, OpenVINO; all at
the same `--imgsz`, though Atto's and Femto's recipes train at 320 and 416), Ultralytics YOLO11n / YOLO11s, YOLO26n /
YOLO26s and RT-DETR-l (ONNX, and OpenVINO for the n models); with `--authors` also the authors' own DEIM-N deploy
export (built from their code outside this repository, see ../shared/reference/README.md). Then times them
interleaved: `--rounds` rounds, each running every model `--runs` times in turn, so machine noise hits all alike;
prints the median ms per model and runtime and its ratio to our DEIM-N on that runtime. ONNX Runtime and OpenVINO
run on the CPU with `--threads` intra-op threads, OpenVINO at float32 precision (its CPU default is bfloat16 where the
CPU has it).
`--profile` adds ONNX Runtime's per-node profile of our DEIM-N and, if given, the authors' export, grouped by part of
the network. `--backends` picks the runtimes: `torch` times the PyTorch models themselves (fused, as Ultralytics'
predictor runs them), in fp32 and fp16 on a CUDA device, in fp32 on the CPU where there is none; it is in the default
only where CUDA is. Each row's ratio is to our DEIM-N on the same runtime. TensorRT engines are not timed here.

    python benchmarks/latency.py --authors /tmp/authors_export/deim_n_640.onnx --profile
    python benchmarks/latency.py --models deim-n yolo26n --rounds 5
    python benchmarks/latency.py --backends torch --threads 8   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

# name: YAML; "deim" models load with DEIM, the others with Ultralytics' own classes.
MODELS = {
    "deim-n": "deim-n.yaml",
    "deim-s": "deim-s.yaml",
    "deim-n-o2m": "deim-n.yaml",
    "deimv2-atto": "deimv2-atto.yaml",
    "deimv2-pico": "deimv2-pico.yaml",
    "deimv2-n": "deimv2-n.yaml",
    "deimv2-s": "deimv2-s.yaml",
    "yolo11n": "yolo11n.yaml",
    "yolo11s": "yolo11s.yaml",
    "yolo26n": "yolo26n.yaml",
    "yolo26s": "yolo26s.yaml",
    "rtdetr-l": "rtdetr-l.yaml",
}
OPENVINO = {
    "deim-n",
    "deim-s",
    "deim-n-o2m",
    "deimv2-atto",
    "deimv2-pico",
    "deimv2-n",
    "deimv2-s",
    "yolo11n",
    "yolo26n",
}
GATHER = {"deim-n", "deim-s"}
O2M = {"deim-n-o2m"}  # built with `o2m: true` added to the YAML


def model_yaml(name: str, folder: Path) -> str:
    """The YAML model `name` is built from: the shipped one, or for O2M a copy with `o2m: true` written to `folder`."""
    if name not in O2M:
        return MODELS[name]
    from ultralytics.utils import YAML

    from deim_ultra.cfg import resolve_model_yaml

    path = folder / f"{name}.yaml"
    YAML.save(path, {**YAML.load(resolve_model_yaml(MODELS[name])), "o2m": True})
    return str(path)


def export(name: str, fmt: str, out: Path, imgsz: int, **kwargs) -> Path:
    """Export model `name` from its YAML into `out` (a copy of the random-weight model per format)."""
    from ultralytics import RTDETR, YOLO

    from deim_ultra import DEIM

    cls = DEIM if name.startswith("deim") else RTDETR if name.startswith("rtdetr") else YOLO
    folder = out / f"{name}-{fmt}-{kwargs.get('sampler', 'default')}"
    folder.mkdir(parents=True, exist_ok=True)
    model = cls(model_yaml(name, folder))
    weights = folder / f"{name}.pt"
    model.save(weights)
    return Path(cls(weights).export(format=fmt, imgsz=imgsz, verbose=False, **kwargs))


class OnnxRunner:
    """An ONNX Runtime CPU session fed one random batch (and `orig_target_sizes` for the authors' graph)."""

    def __init__(self, path: Path, imgsz: int, threads: int, profile: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = profile
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.feed = {}
        for i in self.session.get_inputs():
            if "int" in i.type:
                self.feed[i.name] = np.array([[imgsz, imgsz]], dtype=np.int64)
            else:
                self.feed[i.name] = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)

    def __call__(self) -> None:
        self.session.run(None, self.feed)


class OpenVinoRunner:
    """An OpenVINO CPU model compiled for latency at float32, fed one random batch."""

    def __init__(self, folder: Path, imgsz: int, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        self.model = core.compile_model(core.read_model(next(folder.glob("*.xml"))), "CPU", config)
        self.x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)

    def __call__(self) -> None:
        self.model(self.x)


class TorchRunner:
    """The PyTorch model from its YAML, fused and in eval mode: fp32 or fp16 on CUDA, fp32 on the CPU without one."""

    def __init__(self, name: str, imgsz: int, half: bool):
        import torch
        from ultralytics import RTDETR, YOLO

        from deim_ultra import DEIM

        cls = DEIM if name.startswith("deim") else RTDETR if name.startswith("rtdetr") else YOLO
        self.torch, self.cuda = torch, torch.cuda.is_available()
        device, dtype = ("cuda" if self.cuda else "cpu"), (torch.half if half else torch.float)
        self.model = cls(model_yaml(name, Path(tempfile.mkdtemp()))).model.to(device).eval().fuse().to(dtype)
        self.x = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype)

    def __call__(self) -> None:
        with self.torch.inference_mode():
            self.model(self.x)
        if self.cuda:
            self.torch.cuda.synchronize()


def region(node: str, op: str) -> str:
    """Part of the network an exported node belongs to, from its name (ours: /model.<layer>/..., authors':
    /model/backbone/..., /model/encoder/..., /model/decoder/..., /postprocessor/...)."""
    if op == "GridSample" or "cross_attn" in node:
        return "deformable sampling (cross-attention)"
    if "/backbone/" in node or any(node.startswith(f"/model.{i}/") for i in range(5)):
        return "backbone"
    if "/encoder/" in node or node.startswith("/model.5/"):
        return "encoder"
    if "decoder/layers" in node or "/decoder/decoder/" in node:
        return "decoder layers (other)"
    if "postprocessor" in node or op in {"TopK", "GatherElements"}:
        return "top-k selection and post-processing"
    return "query selection, heads, other"


def profile(path: Path, imgsz: int, threads: int, runs: int) -> dict[str, float]:
    """Mean ms per inference spent in each region of `path`, from ONNX Runtime's profiler over `runs` runs."""
    runner = OnnxRunner(path, imgsz, threads, profile=True)
    for _ in range(runs):
        runner()
    trace = Path(runner.session.end_profiling())
    totals = defaultdict(float)
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node, op = event["name"].removesuffix("_kernel_time"), event["args"].get("op_name", "")
            totals[region(node, op)] += event["dur"] / 1000 / runs
    trace.unlink()
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def torch_runtimes() -> list[str]:
    """The PyTorch rows this machine can time: fp32 and fp16 on CUDA, fp32 on the CPU."""
    import torch

    return ["pytorch fp32 (cuda)", "pytorch fp16 (cuda)"] if torch.cuda.is_available() else ["pytorch fp32 (cpu)"]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=["onnx", "openvino", "torch"], default=None)
    parser.add_argument("--authors", type=Path, help="the authors' DEIM-N ONNX export (their deploy graph)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: a temporary one)")
    args = parser.parse_args()
    backends = args.backends or ["onnx", "openvino"] + (["torch"] if torch.cuda.is_available() else [])
    os.environ.setdefault("YOLO_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="deim-latency-"))

    runners, onnx_files = {}, {}  # (model, runtime) -> runner
    for name in args.models:
        if "onnx" in backends:
            onnx_files[name] = export(name, "onnx", out, args.imgsz)
            runners[name, "onnx"] = OnnxRunner(onnx_files[name], args.imgsz, args.threads)
            if name in GATHER:
                path = export(name, "onnx", out, args.imgsz, sampler="gather")
                runners[name, "onnx, sampler=gather"] = OnnxRunner(path, args.imgsz, args.threads)
        if "openvino" in backends and name in OPENVINO:
            folder = export(name, "openvino", out, args.imgsz)
            runners[name, "openvino"] = OpenVinoRunner(folder, args.imgsz, args.threads)
        if "torch" in backends:
            for runtime in torch_runtimes():
                runners[name, runtime] = TorchRunner(name, args.imgsz, half="fp16" in runtime)
    if args.authors:
        runners["the authors' deim-n", "onnx"] = OnnxRunner(args.authors, args.imgsz, args.threads)
    else:
        print("no --authors export given: the authors' DEIM-N row is not measured")
    if "torch" in backends and not torch.cuda.is_available():
        print("no CUDA device: PyTorch runs on the CPU in fp32 only")

    times = defaultdict(list)
    for run in runners.values():  # warm-up: first runs allocate and tune
        for _ in range(3):
            run()
    for _ in range(args.rounds):
        for key, run in runners.items():
            for _ in range(args.runs):
                start = time.perf_counter()
                run()
                times[key].append((time.perf_counter() - start) * 1000)

    medians = {key: statistics.median(values) for key, values in times.items()}
    print(f"\nbatch 1, {args.imgsz} px, {args.threads} threads, {args.rounds} rounds x {args.runs} runs, interleaved")
    print("| model | runtime | median ms | / our DEIM-N, same runtime |")
    print("|---|---|---|---|")
    for (name, runtime), median in medians.items():
        base = medians.get(("deim-n", runtime.replace(", sampler=gather", "")))
        ratio = f"{median / base:.2f}" if base else "-"
        print(f"| {name} | {runtime} | {median:.1f} | {ratio} |")

    if args.profile:
        graphs = {"ours": onnx_files.get("deim-n") or export("deim-n", "onnx", out, args.imgsz)}
        if args.authors:
            graphs["authors'"] = args.authors
        parts = {who: profile(path, args.imgsz, args.threads, runs=20) for who, path in graphs.items()}
        print("\nONNX Runtime profile of DEIM-N, mean ms per inference by part (kernel time only)")
        print("| part | " + " | ".join(parts) + " |")
        print("|---|" + "---|" * len(parts))
        for name in dict.fromkeys(k for p in parts.values() for k in p):
            print(f"| {name} | " + " | ".join(f"{p.get(name, 0.0):.2f}" for p in parts.values()) + " |")
        print("| total | " + " | ".join(f"{sum(p.values()):.2f}" for p in parts.values()) + " |")


if __name__ == "__main__":
    main()
