"""The quick set as COCO json against the same set as YOLO labels: training and validation give the same numbers.

1. Builds convergence.py's quick set and writes its labels as COCO json beside it, with 1-based sparse category ids
   (`--category-ids`, default 1 7 42), so that `data=<root>` reads the json and `data=<root>/data.yaml` the YOLO
   labels of the same images (`deim_ultra.data.coco_write.yolo_to_coco`).
2. Trains convergence.py's row a (DEIM-N, 32 epochs, batch 4, imgsz 128) once per format and seed, side by side.
3. Validates every run's best.pt through both formats with `save_json=True`: Ultralytics' mAP50-95 and COCO's AP
   (pycocotools, the validator's `coco/AP`) for each.

Prints a table and writes --out/coco_json.csv (format trained on, seed, final val mAP50-95 of the run, then per
format validated on: Ultralytics mAP50-95, COCO AP).

    python benchmarks/coco_json.py --seeds 0 --out /tmp/coco_json
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from copy import copy
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402

from deim_ultra import DEIM  # noqa: E402
from deim_ultra.data.coco_write import yolo_to_coco  # noqa: E402
from deim_ultra.data.synthetic import make_synthetic_dataset  # noqa: E402


def train(fmt: str, seed: int, args, data: str) -> float:
    """Train row a on `data` into --out/<fmt>/a_seed<seed>; return its final val mAP50-95."""
    run_args = copy(args)
    run_args.out = args.out / fmt
    run_args.out.mkdir(parents=True, exist_ok=True)
    return convergence.train_logged("a", seed, run_args, data)[-1]["map"]


def final_map(run_dir: Path) -> float:
    """The last epoch's val mAP50-95 in a run's results.csv."""
    with open(run_dir / "results.csv") as f:
        return float(list(csv.DictReader(f))[-1]["metrics/mAP50-95(B)"])


def validate(weights: Path, data: str, args, name: str) -> tuple[float, float]:
    """Ultralytics' mAP50-95 and COCO's AP of `weights` on the val split of `data`."""
    metrics = DEIM(weights).val(data=data, imgsz=args.imgsz, batch=args.batch, save_json=True, plots=False,
                                project=str(args.out / "val"), name=name, exist_ok=True, verbose=False)  # fmt: skip
    return metrics.box.map, metrics.coco["AP"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--category-ids", nargs=3, type=int, default=[1, 7, 42])
    parser.add_argument("--out", type=Path, default=Path("runs/coco_json"))
    parser.add_argument("--validate-only", action="store_true", help="validate the runs already in --out again")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model, args.device, args.workers, args.amp = "deim-n.yaml", "cpu", 2, True
    args.epochs, args.batch, args.imgsz = convergence.QUICK_RUN["epochs"], convergence.QUICK_RUN["batch"], 128
    yaml_file = make_synthetic_dataset(args.out / "dense_shapes", **convergence.QUICK_DATA)
    root = yolo_to_coco(yaml_file, category_ids=args.category_ids)
    data = {"yolo": str(yaml_file), "coco": str(root)}

    runs = [(fmt, seed) for seed in args.seeds for fmt in data]
    if args.validate_only:
        finals = {run: final_map(args.out / run[0] / f"a_seed{run[1]}") for run in runs}
    else:
        print(f"{len(runs)} runs, 2 at a time; console output in {args.out}/<format>/a_seed<seed>.log", flush=True)
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {run: pool.submit(train, *run, args, data[run[0]]) for run in runs}
            finals = {run: future.result() for run, future in futures.items()}

    rows = []
    for fmt, seed in runs:
        best = args.out / fmt / f"a_seed{seed}" / "weights" / "best.pt"
        row = dict(trained_on=fmt, seed=seed, final_map=finals[(fmt, seed)])
        for val_fmt, val_data in data.items():
            ours, coco = validate(best, val_data, args, f"{fmt}_seed{seed}_on_{val_fmt}")
            row.update({f"{val_fmt}_map": ours, f"{val_fmt}_coco_ap": coco})
        rows.append(row)
    with open(args.out / "coco_json.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| trained on | seed | run's final mAP50-95 | val on YOLO: mAP50-95 / COCO AP | val on COCO json: mAP50-95 / "
          "COCO AP |\n|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['trained_on']} | {r['seed']} | {r['final_map']:.4f} | {r['yolo_map']:.4f} / "
              f"{r['yolo_coco_ap']:.4f} | {r['coco_map']:.4f} / {r['coco_coco_ap']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
