"""`benchmarks/convergence.py`: the summary it prints from recorded curves (figures worked out by hand), runs
trained side by side giving the runs trained one after the other, and a shipped dataset name reaching YOLO's row."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = """row,seed,epoch,map,map50,s_per_iter
a,0,19,0.10,0.2,0.5
a,0,20,0.20,0.3,0.5
a,0,21,0.32,0.4,0.5
a,1,19,0.10,0.2,0.7
a,1,20,0.40,0.5,0.7
a,1,21,0.47,0.6,0.7
b,0,19,0.20,0.3,0.6
b,0,20,0.30,0.4,0.6
b,0,21,0.35,0.5,0.6
"""
AUTHORS = """seed,epoch,mAP50-95
0,19,0.10
0,20,0.25
0,21,0.38
1,19,0.10
1,20,0.30
1,21,0.45
2,19,0.10
2,20,0.35
2,21,0.40
"""


def convergence(tmp_path: Path, *options: str) -> str:
    """Run benchmarks/convergence.py with `options`; its stdout."""
    command = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), *options]
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=True).stdout


def summary(tmp_path: Path, ours: str, *options: str) -> str:
    """What `convergence.py --from-csv` prints for the curves `ours` against AUTHORS."""
    (tmp_path / "ours.csv").write_text(ours)
    (tmp_path / "authors.csv").write_text(AUTHORS)
    return convergence(
        tmp_path, "--quick", "--out", str(tmp_path), "--from-csv", str(tmp_path / "ours.csv"),
        "--reference", str(tmp_path / "authors.csv"), *options,
    )  # fmt: skip


def test_summary_from_recorded_curves(tmp_path):
    out = summary(tmp_path, OURS)

    # finals 0.32 and 0.47; s/iteration over both seeds' rows (0.5 x 3, 0.7 x 3)
    assert "final mAP50-95 mean 0.395 (range 0.320-0.470, 2 seed(s)), 0.600 s/iteration" in out
    # authors' band: epoch 20 [0.25, 0.35], epoch 21 [0.38, 0.45]
    seed_line = "DEIM seed {} vs the authors' band (3 seeds), epochs 20+: largest gap {}"
    assert seed_line.format(0, "0.060 at epoch 21 (below), final 0.320") in out
    assert seed_line.format(1, "0.050 at epoch 20 (above), final 0.470") in out
    # 0.30 and 0.395 lie inside
    assert "DEIM's mean vs the authors' band, epochs 20+: largest gap 0.000 at epoch 20 (inside)" in out
    # means 0.30 v 0.30 (t = 0) at epoch 20, 0.395 v 0.41 at 21; epoch 19 is constant on both sides: no p-value
    assert "epoch 20: DEIM's mean - the authors' mean +0.000 (Welch p = 1.00)" in out
    assert "epoch 21: DEIM's mean - the authors' mean -0.015" in out
    assert "smallest p of 2 epochs: epoch 21, -0.015" in out
    # the authors' seed 0 against the band of seeds 1 and 2: epoch 20 [0.30, 0.35], epoch 21 [0.40, 0.45]
    assert (
        "authors' seed 0 vs the band of their other 2 seeds, epochs 20+: largest gap 0.050 at epoch 20 (below)," in out
    )
    assert "reaches the D-FINE baseline's final 0.350 at epoch 21 of 21" in out  # mean 0.30 at 20, 0.395 at 21
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_summary_when_deim_never_reaches_the_baseline(tmp_path):
    out = summary(tmp_path, OURS.replace("b,0,21,0.35", "b,0,21,0.50"))  # DEIM's mean peaks at 0.395
    assert "DEIM's mean mAP does not reach the D-FINE baseline's final 0.500 in 21 epochs" in out


def test_per_seed_check_counts_seeds_and_pairs_on_both_sides(tmp_path):
    out = summary(tmp_path, OURS, "--check", "0.35", "0.07")
    # DEIM seed 0 ends at 0.32 < 0.35; seed 1 ends at 0.47, 0.050 above the band at epoch 20: 1 of 2, no pair
    assert "per-seed check (final >= 0.350 and within 0.070 of the authors' band from epoch 20): DEIM 1 of 2 " in out
    assert "both seeds of a pair 0 of 1 pairs" in out
    # Each authors' seed against the other two lies 0.05 out at most (finals 0.38 / 0.45 / 0.40): 3 of 3.
    # Pairs against the one seed left: (0, 1) vs 2: seed 0 is 0.10 below at epoch 20; (0, 2) vs 1: 0.07 and 0.05,
    # both pass (0.45 - 0.38 touches 0.07); (1, 2) vs 0: seed 2 is 0.10 above at epoch 20. So 1 of 3.
    assert (
        "the same check for the authors' code: 3 of 3 seeds (each against the band of the others), both seeds " in out
    )
    assert "of a pair 1 of 3 pairs (each pair against the band of the rest)" in out
    # Seed 1's gap is 0.40 - 0.35, 0.05000000000000002 in floating point: a limit of 0.05 counts it as met.
    assert "from epoch 20): DEIM 1 of 2 seeds" in summary(tmp_path, OURS, "--check", "0.35", "0.05")


def training_history(run_dir: Path) -> list[dict]:
    """A run's results.csv without its wall-clock column."""
    with open(run_dir / "results.csv") as f:
        return [{k.strip(): v for k, v in r.items() if k.strip() != "time"} for r in csv.DictReader(f)]


