"""Does fine-tuning a DEIM checkpoint transfer? Pretrain DEIM-N on some classes, fine-tune on a small set that shares
some class names and adds new ones, and compare against training from scratch and against a positional class copy.

No real pretrained weights can be downloaded here, so the checkpoint is made first: DEIM-N (`--model`, its own
recipe, no ImageNet backbone) is trained from scratch on a generated set of coloured shapes. The class universe is
one generated palette of six classes (`make_synthetic_dataset(nc=6)`: class k draws shape k % 3 with hue k * 30 in
OpenCV's half-degrees), named by what they look like:

    red rectangle, yellow ellipse, green triangle, cyan rectangle, blue ellipse, magenta triangle

Both sets are cut from such six-class pools (pretraining from a pool of seed 0, fine-tuning from a pool of seed 1, so
no image is shared) by keeping only the images whose every object belongs to the set's classes, relabelled to the
set's class order. No image holds an unlabelled object, and a name means the same appearance in both sets.

    pretraining (160 train / 40 val)   red rectangle, yellow ellipse, green triangle, cyan rectangle
    fine-tuning (40 train / 40 val)    blue ellipse, green triangle, red rectangle, magenta triangle

The fine-tune set shares two names with pretraining (green triangle, red rectangle) and adds two never seen (blue
ellipse, magenta triangle), in another order: its classes 1 and 2 are pretraining's classes 2 and 0. Both sets have
four classes, so a positional copy keeps every pretrained class row and puts the wrong ones on the shared classes
(green triangle gets yellow ellipse's row, red rectangle gets green triangle's): the realistic failure of copying
class rows by index. Conditions, each for every --seeds value with the same epochs, batch and image size:

    A  from scratch: the model YAML (pretrained=False, like the pretraining run)
    B  fine-tuned from the pretrained best.pt, class rows transferred by name (Ultralytics' cls_remap=True, default)
    C  fine-tuned from the same best.pt with cls_remap=False: class rows copied by position

Every run uses the model's recipe at the run's length (policy epochs and warmup scaled by the trainer) and trains in
its own process, one after the other, its console output in --out/runs/<run>.log. A run whose folder holds a finished
run of as many epochs is reused by name (so a rerun only redraws): give another --out after changing anything else.
With the defaults on a 2-core CPU shared with other jobs, pretraining took 18 min and each fine-tune run 1.5 min.

Writes in --out: `transfer.csv` (condition, seed, epoch, val mAP50-95, mAP50, and the mean mAP50-95 of the shared
and of the new classes from the same validation), `transfer_classes.csv` (per-class mAP50-95 of every epoch and of
best.pt in Ultralytics' final validation), `transfer.png` (mean mAP50-95 per condition and epoch, all / shared / new
classes, min-max band over seeds), and prints per condition mAP50-95 at epoch 1, mid-run and at the end (each seed and
the mean) for all, shared and new classes, whether B leads A and C at epoch 1 and at the end, and wall times.

    python benchmarks/transfer.py --out /tmp/deim_transfer                 # pretrain 32 epochs, then 6 fine-tunes
    python benchmarks/transfer.py --out /tmp/deim_transfer --seeds 0 --epochs 6 --pretrain-epochs 4   # smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from deim_ultra import DEIM  # noqa: E402
from deim_ultra.data.synthetic import SHAPES, class_colours, make_synthetic_dataset  # noqa: E402

# The six-class universe, in make_synthetic_dataset's class order (checked against its colours and shapes at start).
UNIVERSE = {
    "red rectangle": (255, 0, 0),
    "yellow ellipse": (255, 255, 0),
    "green triangle": (0, 255, 0),
    "cyan rectangle": (0, 255, 255),
    "blue ellipse": (0, 0, 255),
    "magenta triangle": (255, 0, 255),
}
PRETRAIN_CLASSES = ("red rectangle", "yellow ellipse", "green triangle", "cyan rectangle")
FINETUNE_CLASSES = ("blue ellipse", "green triangle", "red rectangle", "magenta triangle")
SHARED = tuple(name for name in FINETUNE_CLASSES if name in PRETRAIN_CLASSES)
NEW = tuple(name for name in FINETUNE_CLASSES if name not in PRETRAIN_CLASSES)
CONDITIONS = {
    "A": "from scratch",
    "B": "fine-tuned, rows by name",
    "C": "fine-tuned, cls_remap=False",
}
# Scenes as in convergence.py's quick set (128 px, 14-36 px objects), 4-10 objects attempted; about one pool image in
# ten holds only four given classes of the six (5.7 objects on average), so pools are POOL_FACTOR times the split.
SCENES = dict(imgsz=128, min_objects=4, max_objects=10, min_size=14, max_size=36, nc=len(UNIVERSE))
POOL_FACTOR = 20


def check_universe() -> None:
    """Fail if make_synthetic_dataset no longer draws the colours and shapes UNIVERSE's names describe."""
    colours = [tuple(int(v) for v in c) for c in class_colours(len(UNIVERSE))]
    for k, (name, rgb) in enumerate(UNIVERSE.items()):
        if colours[k] != rgb or not name.endswith(SHAPES[k % len(SHAPES)]):
            raise RuntimeError(f"class {k} of the generator is {SHAPES[k % len(SHAPES)]} {colours[k]}, not '{name}'")


