"""The paper's ablation, side by side in one run: val mAP after every epoch, same model, data, epochs and batch.

Rows (select with --rows; seeds with --seeds):
    a  DEIM: MAL + Dense O2O (mosaic + batch mixup window) + FlatCosine, the model YAML's recipe
    b  D-FINE, the paper's baseline: VFL, no mosaic / mixup, the same photometric / zoom-out / IoU-crop stage and
       no-aug tail, constant lr after warmup (same model: the authors' D-FINE-N has a ReLU decoder)
    c  DEIM without MAL: Dense O2O + VFL
    d  DEIM without Dense O2O: MAL + D-FINE's augmentation
    e  Ultralytics' RT-DETR recipe (its augmentation, optimizer and lr schedule) with VFL
    f  Ultralytics YOLO26n from its YAML with Ultralytics' defaults (what a YOLO user compares against)
    g  DEIM + MS-DETR: row a with `o2m=True` (one-to-many terms on every decoder layer, MS-DETR's layer order)
    h  D-FINE baseline + MS-DETR: row b with `o2m=True`
    i  DEIMv2-N: deimv2-n.yaml with its own recipe (CopyBlend, the matcher change), against row a's DEIM-N

Writes in --out: `convergence.csv` (row, seed, epoch, mAP50-95, mAP50, seconds per training iteration, peak training
memory in MiB: the CUDA allocator's peak on a GPU, else the training process's peak resident memory) and
`convergence.png` (mean per epoch with a min-max band over seeds), and prints final mAP per row, seconds per
iteration, peak memory, rows g, h and i against rows a, b and a, and the first epoch at which DEIM's mean mAP
reaches the D-FINE baseline's mean final mAP. With
`--reference` (CSVs of the authors' per-epoch curves of the row `--reference-row`, default a, e.g.
../shared/reference/authors_deim_n_quick.csv or, for row i, authors_deimv2_n_quick.csv: seed, epoch,
mAP50-95), their band is drawn too, and the distance from it from epoch 20 on is printed for each DEIM seed, for
DEIM's mean and, with 3 or more authors' seeds, for each authors' seed against the band of the others; with 2 or
more seeds on both sides, the difference of the means per epoch with Welch's p-value. `--check FINAL GAP` (default
0.74 0.03, issue 9's per-seed check on the quick set) counts the DEIM seeds, and pairs of seeds, that end at FINAL or
more and stay within GAP of the band from epoch 20, and the same for the authors' own seeds against the band of the
others: how often a faithful trainer passes such a check by the draw of its seeds.

On CPU, Ultralytics trains on cpu_count - 1 threads (one on a 2-core machine), so by default as many runs train at once
as fit the cores (`--jobs`), each in its own process with its console output in --out/<row>_seed<seed>.log; a seed
gives the same curve however many run beside it. Each run side by side has a process of its own, so its peak
memory is its own; with --jobs 1 the runs share one process and only the first run's CPU memory is its own.

    python benchmarks/convergence.py --quick                        # all rows, seeds 0 1 (a, b, f) and 0 (c, d, e)
    python benchmarks/convergence.py --quick --rows a f --seeds 0   # a subset
    python benchmarks/convergence.py --data deepforest.yaml --epochs 120 --imgsz 640 --batch 16 --device 0
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import combinations
from math import comb
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from scipy.stats import ttest_ind  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.utils import NUM_THREADS  # noqa: E402

from deim_ultra import DEIM  # noqa: E402
from deim_ultra.cfg import resolve_data_yaml  # noqa: E402
from deim_ultra.data.synthetic import make_synthetic_dataset  # noqa: E402
from deim_ultra.recipe.schedule import scale_policy
from deim_ultra.recipe.tables import RECIPES  # noqa: E402

ROWS = {
    "a": "DEIM",
    "b": "D-FINE baseline",
    "c": "DEIM w/o MAL",
    "d": "DEIM w/o Dense O2O",
    "e": "Ultralytics RT-DETR recipe",
    "f": "YOLO26n",
    "g": "DEIM + MS-DETR",
    "h": "D-FINE baseline + MS-DETR",
    "i": "DEIMv2-N",
}
SEEDED_ROWS = ("a", "b", "f", "g", "h", "i")  # rows run for every --seeds value; the others for the first seed only
PLAIN_ROW = {"g": "a", "h": "b", "i": "a"}  # the row each is compared with: without MS-DETR; DEIMv2 against DEIM
ROW_MODEL = {"i": "deimv2-n.yaml"}  # rows with a model of their own (others train --model)
NO_DENSE_O2O = dict(mosaic=0.0, mixup=0.0)
# Dense scenes: 200 images of 128 px with 6-12 objects each (14-36 px), so a from-scratch DEIM-N learns it on a
# 2-core CPU; batch 4 gives the optimizer enough steps per epoch. ../shared/reference holds the authors' runs on it.
QUICK_DATA = dict(
    n_train=160, n_val=40, imgsz=128, min_objects=6, max_objects=12, nc=3, min_size=14, max_size=36, seed=0
)
QUICK_RUN = dict(epochs=32, batch=4)


def row_settings(row: str, epochs: int) -> dict:
    """DEIM settings of an ablation row (rows a-e, g, h), on top of the model YAML's recipe."""
    n = RECIPES["n"]
    e0, _, e2 = scale_policy(n.policy_epochs, n.epochs, epochs)
    dfine = dict(policy_epochs=[e0, e0, e2], lrf=1.0, **NO_DENSE_O2O)  # augment from e0 to the tail, flat lr
    return {
        "a": {},
        "b": dict(cls_loss="vfl", **dfine),
        "c": dict(cls_loss="vfl"),
        "d": dfine,
        "e": dict(recipe="none", cls_loss="vfl"),
        "g": dict(o2m=True),
        "h": dict(cls_loss="vfl", o2m=True, **dfine),
        "i": {},
    }[row]