def test_runs_side_by_side_train_as_runs_one_after_the_other(tmp_path, tiny_data):
    options = ["--data", str(tiny_data), "--rows", "a", "--seeds", "0", "1", "--epochs", "2", "--imgsz", "64"]
    options += ["--batch", "4", "--workers", "0"]
    alone = convergence(tmp_path, *options, "--jobs", "1", "--out", str(tmp_path / "alone"))
    together = convergence(tmp_path, *options, "--jobs", "2", "--out", str(tmp_path / "together"))

    assert "2 runs, 1 at a time" in alone and "2 runs, 2 at a time" in together
    for seed in (0, 1):
        name = f"a_seed{seed}"
        assert training_history(tmp_path / "together" / name) == training_history(tmp_path / "alone" / name)
        assert "mAP50-95" in (tmp_path / "together" / f"{name}.log").read_text()  # its console output, kept apart
    # the two seeds train differently, so the equality above is not that of two identical runs
    assert training_history(tmp_path / "alone" / "a_seed0") != training_history(tmp_path / "alone" / "a_seed1")


def test_a_failed_run_side_by_side_keeps_the_others_and_names_its_log(tmp_path, tiny_data):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--data", str(tiny_data), "--rows", "a"]
    command += ["f", "--seeds", "0", "--epochs", "1", "--imgsz", "64", "--batch", "4", "--workers", "0", "--jobs", "2"]
    command += ["--model", "no-such-model.yaml", "--out", str(out)]  # row a trains this; row f trains YOLO26n
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    assert result.returncode != 0
    assert f"1 of 2 runs failed; the runs that ended are in {out / 'convergence.csv'}" in result.stderr
    assert f"(log {out / 'a_seed0.log'})" in result.stderr and "no-such-model.yaml" in result.stderr
    with open(out / "convergence.csv") as f:
        assert {(r["row"], r["epoch"]) for r in csv.DictReader(f)} == {("f", "1")}


@pytest.mark.skipif(os.environ.get("DEIM_SKIP_NETWORK") == "1", reason="DEIM_SKIP_NETWORK=1: PyPI download opted out")
def test_yolo_row_trains_on_a_dataset_given_by_its_shipped_name(tmp_path):
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    settings = f"from ultralytics.utils import SETTINGS; SETTINGS.update(datasets_dir={str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", settings], env=env, check=True)  # deepforest is built under tmp_path
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--data", "deepforest.yaml", "--rows", "f"]
    command += ["--seeds", "0", "--epochs", "1", "--imgsz", "64", "--batch", "16", "--workers", "0", "--out", str(out)]
    subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=True)

    assert len(list((tmp_path / "deepforest" / "images" / "train").glob("*.png"))) == 58
    with open(out / "convergence.csv") as f:
        assert [(r["row"], r["epoch"]) for r in csv.DictReader(f)] == [("f", "1")]


def test_upstream_suite_comparison_flags_each_kind_of_surprise():
    """`benchmarks/ultralytics_suite.py`'s verdict on recorded results: an unlisted failure, a listed single test that
    passes, a listed kind nothing fails, and a "shared by RT-DETR" failure the control run passes all fail the run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ultralytics_suite as suite
    finally:
        sys.path.pop(0)
    assert suite.expected_failures()  # the committed list parses, every category known
    assert suite.matches("test_x.py::test_a[pose-m.pt]", "*[pose-*")  # brackets are literal, `*` is any text
    assert not suite.matches("test_x.py::test_a[p]", "test_x.py::test_a[pq]")
    entries = [
        {"test": "t.py::test_seg[*", "category": "another task", "reason": "r"},
        {"test": "t.py::test_ncnn", "category": "Ultralytics limit shared by RT-DETR", "reason": "r"},
    ]
    ok = {"t.py::test_seg[a]": ("failed", "m"), "t.py::test_seg[b]": ("passed", ""), "t.py::test_ncnn": ("failed", "m")}
    assert suite.compare(ok, entries, {"t.py::test_ncnn": ["failed", "m"]}) == 0
    assert suite.compare({**ok, "t.py::test_new": ("failed", "m")}, entries, None) == 1  # unlisted failure
    assert suite.compare({**ok, "t.py::test_ncnn": ("passed", "")}, entries, None) == 1  # listed one passes
    assert suite.compare({"t.py::test_ncnn": ("failed", "m")}, entries, None) == 1  # nothing fits test_seg[*
    assert suite.compare(ok, entries, {"t.py::test_ncnn": ["passed", ""]}) == 1  # RT-DETR does not share it


def test_ms_detr_rows_against_their_plain_rows(tmp_path):
    ours = """row,seed,epoch,map,map50,s_per_iter,peak_mib
a,0,21,0.30,0.5,0.50,1000
a,1,21,0.40,0.5,0.50,1100
g,0,21,0.38,0.5,0.60,1200
g,1,21,0.42,0.5,0.60,1210
"""
    out = summary(tmp_path, ours)
    assert "DEIM + MS-DETR               final mAP50-95 mean 0.400" in out and "peak 1210 MiB" in out
    # finals 0.35 v 0.40; 0.60 / 0.50 s per iteration; peaks (largest over seeds) 1210 / 1100
    assert "DEIM + MS-DETR vs DEIM: final mAP50-95 +0.050, time per iteration x1.20, peak memory x1.10" in out
