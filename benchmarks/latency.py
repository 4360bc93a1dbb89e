"""Latency of exported detectors at batch 1, side by side in one process, with their accuracy on the quick set.

Exports each model through its own Ultralytics exporter, once per runtime:
    onnx            ONNX (opset 18 + onnxslim), ONNX Runtime CPU, float32
    onnx-int8       the same ONNX statically quantized by ONNX Runtime (Ultralytics' `format=onnx quantize=8`)
    openvino        OpenVINO IR, OpenVINO CPU at float32
    openvino-int8   OpenVINO IR quantized by NNCF (Ultralytics' `format=openvino quantize=8`)
    torch           the PyTorch model itself, fused as Ultralytics' predictor runs it: fp32 and fp16 on a CUDA device,
                    fp32 on the CPU where there is none (in the default runtimes only where CUDA is)
INT8 exports calibrate on `--data` (default: the quick set). Models: DEIM-N and DEIM-S (ONNX also with
`sampler=gather`, and DEIM-N with `dynamic=True`), DEIM-N trained with MS-DETR's mixed supervision (`deim-n-o2m`),
DEIMv2 Atto, Pico, N and S (all at the same `--imgsz`, though Atto's recipe trains at 320),
Ultralytics YOLO11n / YOLO11s, YOLO26n / YOLO26s and RT-DETR-l; OpenVINO and INT8 rows for the small models. With
`--authors` also the authors' own DEIM-N deploy export (built from their code outside this repository; how: the
section on it in docs/benchmarks.md), and with `--compare` any other ONNX graphs.

Timing: `--rounds` rounds, each running every model `--runs` times in turn, so machine noise hits all alike. Prints
per model and runtime the median ms, its ratio to our DEIM-N on the same runtime, and the spread of that ratio over the
rounds (min-max of the per-round ratios), and the machine's load average before and after. OpenVINO runs at float32
(`INFERENCE_PRECISION_HINT f32`; its CPU default is bfloat16 where the CPU has it), ONNX Runtime and OpenVINO on
`--threads` intra-op threads.

`--accuracy` first trains (or reuses, see quick_checkpoints.py) one checkpoint per model on the quick set, times
exports of those weights, and measures mAP50-95 on the quick set's val split for every model and runtime: the
checkpoint exported once more at the quick set's 128 px, validated by Ultralytics as a user would (`model.val`; here
OpenVINO too is held to float32). Writes `latency.csv` and `pareto.png` (mAP50-95 against latency, a colour per
model and a marker per runtime, the accuracy-latency front drawn) into `--out`.
`--profile` adds ONNX Runtime's per-node profile of our DEIM-N and, if given, the authors' export and the `--compare`
graphs (per-node medians over interleaved runs), by part of the network and by operator type.

    python benchmarks/latency.py --authors /tmp/authors_export/deim_n_640.onnx --profile --models deim-n yolo11n
    python benchmarks/latency.py --accuracy --models deim-n deim-s deimv2-atto deimv2-pico deimv2-n yolo11n yolo26n
    python benchmarks/latency.py --backends torch --threads 8   # on a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from quick_checkpoints import ensure_checkpoints, model_class, quick_data

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
SMALL = {"deim-n", "deim-s", "deim-n-o2m", "deimv2-atto", "deimv2-pico", "deimv2-n", "deimv2-s", "yolo11n", "yolo26n"}
# ONNX variants timed beside the default export: the GridSample-free sampler, and one graph for any batch size.
ONNX_VARIANTS = {"deim-n": [{"sampler": "gather"}, {"dynamic": True}], "deim-s": [{"sampler": "gather"}]}
O2M = {"deim-n-o2m"}  # built with `o2m: true` added to the YAML
# runtime: (Ultralytics export arguments, models exported for it)
RUNTIMES = {
    "onnx": ({"format": "onnx"}, set(MODELS)),
    "onnx-int8": ({"format": "onnx", "quantize": 8}, SMALL),
    "openvino": ({"format": "openvino"}, SMALL),
    "openvino-int8": ({"format": "openvino", "quantize": 8}, SMALL),
}
QUICK_IMGSZ = 128  # the quick set's image size (convergence.py's QUICK_DATA)


def model_yaml(name: str, folder: Path) -> str:
    """The YAML model `name` is built from: the shipped one, or for O2M a copy with `o2m: true` written to `folder`."""
    if name not in O2M:
        return MODELS[name]
    from ultralytics.utils import YAML

    from deim_ultra.cfg import resolve_model_yaml

    path = folder / f"{name}.yaml"
    YAML.save(path, {**YAML.load(resolve_model_yaml(MODELS[name])), "o2m": True})
    return str(path)


def export(name: str, weights: Path | None, out: Path, imgsz: int, **kwargs) -> Path:
    """Export model `name` (its checkpoint `weights`, else its YAML with random weights) into a folder of its own."""
    cls = model_class(name)
    tag = "-".join(f"{k}={v}" for k, v in kwargs.items() if k != "data")
    folder = out / f"{name}-{imgsz}-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"{name}.pt"
    (cls(weights) if weights else cls(model_yaml(name, folder))).save(source)
    return Path(cls(source).export(imgsz=imgsz, verbose=False, **kwargs))


class OnnxRunner:
    """An ONNX Runtime CPU session fed one random batch (and `orig_target_sizes` for the authors' graph)."""

    def __init__(self, path: Path, imgsz: int, threads: int, profile: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = profile
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "deim-latency-profile")  # not the cwd
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.feed = {}
        for i in self.session.get_inputs():
            if "int" in i.type:
                self.feed[i.name] = np.array([[imgsz, imgsz]], dtype=np.int64)
            else:
                self.feed[i.name] = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)

    def __call__(self) -> None:
        self.session.run(None, self.feed)


OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


class OpenVinoRunner:
    """An OpenVINO CPU model compiled for latency at float32 (int8 where quantized), fed one random batch."""

    def __init__(self, folder: Path, imgsz: int, threads: int):
        import openvino as ov

        core = ov.Core()
        config = {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads}
        self.model = core.compile_model(core.read_model(next(folder.glob("*.xml"))), "CPU", config)
        self.x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)

    def __call__(self) -> None:
        self.model(self.x)


class TorchRunner:
    """The PyTorch model (checkpoint or YAML), fused, in eval mode: fp32 or fp16 on CUDA, fp32 on the CPU."""

    def __init__(self, name: str, weights: Path | None, imgsz: int, half: bool):
        import torch

        self.torch, self.cuda = torch, torch.cuda.is_available()
        device, dtype = ("cuda" if self.cuda else "cpu"), (torch.half if half else torch.float)
        model = model_class(name)(weights or model_yaml(name, Path(tempfile.mkdtemp())))
        self.model = model.model.to(device).float().eval().fuse().to(dtype)
        self.x = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype)

    def __call__(self) -> None:
        with self.torch.inference_mode():
            self.model(self.x)
        if self.cuda:
            self.torch.cuda.synchronize()


@contextlib.contextmanager
def openvino_float32() -> Iterator[None]:
    """Make Ultralytics' OpenVINO backend compile at float32, as the timed runners do (it keeps the CPU default,
    bfloat16 on CPUs that have it, whose scores differ from PyTorch by up to 0.02)."""
    import openvino as ov

    compile_model = ov.Core.compile_model

    def float32(self, model, device_name=None, config=None):
        return compile_model(self, model, device_name, {**(config or {}), "INFERENCE_PRECISION_HINT": "f32"})

    ov.Core.compile_model = float32
    try:
        yield
    finally:
        ov.Core.compile_model = compile_model


def quick_map(name: str, runtime: str, weights: Path, data: str, out: Path) -> float:
    """mAP50-95 on the quick set's val split of `weights` run on `runtime`, validated through Ultralytics."""
    if runtime.startswith("pytorch"):
        model = weights
    else:
        model = export(name, weights, out / "accuracy", QUICK_IMGSZ, data=data, **RUNTIMES[runtime][0])
    with openvino_float32():
        metrics = model_class(name)(model).val(data=data, imgsz=QUICK_IMGSZ, batch=1, plots=False, verbose=False)
    return float(metrics.box.map)


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


def profile(graphs: dict[str, Path], imgsz: int, threads: int, runs: int) -> dict[str, dict[tuple[str, str], float]]:
    """Per graph, the median ms per inference of each (node, operator) from ONNX Runtime's profiler, the graphs run
    in turn `runs` times (the first 5 runs of each dropped as warm-up)."""
    runners = {who: OnnxRunner(path, imgsz, threads, profile=True) for who, path in graphs.items()}
    for _ in range(runs + 5):
        for runner in runners.values():
            runner()
    nodes = {}
    for who, runner in runners.items():
        trace = Path(runner.session.end_profiling())
        times = defaultdict(list)
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                key = (event["name"].removesuffix("_kernel_time"), event["args"].get("op_name", ""))
                times[key].append(event["dur"] / 1000)
        trace.unlink()
        # A node may run more than once per inference; the median per call times the calls per inference.
        nodes[who] = {key: statistics.median(t[5:]) * len(t) / (runs + 5) for key, t in times.items()}
    return nodes