class IterationClock:
    """Callbacks timing the training part of each epoch (validation excluded), per iteration."""

    def __init__(self) -> None:
        self.seconds, self.iterations, self.start = 0.0, 0, 0.0

    def epoch_start(self, trainer) -> None:
        self.start = time.perf_counter()

    def epoch_end(self, trainer) -> None:
        self.seconds += time.perf_counter() - self.start
        self.iterations += len(trainer.train_loader)

    @property
    def per_iteration(self) -> float:
        return self.seconds / max(self.iterations, 1)


class MemoryPeak:
    """Callbacks recording peak training memory in MiB: the CUDA allocator's peak, or on CPU the process's peak
    resident memory sampled after every training batch."""

    def __init__(self) -> None:
        self.mib = 0.0

    def batch_end(self, trainer) -> None:
        if trainer.device.type == "cuda":
            used = torch.cuda.max_memory_allocated(trainer.device)
        else:
            used = psutil.Process().memory_info().rss
        self.mib = max(self.mib, used / 2**20)


def train(row: str, seed: int, args, data: str) -> list[dict]:
    """Train one row with one seed; return its per-epoch validation metrics."""
    model = YOLO("yolo26n.yaml") if row == "f" else DEIM(ROW_MODEL.get(row, args.model))
    clock = IterationClock()
    model.add_callback("on_train_epoch_start", clock.epoch_start)
    model.add_callback("on_train_epoch_end", clock.epoch_end)
    memory = MemoryPeak()
    model.add_callback("on_train_batch_end", memory.batch_end)
    settings = dict(
        data=data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device=args.device, workers=args.workers,
        amp=args.amp, project=str(args.out), name=f"{row}_seed{seed}", exist_ok=True, plots=False, seed=seed,
    )  # fmt: skip
    if row != "f":
        settings.update(row_settings(row, args.epochs))
    model.train(**settings)
    with open(Path(model.trainer.save_dir) / "results.csv") as f:
        results = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    return [
        dict(
            row=row,
            seed=seed,
            epoch=int(r["epoch"]),
            map=float(r["metrics/mAP50-95(B)"]),
            map50=float(r["metrics/mAP50(B)"]),
            s_per_iter=round(clock.per_iteration, 4),
            peak_mib=round(memory.mib),
        )
        for r in results
    ]