def cut_dataset(pool_root: Path, classes: tuple[str, ...], root: Path, sizes: dict[str, int]) -> Path:
    """Copy the first `sizes[split]` images of each pool split whose every object is one of `classes` (and that hold
    one or more objects) to `root`, labels renumbered to the order of `classes`; return the data YAML."""
    remap = {list(UNIVERSE).index(name): i for i, name in enumerate(classes)}
    shutil.rmtree(root, ignore_errors=True)
    for split, wanted in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        kept = 0
        for label in sorted((pool_root / "labels" / split).glob("*.txt")):
            rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
            if not rows or any(int(r[0]) not in remap for r in rows):
                continue
            image = next((pool_root / "images" / split).glob(f"{label.stem}.*"))
            shutil.copy2(image, root / "images" / split / image.name)
            text = "".join(" ".join([str(remap[int(r[0])]), *r[1:]]) + "\n" for r in rows)
            (root / "labels" / split / label.name).write_text(text)
            kept += 1
            if kept == wanted:
                break
        if kept < wanted:
            raise RuntimeError(
                f"{pool_root} {split}: only {kept} of {wanted} images hold only {classes}; raise POOL_FACTOR"
            )
    data = dict(path=str(root), train="images/train", val="images/val", names=dict(enumerate(classes)))
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def make_data(args) -> tuple[Path, Path]:
    """The pretraining and fine-tuning data YAMLs, cut from two six-class pools of different seeds."""
    check_universe()
    data = args.out / "data"
    sets = []
    for seed, classes, (n_train, n_val), name in (
        (0, PRETRAIN_CLASSES, (args.pretrain_train, args.pretrain_val), "pretrain"),
        (1, FINETUNE_CLASSES, (args.finetune_train, args.finetune_val), "finetune"),
    ):
        pool = make_synthetic_dataset(
            data / f"pool_seed{seed}", n_train=n_train * POOL_FACTOR, n_val=n_val * POOL_FACTOR, seed=seed, **SCENES
        ).parent
        sets.append(cut_dataset(pool, classes, data / name, {"train": n_train, "val": n_val}))
    return sets[0], sets[1]


def read_results(run_dir: Path) -> list[dict]:
    """Per-epoch val mAP50-95 and mAP50 from a run's results.csv."""
    with open(run_dir / "results.csv") as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    return [
        dict(epoch=int(r["epoch"]), map=float(r["metrics/mAP50-95(B)"]), map50=float(r["metrics/mAP50(B)"]))
        for r in rows
    ]