def print_profile(nodes: dict[str, dict[tuple[str, str], float]]) -> None:
    """Tables of the profile by part of the network and by operator type, largest first."""
    for title, group in (("part", lambda node, op: region(node, op)), ("operator", lambda node, op: op)):
        sums = {who: defaultdict(float) for who in nodes}
        for who, per_node in nodes.items():
            for (node, op), ms in per_node.items():
                sums[who][group(node, op)] += ms
        keys = sorted({k for s in sums.values() for k in s}, key=lambda k: -max(s.get(k, 0.0) for s in sums.values()))
        print(f"\nONNX Runtime profile of DEIM-N by {title}, median ms per inference (kernel time only)")
        print(f"| {title} | " + " | ".join(sums) + " |")
        print("|---|" + "---|" * len(sums))
        for key in keys:
            if max(s.get(key, 0.0) for s in sums.values()) >= 0.05:
                print(f"| {key} | " + " | ".join(f"{s.get(key, 0.0):.2f}" for s in sums.values()) + " |")
        print("| total | " + " | ".join(f"{sum(s.values()):.2f}" for s in sums.values()) + " |")


def time_interleaved(runners: dict, rounds: int, runs: int) -> dict[tuple[str, str], list[list[float]]]:
    """Per runner, `rounds` lists of `runs` times in ms, every runner taking its turn in each round."""
    for run in runners.values():  # warm-up: first runs allocate and tune
        for _ in range(3):
            run()
    times = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            ms = []
            for _ in range(runs):
                start = time.perf_counter()
                run()
                ms.append((time.perf_counter() - start) * 1000)
            times[key].append(ms)
    return times


