"""Convergence of the DEIM recipe against the plain RT-DETR recipe, same model, same epochs, mAP after every epoch.

(a) DEIM: MAL, Dense O2O stages (mosaic + batch mixup window, no-aug tail), FlatCosine, AdamW groups (`recipe=<size>`);
(b) baseline: VFL with Ultralytics' own RT-DETR training (its augmentation, optimizer and lr schedule; `recipe=none`).
Each run validates on the held-out split after every epoch; the script writes `convergence.csv` (epoch, recipe,
mAP50-95, mAP50) and `convergence.png` (mAP vs epoch, both recipes) in --out.

    python benchmarks/convergence.py --quick                      # generated dense scenes, CPU, < 30 min
    python benchmarks/convergence.py --data deepforest.yaml --epochs 120 --imgsz 640 --device 0   # GPU
"""

import argparse
import csv
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deim_ultra import DEIM  # noqa: E402
from deim_ultra.data.synthetic import make_synthetic_dataset  # noqa: E402

RECIPES = {"DEIM": dict(cls_loss="mal"), "RT-DETR baseline": dict(recipe="none", cls_loss="vfl")}
# Dense scenes: 200 images of 128 px with 6-12 objects each (14-36 px), so a from-scratch DEIM-N learns it on a
# 2-core CPU within the --quick budget; batch 4 gives the optimizer enough steps per epoch.
QUICK_DATA = dict(
    n_train=160, n_val=40, imgsz=128, min_objects=6, max_objects=12, nc=3, min_size=14, max_size=36, seed=0
)
QUICK_RUN = dict(epochs=32, batch=4)


def train(recipe: str, args, data: str) -> list[dict]:
    """Train one recipe; return its per-epoch validation metrics."""
    model = DEIM(args.model)
    settings = dict(
        data=data,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        project=str(args.out),
        name=recipe.split()[0].lower(),
        exist_ok=True,
        plots=False,
        seed=0,
        **RECIPES[recipe],
    )
    start = time.time()
    model.train(**settings)
    minutes = (time.time() - start) / 60
    with open(Path(model.trainer.save_dir) / "results.csv") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    print(f"{recipe}: {minutes:.1f} min")
    return [
        dict(
            recipe=recipe,
            epoch=int(r["epoch"]),
            map=float(r["metrics/mAP50-95(B)"]),
            map50=float(r["metrics/mAP50(B)"]),
            minutes=round(minutes, 2),
        )
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="generated dense-scene dataset, CPU-sized run")
    parser.add_argument("--data", default="deepforest.yaml")
    parser.add_argument("--model", default="deim-n.yaml")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"))
    parser.add_argument("--from-csv", type=Path, help="only redraw the plot from an earlier convergence.csv")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        data = "" if args.from_csv else str(make_synthetic_dataset(args.out / "dense_shapes", **QUICK_DATA))
        args.epochs, args.imgsz = args.epochs or QUICK_RUN["epochs"], args.imgsz or QUICK_DATA["imgsz"]
        args.batch = args.batch or QUICK_RUN["batch"]
    else:
        data, args.epochs, args.imgsz, args.batch = args.data, args.epochs or 120, args.imgsz or 640, args.batch or 16

    if args.from_csv:
        with open(args.from_csv) as f:
            rows = [
                dict(r, epoch=int(r["epoch"]), map=float(r["map"]), map50=float(r["map50"])) for r in csv.DictReader(f)
            ]
    else:
        rows = [row for recipe in RECIPES for row in train(recipe, args, data)]
        with open(args.out / "convergence.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(rows, f"{args.model}, {'dense shapes' if args.quick else args.data}", args.out / "convergence.png")
    for recipe in RECIPES:
        best = max((r for r in rows if r["recipe"] == recipe), key=lambda r: r["map"])
        print(f"{recipe}: best mAP50-95 {best['map']:.3f} (mAP50 {best['map50']:.3f}) at epoch {best['epoch']}")
    print(f"wrote {args.out / 'convergence.png'}" + ("" if args.from_csv else f" and {args.out / 'convergence.csv'}"))


def plot(rows: list[dict], title: str, path: Path) -> None:
    """mAP50-95 (solid) and mAP50 (dashed) against epoch, one colour per recipe."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe, colour in zip(RECIPES, ("tab:blue", "tab:orange")):
        mine = [r for r in rows if r["recipe"] == recipe]
        epochs = [r["epoch"] for r in mine]
        ax.plot(epochs, [r["map"] for r in mine], color=colour, marker="o", ms=3, label=f"{recipe} mAP50-95")
        ax.plot(epochs, [r["map50"] for r in mine], color=colour, ls="--", label=f"{recipe} mAP50")
    ax.set(xlabel="epoch", ylabel="val mAP", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
