"""One checkpoint per model trained on the quick set, for reading accuracy beside latency (`latency.py --accuracy`).

The quick set is `convergence.py --quick`'s generated dense-shapes data (160 train / 40 val images of 128 px, 3
classes) and schedule (32 epochs, batch 4, 128 px, seed 0): DEIM models train with their own YAML's recipe, Ultralytics
models with Ultralytics' defaults. A model whose `<out>/<name>/weights/best.pt` exists is not trained again. On CPU as
many models train at once as Ultralytics' per-run thread count leaves cores for, each in a process of its own with its
console output in `<out>/<name>.log`.

    python benchmarks/quick_checkpoints.py --models deim-n yolo11n --out /tmp/quick-checkpoints
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

from convergence import QUICK_DATA, QUICK_RUN, default_jobs  # noqa: E402

from deim_ultra.data.synthetic import make_synthetic_dataset  # noqa: E402


def quick_data(out: Path) -> Path:
    """The quick set's data YAML, generated under `out` (or reused when already there)."""
    return make_synthetic_dataset(out / "dense_shapes", **QUICK_DATA)


def model_class(name: str) -> type:
    """DEIM for deim* names, Ultralytics' RTDETR or YOLO for the others."""
    from ultralytics import RTDETR, YOLO

    from deim_ultra import DEIM

    return DEIM if name.startswith("deim") else RTDETR if name.startswith("rtdetr") else YOLO


def checkpoint(name: str, out: Path) -> Path:
    """Where model `name`'s quick-set checkpoint lives under `out`."""
    return out / name / "weights" / "best.pt"


def train(name: str, yaml: str, data: Path, out: Path) -> Path:
    """Train `yaml` on the quick set into `out/name`, its console output in `out/name.log`; return best.pt."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(out / f"{name}.log", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    model = model_class(name)(yaml)
    model.train(
        data=str(data), epochs=QUICK_RUN["epochs"], batch=QUICK_RUN["batch"], imgsz=QUICK_DATA["imgsz"], seed=0,
        device="cpu", workers=2, project=str(out), name=name, exist_ok=True, plots=False,
    )  # fmt: skip
    return checkpoint(name, out)


def ensure_checkpoints(models: dict[str, str], out: Path) -> dict[str, Path]:
    """Quick-set checkpoints of `models` (name: YAML), training those not yet under `out`."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = quick_data(out)
    missing = [name for name in models if not checkpoint(name, out).exists()]
    if missing:
        print(f"training on the quick set: {', '.join(missing)} (logs in {out})", flush=True)
        with ProcessPoolExecutor(min(default_jobs("cpu"), len(missing))) as pool:
            for future in [pool.submit(train, name, models[name], data, out) for name in missing]:
                future.result()
    return {name: checkpoint(name, out) for name in models}


def main() -> None:
    from latency import MODELS, O2M

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(set(MODELS) - O2M), default=["deim-n", "yolo11n"])
    parser.add_argument("--out", type=Path, default=Path("runs/quick-checkpoints"))
    args = parser.parse_args()
    for name, path in ensure_checkpoints({name: MODELS[name] for name in args.models}, args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