def summarise(times: dict[tuple[str, str], list[list[float]]]) -> list[dict]:
    """Median ms per (model, runtime), its ratio to our DEIM-N on the same runtime and that ratio's min-max over rounds
    (each round's median against DEIM-N's median of the same round)."""
    rows = []
    for (name, runtime), rounds in times.items():
        row = dict(model=name, runtime=runtime, ms=statistics.median(t for r in rounds for t in r))
        base = times.get(("deim-n", runtime.split(",")[0]))
        if base:
            ratios = [statistics.median(r) / statistics.median(b) for r, b in zip(rounds, base)]
            base_ms = statistics.median(t for r in base for t in r)
            row.update(ratio=row["ms"] / base_ms, ratio_min=min(ratios), ratio_max=max(ratios))
        rows.append(row)
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both latency (lower) and mAP (higher), by increasing latency."""
    front, best = [], -1.0
    for ms, m in sorted(points, key=lambda p: (p[0], -p[1])):
        if m > best:
            front.append((ms, m))
            best = m
    return front


MARKERS = {"onnx": "o", "onnx-int8": "^", "openvino": "s", "openvino-int8": "D"}


def plot(rows: list[dict], path: Path, title: str) -> None:
    """mAP50-95 against median latency: a colour per model, a marker per runtime, the front over all points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in rows if r.get("map") not in (None, "")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    colours = dict(zip(models, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        marker = MARKERS.get(r["runtime"], "x")
        ax.scatter(float(r["ms"]), float(r["map"]), color=colours[r["model"]], marker=marker, s=46, zorder=3)
    front = pareto_front([(float(r["ms"]), float(r["map"])) for r in rows])
    ax.plot(*zip(*front), "k--", lw=0.8, alpha=0.5, zorder=2)
    handles = [Line2D([], [], ls="", marker="o", color=colours[m], label=m) for m in models]
    handles += [Line2D([], [], ls="", marker=MARKERS.get(t, "x"), color="grey", label=t) for t in runtimes]
    handles.append(Line2D([], [], ls="--", color="k", alpha=0.5, label="front: nothing faster is as accurate"))
    ax.legend(handles=handles, fontsize=8, loc="lower right", ncol=2)
    ax.set_xlabel("latency, median ms per image")
    ax.set_ylabel("mAP50-95, quick set")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def torch_runtimes() -> list[str]:
    """The PyTorch rows this machine can time: fp32 and fp16 on CUDA, fp32 on the CPU."""
    import torch

    return ["pytorch fp32 (cuda)", "pytorch fp16 (cuda)"] if torch.cuda.is_available() else ["pytorch fp32 (cpu)"]


def build_runners(args, weights: dict[str, Path | None], out: Path) -> tuple[dict[tuple[str, str], Callable], dict]:
    """A runner per (model, runtime) to time, and our DEIM-N's ONNX file (for the profile)."""
    runners, onnx_files = {}, {}
    for name in args.models:
        for runtime in args.backends:
            if runtime == "torch":
                for label in torch_runtimes():
                    runners[name, label] = TorchRunner(name, weights[name], args.imgsz, half="fp16" in label)
                continue
            kwargs, models = RUNTIMES[runtime]
            if name not in models:
                continue
            path = export(name, weights[name], out, args.imgsz, data=args.data, **kwargs)
            if kwargs["format"] == "onnx":
                runners[name, runtime] = OnnxRunner(path, args.imgsz, args.threads)
                if runtime == "onnx":
                    onnx_files[name] = path
                for variant in ONNX_VARIANTS.get(name, []) if runtime == "onnx" else []:
                    path = export(name, weights[name], out, args.imgsz, format="onnx", **variant)
                    label = ", ".join(f"{k}={v}" for k, v in variant.items())
                    runners[name, f"onnx, {label}"] = OnnxRunner(path, args.imgsz, args.threads)
            else:
                runners[name, runtime] = OpenVinoRunner(path, args.imgsz, args.threads)
    return runners, onnx_files


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=[*RUNTIMES, "torch"], default=None)
    parser.add_argument("--authors", type=Path, help="the authors' DEIM-N ONNX export (their deploy graph)")
    parser.add_argument(
        "--compare", nargs="+", default=[], metavar="LABEL=ONNX",
        help="more ONNX graphs timed beside ours, e.g. an export made at an earlier commit",
    )  # fmt: skip
    parser.add_argument("--accuracy", action="store_true", help="time quick-set checkpoints and measure their mAP")
    parser.add_argument("--data", default=None, help="INT8 calibration data (default: the quick set)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--from-csv", type=Path, help="only redraw pareto.png (beside it) from an earlier latency.csv")
    parser.add_argument("--title", default=None, help="the plot's title (default: the run's settings)")
    args = parser.parse_args()
    title = args.title or (
        f"batch 1, {args.imgsz} px, {args.threads} CPU threads; mAP at {QUICK_IMGSZ} px on the quick set (32 epochs "
        "from scratch)"
    )
    if args.from_csv:
        with open(args.from_csv) as f:
            plot(list(csv.DictReader(f)), args.from_csv.with_name("pareto.png"), title)
        print(f"wrote {args.from_csv.with_name('pareto.png')}")
        return
    args.backends = args.backends or ["onnx", "openvino"] + (["torch"] if torch.cuda.is_available() else [])
    os.environ.setdefault("YOLO_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    out = (args.out or Path(tempfile.mkdtemp(prefix="deim-latency-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)

    args.data = args.data or str(quick_data(out))
    weights = dict.fromkeys(args.models)
    if args.accuracy:
        if O2M & set(args.models):
            parser.error("--accuracy: deim-n-o2m has no quick-set checkpoint here; leave it out")
        weights = ensure_checkpoints({name: MODELS[name] for name in args.models}, out / "checkpoints")
    runners, onnx_files = build_runners(args, weights, out)
    if args.authors:
        runners["the authors' deim-n", "onnx"] = OnnxRunner(args.authors, args.imgsz, args.threads)
    else:
        print("no --authors export given: the authors' DEIM-N row is not measured")
    for label, path in (item.split("=", 1) for item in args.compare):
        runners[label, "onnx"] = OnnxRunner(Path(path), args.imgsz, args.threads)
    if "torch" in args.backends and not torch.cuda.is_available():
        print("no CUDA device: PyTorch runs on the CPU in fp32 only")

    load_before = os.getloadavg()
    rows = summarise(time_interleaved(runners, args.rounds, args.runs))
    load_after = os.getloadavg()
    if args.accuracy:
        for row in rows:
            if row["model"] in weights and "," not in row["runtime"]:  # variants: the same numbers
                row["map"] = quick_map(row["model"], row["runtime"], weights[row["model"]], args.data, out)

    print(f"\nbatch 1, {args.imgsz} px, {args.threads} threads, {args.rounds} rounds x {args.runs} runs, interleaved")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print("| model | runtime | median ms | / our DEIM-N, same runtime | per-round min-max | mAP50-95 quick set |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if "ratio" in r else "- | -"
        accuracy = f"{r['map']:.3f}" if r.get("map") is not None else "-"
        print(f"| {r['model']} | {r['runtime']} | {r['ms']:.1f} | {ratio} | {accuracy} |")
    with open(out / "latency.csv", "w", newline="") as f:
        fields = ["model", "runtime", "ms", "ratio", "ratio_min", "ratio_max", "map"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'latency.csv'}")
    if args.accuracy:
        plot(rows, out / "pareto.png", title)
        print(f"wrote {out / 'pareto.png'}")

    if args.profile:
        ours = onnx_files.get("deim-n") or export("deim-n", weights.get("deim-n"), out, args.imgsz, format="onnx")
        graphs = {"ours": ours}
        if args.authors:
            graphs["authors'"] = args.authors
        graphs.update((label, Path(path)) for label, path in (item.split("=", 1) for item in args.compare))
        print_profile(profile(graphs, args.imgsz, args.threads, runs=40))


if __name__ == "__main__":
    main()