def train_logged(row: str, seed: int, args, data: str) -> list[dict]:
    """`train` in a worker process, its console output (progress bars included) sent to --out/<row>_seed<seed>.log
    so that runs side by side do not interleave on the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(args.out / f"{row}_seed{seed}.log", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    return train(row, seed, args, data)


def default_jobs(device: str) -> int:
    """Runs to train at once: on CPU as many as Ultralytics' per-run thread count leaves cores for, else one."""
    return max(1, (os.cpu_count() or 1) // NUM_THREADS) if device == "cpu" else 1


def run_all(runs: list[tuple[str, int]], args, data: str) -> list[dict]:
    """Train every (row, seed) of `runs`, `args.jobs` at a time; convergence.csv is rewritten (in the order of `runs`)
    after each run ends, so partial results survive an interrupted grid. Side by side, a run that fails does not stop
    the others: the error, naming each failed run's log, comes once all have ended."""
    done: dict[tuple[str, int], list[dict]] = {}

    def record(run: tuple[str, int], curve: list[dict]) -> None:
        done[run] = curve
        rows = [r for key in runs if key in done for r in done[key]]
        with open(args.out / "convergence.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"{ROWS[run[0]]} seed {run[1]}: final mAP50-95 {curve[-1]['map']:.3f}, {curve[-1]['s_per_iter']:.3f} "
              f"s/iteration ({len(done)} of {len(runs)} runs)", flush=True)  # fmt: skip

    if args.jobs == 1:
        for run in runs:
            record(run, train(*run, args, data))
    else:
        print(f"{len(runs)} runs, {args.jobs} at a time; console output in {args.out}/<row>_seed<seed>.log", flush=True)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
            futures = {pool.submit(train_logged, *run, args, data): run for run in runs}
            failed = []
            for future in as_completed(futures):
                (row, seed), error = futures[future], future.exception()
                if error is None:
                    record((row, seed), future.result())
                else:
                    failed.append(f"{row}_seed{seed}: {error!r} (log {args.out / f'{row}_seed{seed}.log'})")
                    print(f"{ROWS[row]} seed {seed} failed: {failed[-1]}", flush=True)
        if failed:
            kept = f"; the runs that ended are in {args.out / 'convergence.csv'}" if done else ""
            raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed{kept}:\n" + "\n".join(failed))
    return [r for run in runs for r in done[run]]


def by_row(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
    """row -> epoch -> mAP50-95 of every seed."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        table.setdefault(r["row"], {}).setdefault(r["epoch"], []).append(r["map"])
    return table


def read_reference(paths: list[Path] | None) -> dict[int, dict[int, float]]:
    """The authors' curves from one or more CSVs (seed, epoch, mAP50-95): seed -> epoch -> mAP50-95."""
    curves: dict[int, dict[int, float]] = {}
    for path in paths or []:
        with open(path) as f:
            for r in csv.DictReader(f):
                curves.setdefault(int(r["seed"]), {})[int(r["epoch"])] = float(r["mAP50-95"])
    return curves


def deim_curves(rows: list[dict], row: str = "a") -> dict[int, dict[int, float]]:
    """`row`'s curves: seed -> epoch -> mAP50-95, seeds in order."""
    curves: dict[int, dict[int, float]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        if r["row"] == row:
            curves.setdefault(r["seed"], {})[r["epoch"]] = r["map"]
    return curves


def band(curves: dict[int, dict[int, float]]) -> dict[int, list[float]]:
    """epoch -> mAP50-95 of every seed in `curves`."""
    table: dict[int, list[float]] = {}
    for curve in curves.values():
        for epoch, value in curve.items():
            table.setdefault(epoch, []).append(value)
    return table


def band_gap(value: float, band: list[float]) -> float:
    """How far `value` lies outside [min(band), max(band)] (0 inside)."""
    return max(min(band) - value, value - max(band), 0.0)


def largest_gap(curve: dict[int, float], reference: dict[int, list[float]], first: int = 20) -> tuple[float, int, str]:
    """The largest `band_gap` of `curve` from epoch `first` on, its epoch and the side of the band it lies on
    ("below" or "above"; "inside" when the curve never leaves the band; (0.0, -1, "inside") when no epoch is shared)."""
    gaps = {e: band_gap(v, reference[e]) for e, v in curve.items() if e >= first and e in reference}
    if not gaps:
        return 0.0, -1, "inside"
    worst = max(gaps, key=gaps.get)
    side = "inside" if gaps[worst] == 0 else "below" if curve[worst] < min(reference[worst]) else "above"
    return gaps[worst], worst, side


def meets_check(curve: dict[int, float], reference: dict[int, list[float]], final: float, gap: float) -> bool:
    """Whether `curve` ends at `final` mAP50-95 or more and stays within `gap` of the band `reference` from epoch 20
    on (gaps compared at 1e-6, so CSV values written to three decimals meet a limit they touch exactly)."""
    return curve[max(curve)] >= final and round(largest_gap(curve, reference)[0], 6) <= gap


def reference_check_rates(
    reference: dict[int, dict[int, float]], final: float, gap: float
) -> tuple[tuple[int, int], tuple[int, int]]:
    """How often the authors' own code meets `meets_check`: (seeds passing, seeds) with each seed held against the
    band of the others, and (pairs where both pass, pairs) with each pair held against the band of the rest."""

    def passes(seed: int, left_out: tuple[int, ...]) -> bool:
        others = band({s: c for s, c in reference.items() if s not in left_out})
        return meets_check(reference[seed], others, final, gap)

    seeds = sorted(reference)
    singles = [passes(s, (s,)) for s in seeds]
    pairs = [passes(a, (a, b)) and passes(b, (a, b)) for a, b in combinations(seeds, 2)]
    return (sum(singles), len(singles)), (sum(pairs), len(pairs))


def mean_difference(ours: dict[int, list[float]], theirs: dict[int, list[float]]) -> dict[int, tuple[float, float]]:
    """epoch -> (mean of `ours` - mean of `theirs`, Welch's two-sided p-value) where both have 2 or more seeds.

    An epoch where both sides are constant (e.g. all 0.0 mAP) has no p-value and is left out: it is tested by value,
    as scipy's rounding of a zero variance can return a spurious p instead of nan."""
    shared = [
        e
        for e in sorted(ours)
        if e in theirs and min(len(ours[e]), len(theirs[e])) > 1 and len(set(ours[e])) + len(set(theirs[e])) > 2
    ]
    return {
        e: (
            statistics.mean(ours[e]) - statistics.mean(theirs[e]),
            ttest_ind(ours[e], theirs[e], equal_var=False).pvalue,
        )
        for e in shared
    }


def summarise(
    rows: list[dict], reference: dict[int, dict[int, float]], check: tuple[float, float], reference_row: str = "a"
) -> None:
    """Print final mAP (mean and range over seeds), seconds per iteration, DEIM's distance from the authors' band
    per seed (and, for calibration, each authors' seed's distance from the band of their other seeds), how often a
    seed and a pair of seeds meet the per-seed `check` (final mAP, gap) on each side, the difference of the two means
    per epoch with its Welch p-value, and DEIM's epochs to the baseline's final."""
    table = by_row(rows)
    speed = {row: statistics.mean(r["s_per_iter"] for r in rows if r["row"] == row) for row in table}
    memory = {row: max(r["peak_mib"] for r in rows if r["row"] == row) for row in table}
    for row, epochs in table.items():
        final = epochs[max(epochs)]
        print(
            f"{ROWS[row]:28s} final mAP50-95 mean {statistics.mean(final):.3f} (range {min(final):.3f}-"
            f"{max(final):.3f}, {len(final)} seed(s)), {speed[row]:.3f} s/iteration, peak {memory[row]:.0f} MiB"
        )
    for row, plain in PLAIN_ROW.items():
        if row in table and plain in table:
            gain = statistics.mean(table[row][max(table[row])]) - statistics.mean(table[plain][max(table[plain])])
            print(
                f"{ROWS[row]} vs {ROWS[plain]}: final mAP50-95 {gain:+.3f}, time per iteration "
                f"x{speed[row] / speed[plain]:.2f}, peak memory x{memory[row] / memory[plain]:.2f}"
            )
    row = reference_row  # the row the authors' curves are the reference of
    if reference and row in table:
        authors = band(reference)
        for seed, curve in deim_curves(rows, row).items():
            gap, epoch, side = largest_gap(curve, authors)
            print(f"{ROWS[row]} seed {seed} vs the authors' band ({len(reference)} seeds), epochs 20+: largest gap "
                  f"{gap:.3f} at epoch {epoch} ({side}), final {curve[max(curve)]:.3f}")  # fmt: skip
        mean = {e: statistics.mean(v) for e, v in table[row].items()}
        gap, epoch, side = largest_gap(mean, authors)
        print(f"{ROWS[row]}'s mean vs the authors' band, epochs 20+: largest gap {gap:.3f} at epoch {epoch} ({side})")
        differences = mean_difference(table[row], authors)
        for epoch, (difference, p) in differences.items():
            if epoch >= 20:
                print(f"epoch {epoch}: {ROWS[row]}'s mean - the authors' mean {difference:+.3f} (Welch p = {p:.2f})")
        if differences:
            epoch = min(differences, key=lambda e: differences[e][1])
            difference, p = differences[epoch]
            print(f"smallest p of {len(differences)} epochs: epoch {epoch}, {difference:+.3f} (p = {p:.2f})")
        for seed, curve in sorted(reference.items()) if len(reference) > 2 else ():
            others = band({s: c for s, c in reference.items() if s != seed})
            gap, epoch, side = largest_gap(curve, others)
            print(f"authors' seed {seed} vs the band of their other {len(reference) - 1} seeds, epochs 20+: largest "
                  f"gap {gap:.3f} at epoch {epoch} ({side}), final {curve[max(curve)]:.3f}")  # fmt: skip
        print_check_rates(rows, reference, *check, row)
    if "a" in table and "b" in table:
        target = statistics.mean(table["b"][max(table["b"])])
        reached = next((e for e in sorted(table["a"]) if statistics.mean(table["a"][e]) >= target), None)
        last = max(table["a"])
        if reached is None:
            print(f"DEIM's mean mAP does not reach the D-FINE baseline's final {target:.3f} in {last} epochs")
        else:
            print(f"DEIM's mean mAP reaches the D-FINE baseline's final {target:.3f} at epoch {reached} of {last}")


def print_check_rates(
    rows: list[dict], reference: dict[int, dict[int, float]], final: float, gap: float, row: str = "a"
) -> None:
    """Print how many of `row`'s seeds, and of their pairs, meet `meets_check` against the authors' whole band, and
    the same rates for the authors' own seeds held against the band of the others (with 3 or more authors' seeds)."""
    authors = band(reference)
    curves = deim_curves(rows, row)
    passed = sum(meets_check(c, authors, final, gap) for c in curves.values())
    check = f"final >= {final:.3f} and within {gap:.3f} of the authors' band from epoch 20"
    print(f"per-seed check ({check}): {ROWS[row]} {passed} of {len(curves)} seeds, both seeds of a pair "
          f"{comb(passed, 2)} of {comb(len(curves), 2)} pairs")  # fmt: skip
    if len(reference) > 2:
        (seeds, n_seeds), (pairs, n_pairs) = reference_check_rates(reference, final, gap)
        print(
            f"the same check for the authors' code: {seeds} of {n_seeds} seeds (each against the band of the others), "
            f"both seeds of a pair {pairs} of {n_pairs} pairs (each pair against the band of the rest)"
        )


def plot(rows: list[dict], curves: dict[int, dict[int, float]], title: str, path: Path) -> None:
    """Mean mAP50-95 per epoch of each row, with a band from the lowest to the highest seed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference = band(curves)
    if reference:
        x = sorted(reference)
        ax.fill_between(x, [min(reference[e]) for e in x], [max(reference[e]) for e in x], color="grey", alpha=0.25)
        ax.plot(x, [statistics.mean(reference[e]) for e in x], color="grey", ls="--", label="authors' code")
    for row, epochs in by_row(rows).items():
        x = sorted(epochs)
        mean = [statistics.mean(epochs[e]) for e in x]
        (line,) = ax.plot(x, mean, marker="o", ms=2, label=f"({row}) {ROWS[row]}")
        if any(len(epochs[e]) > 1 for e in x):
            ax.fill_between(
                x, [min(epochs[e]) for e in x], [max(epochs[e]) for e in x], color=line.get_color(), alpha=0.2
            )
    ax.set(xlabel="epoch", ylabel="val mAP50-95", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="generated dense-scene dataset, CPU-sized run")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=sorted(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--data", default="deepforest.yaml")
    parser.add_argument("--model", default="deim-n.yaml")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA (CPU runs fp32)"
    )
    parser.add_argument("--jobs", type=int, help="runs trained at once (default: see above)")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"))
    parser.add_argument("--from-csv", type=Path, nargs="+", help="only summarise and redraw from earlier CSVs")
    parser.add_argument(
        "--reference", type=Path, nargs="+", help="CSVs of the authors' per-epoch curves (seed, epoch, mAP50-95)"
    )
    parser.add_argument(
        "--reference-row", default="a", choices=sorted(ROWS), help="the row --reference is the authors' run of"
    )
    parser.add_argument(
        "--check", type=float, nargs=2, default=(0.74, 0.03), metavar=("FINAL", "GAP"),
        help="per-seed check against the authors' band: final mAP50-95 at least FINAL, within GAP from epoch 20",
    )  # fmt: skip
    args = parser.parse_args()
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more runs to train at once")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        data = "" if args.from_csv else str(make_synthetic_dataset(args.out / "dense_shapes", **QUICK_DATA))
        args.epochs, args.imgsz = args.epochs or QUICK_RUN["epochs"], args.imgsz or QUICK_DATA["imgsz"]
        args.batch = args.batch or QUICK_RUN["batch"]
    else:
        data = str(resolve_data_yaml(args.data))  # a shipped name: YOLO (row f) does not know ours
        args.epochs, args.imgsz, args.batch = args.epochs or 120, args.imgsz or 640, args.batch or 16

    if args.from_csv:
        rows = []
        for path in args.from_csv:
            with open(path) as f:
                rows += [
                    dict(r, seed=int(r["seed"]), epoch=int(r["epoch"]), map=float(r["map"]), map50=float(r["map50"]),
                         s_per_iter=float(r["s_per_iter"]), peak_mib=float(r.get("peak_mib") or "nan"))
                    for r in csv.DictReader(f)
                ]  # fmt: skip
    else:
        runs = [(row, seed) for seed in args.seeds for row in args.rows if row in SEEDED_ROWS or seed == args.seeds[0]]
        args.jobs = min(args.jobs or default_jobs(args.device), len(runs))
        start = time.perf_counter()
        rows = run_all(runs, args, data)
        print(f"{len(runs)} runs, {args.jobs} at a time: {(time.perf_counter() - start) / 60:.1f} min")
    reference = read_reference(args.reference)
    if not args.reference:
        print("no --reference given: the authors' curves are not drawn or compared")
    summarise(rows, reference, tuple(args.check), args.reference_row)
    plot(
        rows,
        reference,
        f"{args.model}{' / yolo26n' if any(r['row'] == 'f' for r in rows) else ''}, "
        f"{'dense shapes' if args.quick else args.data}",
        args.out / "convergence.png",
    )
    print(f"wrote {args.out / 'convergence.png'}" + ("" if args.from_csv else f" and {args.out / 'convergence.csv'}"))


if __name__ == "__main__":
    main()