def train_run(name: str, model: str, data: str, settings: dict, log: Path) -> dict:
    """Train one run (in a worker process, console output to `log`); return its wall time, the per-class mAP50-95
    of every epoch's validation and of Ultralytics' final validation of best.pt, and its save_dir."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    start = time.perf_counter()
    deim = DEIM(model)
    class_curve = []  # per-class mAP50-95 of each epoch's validation (the model results.csv reports on)
    deim.add_callback(
        "on_fit_epoch_end", lambda trainer: class_curve.append([float(v) for v in trainer.validator.metrics.box.maps])
    )
    metrics = deim.train(data=data, name=name, exist_ok=True, plots=False, **settings)
    seconds = time.perf_counter() - start
    return dict(
        seconds=round(seconds, 1),
        class_maps=[float(v) for v in metrics.box.maps],
        class_curve=class_curve,
        save_dir=str(deim.trainer.save_dir),
    )


def run(name: str, model: str, data: Path, settings: dict, epochs: int, args) -> dict:
    """A finished run's record: reused from --out/runs/<name>/run.json when it has all `epochs`, else trained in a
    fresh spawned process (no Ultralytics state carries over between runs)."""
    record_file = args.out / "runs" / name / "run.json"
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if len(record["curve"]) == epochs:
            print(f"{name}: reusing the finished run in {record_file.parent}", flush=True)
            return record
    print(f"{name}: training, log {args.out / 'runs' / f'{name}.log'}", flush=True)
    shutil.rmtree(record_file.parent, ignore_errors=True)  # Ultralytics appends to a results.csv it finds there
    settings = dict(
        settings, epochs=epochs, imgsz=SCENES["imgsz"], batch=args.batch, device=args.device, workers=args.workers,
        project=str(args.out / "runs"),
    )  # fmt: skip
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        record = pool.submit(train_run, name, model, str(data), settings, args.out / "runs" / f"{name}.log").result()
    record["curve"] = read_results(Path(record["save_dir"]))
    record_file.write_text(json.dumps(record, indent=1))
    last = record["curve"][-1]
    print(f"{name}: {record['seconds']:.0f} s, last epoch mAP50-95 {last['map']:.3f} (mAP50 {last['map50']:.3f})",
          flush=True)  # fmt: skip
    return record


def pretrain(data: Path, args) -> Path:
    """The checkpoint to fine-tune from: --checkpoint, or best.pt of a from-scratch run on the pretraining set."""
    if args.checkpoint:
        return args.checkpoint
    record = run("pretrain", args.model, data, dict(seed=0, pretrained=False), args.pretrain_epochs, args)
    weights = Path(record["save_dir"]) / "weights"
    best = weights / "best.pt"
    return best if best.exists() else weights / "last.pt"


def condition_settings(condition: str, checkpoint: Path, args) -> tuple[str, dict]:
    """The model to start from and the extra train() settings of a condition."""
    return {
        "A": (args.model, dict(pretrained=False)),
        "B": (str(checkpoint), {}),
        "C": (str(checkpoint), dict(cls_remap=False)),
    }[condition]


def by_condition(rows: list[dict], key: str = "map") -> dict[str, dict[int, list[float]]]:
    """condition -> epoch -> `key` of every seed."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        table.setdefault(r["condition"], {}).setdefault(r["epoch"], []).append(r[key])
    return table


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Mean val mAP50-95 per condition and epoch (all classes, shared, new), with a band from the lowest to the
    highest seed."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), sharey=True)
    labels = ("all classes", f"shared: {', '.join(SHARED)}", f"new: {', '.join(NEW)}")
    for ax, key, label in zip(axes, ("map", "map_shared", "map_new"), labels):
        for condition, epochs in by_condition(rows, key).items():
            x = sorted(epochs)
            (line,) = ax.plot(x, [statistics.mean(epochs[e]) for e in x], marker="o", ms=3,
                              label=f"({condition}) {CONDITIONS[condition]}")  # fmt: skip
            if any(len(epochs[e]) > 1 for e in x):
                low, high = [min(epochs[e]) for e in x], [max(epochs[e]) for e in x]
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="fine-tuning epoch", title=label)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val mAP50-95")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarise(rows: list[dict], records: dict[tuple[str, int], dict], pretrain_record: dict | None) -> None:
    """Print mAP50-95 at epoch 1, mid-run and the end per condition and seed, B against A and C, the same for the
    shared and the new classes, per-class AP of best.pt and wall times."""
    if pretrain_record:
        last = pretrain_record["curve"][-1]
        print(f"\npretraining ({len(pretrain_record['curve'])} epochs, {pretrain_record['seconds']:.0f} s): last epoch "
              f"val mAP50-95 {last['map']:.3f}, mAP50 {last['map50']:.3f}; best.pt per class "
              + ", ".join(f"{n} {v:.3f}" for n, v in zip(PRETRAIN_CLASSES, pretrain_record["class_maps"])))  # fmt: skip
    last = max(r["epoch"] for r in rows)
    marks = sorted({1, (last + 1) // 2, last})
    for key, label in (("map", "all classes"), ("map_shared", "shared classes"), ("map_new", "new classes")):
        table = by_condition(rows, key)
        print(f"\nval mAP50-95 of the fine-tune set, {label} (epochs {', '.join(map(str, marks))}; seeds, then mean):")
        for condition, epochs in table.items():
            cells = [
                f"ep {e}: " + " / ".join(f"{v:.3f}" for v in epochs[e]) + f" (mean {statistics.mean(epochs[e]):.3f})"
                for e in marks
            ]
            print(f"  ({condition}) {CONDITIONS[condition]:28s} " + "; ".join(cells))
        for other in ("A", "C"):
            if "B" not in table or other not in table:
                continue
            for e in (1, last):
                b, o = table["B"][e], table[other][e]
                mean_b, mean_o = statistics.mean(b), statistics.mean(o)
                verdict = "leads" if mean_b > mean_o else "does not lead"
                print(f"  epoch {e}: B {verdict} {other}, mean {mean_b:.3f} vs {mean_o:.3f} ({mean_b - mean_o:+.3f}; "
                      f"B ahead in {sum(x > y for x, y in zip(b, o))} of {len(b)} seeds)")  # fmt: skip
    shared = [FINETUNE_CLASSES.index(n) for n in SHARED]
    new = [FINETUNE_CLASSES.index(n) for n in NEW]
    print("\nper-class mAP50-95 of best.pt (Ultralytics' final validation), mean over seeds:")
    for condition in sorted({c for c, _ in records}):
        maps = np.array([r["class_maps"] for (c, _), r in records.items() if c == condition])
        per_class = ", ".join(f"{FINETUNE_CLASSES[i]} {maps[:, i].mean():.3f}" for i in range(len(FINETUNE_CLASSES)))
        print(f"  ({condition}) shared {maps[:, shared].mean():.3f}, new {maps[:, new].mean():.3f}  [{per_class}]")
    print("\nwall time per run (set-up, training, per-epoch validation, final validation):")
    for (condition, seed), r in records.items():
        print(f"  ({condition}) seed {seed}: {r['seconds']:.0f} s")


def curve_rows(condition: str, seed: int, record: dict) -> list[dict]:
    """A run's per-epoch rows: mAP50-95 and mAP50 from results.csv, and the mean mAP50-95 of the shared and of the
    new classes from the same validation (nan for a record without per-class curves)."""
    shared = [FINETUNE_CLASSES.index(n) for n in SHARED]
    new = [FINETUNE_CLASSES.index(n) for n in NEW]
    class_curve = record.get("class_curve") or [[float("nan")] * len(FINETUNE_CLASSES)] * len(record["curve"])
    return [
        dict(
            condition=condition,
            seed=seed,
            **r,
            map_shared=round(float(np.mean([maps[i] for i in shared])), 5),
            map_new=round(float(np.mean([maps[i] for i in new])), 5),
        )
        for r, maps in zip(record["curve"], class_curve)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/deim_transfer"), help="data, runs and results")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="fine-tuning seeds")
    parser.add_argument("--conditions", nargs="+", choices=sorted(CONDITIONS), default=sorted(CONDITIONS))
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs (every condition)")
    parser.add_argument("--pretrain-epochs", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, help="fine-tune from this checkpoint instead of pretraining")
    parser.add_argument("--pretrain-train", type=int, default=160, help="pretraining train images")
    parser.add_argument("--pretrain-val", type=int, default=40)
    parser.add_argument("--finetune-train", type=int, default=40, help="fine-tuning train images")
    parser.add_argument("--finetune-val", type=int, default=40)
    parser.add_argument("--model", default="deim-n.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        args.checkpoint = args.checkpoint.resolve()

    pretrain_data, finetune_data = make_data(args)
    print(f"pretraining set {pretrain_data}: {', '.join(PRETRAIN_CLASSES)}")
    print(f"fine-tuning set {finetune_data}: {', '.join(FINETUNE_CLASSES)}")
    positional = ", ".join(f"{n} <- {p}" for n, p in zip(FINETUNE_CLASSES, PRETRAIN_CLASSES) if n != p)
    print(f"class order differs: with cls_remap=False (C) the positional copy gives {positional}")
    checkpoint = pretrain(pretrain_data, args)
    pretrain_record = None if args.checkpoint else json.loads((args.out / "runs/pretrain/run.json").read_text())

    records: dict[tuple[str, int], dict] = {}
    rows = []
    for seed in args.seeds:
        for condition in args.conditions:
            model, extra = condition_settings(condition, checkpoint, args)
            record = run(f"{condition}_seed{seed}", model, finetune_data, dict(extra, seed=seed), args.epochs, args)
            records[(condition, seed)] = record
            rows += curve_rows(condition, seed, record)
            rows.sort(key=lambda r: (r["condition"], r["seed"], r["epoch"]))
            with open(args.out / "transfer.csv", "w", newline="") as f:  # rewritten after every run
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    with open(args.out / "transfer_classes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["condition", "seed", "epoch", "class", "kind", "map"])
        for (condition, seed), record in sorted(records.items()):
            epochs = [(str(r["epoch"]), maps) for r, maps in zip(record["curve"], record.get("class_curve", []))]
            for epoch, maps in [*epochs, ("best.pt", record["class_maps"])]:
                for name, value in zip(FINETUNE_CLASSES, maps):
                    writer.writerow(
                        [condition, seed, epoch, name, "shared" if name in SHARED else "new", f"{value:.5f}"]
                    )
    title = (
        f"DEIM-N fine-tuned on {args.finetune_train} images ({', '.join(FINETUNE_CLASSES)}) from a checkpoint "
        f"pretrained on {args.pretrain_train}\n({', '.join(PRETRAIN_CLASSES)}), {args.epochs} epochs, batch "
        f"{args.batch}, {SCENES['imgsz']} px, seeds {', '.join(map(str, args.seeds))} (band: min-max over seeds)"
    )
    plot(rows, args.out / "transfer.png", title)
    summarise(rows, records, pretrain_record)
    print(f"\nwrote {args.out / 'transfer.csv'}, {args.out / 'transfer_classes.csv'}, {args.out / 'transfer.png'}")


if __name__ == "__main__":
    main()
