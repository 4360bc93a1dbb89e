"""Ultralytics' own test suite, run with a DEIM model in place of the YOLO detection model.

The suite is not ours to commit: this script downloads the sdist of the installed Ultralytics version from PyPI at
run time, rewrites its detection-model tests to DEIM (see `rewrites`), builds local stand-ins for what those tests
would download, runs pytest on the result, and compares the failures with `ultralytics_suite_expected.yaml`: each
expected failure with its category and reason (another task, a GPU, a download, an Ultralytics limit its own RT-DETR
shares, ...). `--family rtdetr` runs the same suite with Ultralytics' RT-DETR as the control of that last category.

The rewrite, as a DEIM user would write the same code:
- every `YOLO` the tests import is `deim_ultra.DEIM`, and the `yolo` command is `deim`;
- the detection YAMLs (`yolo26n.yaml`, `yolo11n.yaml`, ...) are the path of the packaged `deim-n.yaml`;
- the detection checkpoints the tests download (`yolo26n.pt`, `yolo11n.pt`, `yolo26s.pt`, the `path with spaces`
  copy) are copies of one stand-in: a DEIM-N training run's best.pt on synthetic shapes with COCO's 80 class names
  (no COCO weights are available offline), see `make_standins`;
- `coco8.yaml` finds a generated 8-image stand-in where it would download COCO8, and the solutions find generated
  videos.
Stock Ultralytics on DEIM files (`ultralytics.YOLO`, `yolo val`) is covered by tests/test_stock_ultralytics.py.

Usage (about 7 minutes on 2 CPU cores, the RT-DETR control about 13; not part of CI, see docs/benchmarks.md):
    python benchmarks/ultralytics_suite.py --work /tmp/ultralytics-suite [--family rtdetr] [-k EXPR]
Exit status 1 when a failure is not in the expected list, a listed test passes, a listed kind is never seen, or a
"shared by RT-DETR" failure passes in the control run (when its results are in the work folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import yaml

EXPECTED = Path(__file__).with_name("ultralytics_suite_expected.yaml")
CATEGORIES = (
    "another task",
    "GPU",
    "download",
    "Ultralytics limit shared by RT-DETR",
    "refused by the DEIM recipe",
    "Ultralytics class given a DEIM YAML",
)
DETECTION_WEIGHTS = ("yolo26n.pt", "yolo11n.pt", "yolo26s.pt", "path with spaces/yolo26n.pt")
VIDEOS = {  # the solutions' detection videos (name: width, height)
    "solutions_ci_demo.mp4": (640, 384),
    "solution_vertical_demo.mp4": (384, 640),
    "decelera_landscape_min.mov": (640, 384),
    "decelera_portrait_min.mov": (384, 640),
}
DETECTION_YAMLS = ("yolo26n.yaml", "yolo11n.yaml", "yolov8n.yaml", "yolov10n.yaml")


# The same suite with Ultralytics' own RT-DETR in place of YOLO is the control run: an expected failure of the category
# "Ultralytics limit shared by RT-DETR" must fail there too (`compare` checks it when that run's results exist).
FAMILIES = {
    # family: (the class the tests' `YOLO` becomes, the command of the CLI tests, the YAML of the detection tests)
    "deim": ("from deim_ultra import DEIM as YOLO", "deim", "{deim_yaml}"),
    "rtdetr": ("from ultralytics import RTDETR as YOLO", "yolo", "rtdetr-l.yaml"),
}


def rewrites(family: str) -> list[tuple[str, str, str]]:
    """(file glob, pattern, replacement) rewrites of the suite for `family`; each must match somewhere, so that a
    changed upstream suite is noticed."""
    import_line, command, detection_yaml = FAMILIES[family]
    return [
        ("test_*.py", r"(?m)^from ultralytics import .*\bYOLO\b.*$", "\\g<0>\n" + import_line),
        ("test_cli.py", r'run\((f?)"yolo ', rf'run(\1"{command} '),
        ("*.py", r'"(?:' + "|".join(re.escape(n) for n in DETECTION_YAMLS) + r')"', f'"{detection_yaml}"'),
    ]


def fetch_tests(work: Path, version: str) -> Path:
    """Download the `ultralytics==version` sdist into `work` and extract its `tests/` folder; returns that folder."""
    sdist = work.parent / f"ultralytics-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"ultralytics=={version}", "--no-deps", "--no-binary", ":all:",
             "-d", str(work.parent), "-q"],
            check=True,
        )  # fmt: skip
    tests = work / "tests"
    if tests.exists():
        shutil.rmtree(tests)
    with tarfile.open(sdist) as tar:
        prefix = f"ultralytics-{version}/tests/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(f"ultralytics-{version}/") :]
        tar.extractall(work, members=members, filter="data")
    return tests


def rewrite(tests: Path, family: str, detection_yaml: str) -> None:
    """Apply `rewrites(family)` to the extracted suite in place, the detection YAML being `detection_yaml` (a path
    for DEIM, so that Ultralytics' own classes find it too)."""
    for glob, pattern, template in rewrites(family):
        replacement = template.replace("{deim_yaml}", detection_yaml)
        hits = 0
        for file in sorted(tests.glob(glob)):
            text = file.read_text()
            new, n = re.subn(pattern, replacement, text)
            hits += n
            if n:
                file.write_text(new)
        if not hits:
            raise RuntimeError(f"rewrite {pattern!r} matched nothing in {tests}/{glob}: the upstream suite changed")


def train_standin(family: str, data: Path, project: Path) -> Path:
    """best.pt of the stand-in run of `family` (reused when present)."""
    best = project / "train" / "weights" / "best.pt"
    if best.is_file():
        return best
    settings = dict(data=str(data), imgsz=160, batch=8, workers=0, project=str(project), name="train", plots=False)
    if family == "deim":
        from deim_ultra import DEIM

        DEIM("deim-n.yaml").train(epochs=12, policy_epochs=[1, 2, 10], warmup_iters=1, seed=0, **settings)
    else:  # the control's weights need not detect anything: the numbers compared are pass / fail only
        from ultralytics import RTDETR

        RTDETR("rtdetr-l.yaml").train(epochs=1, **settings)
    return best


def make_standins(work: Path, family: str) -> None:
    """Stand-ins for what the suite downloads: the detection checkpoints, COCO8 and the solutions' videos.

    The checkpoint is a real training run's best.pt (train_args, EMA, everything a user's file holds): DEIM-N
    trained on synthetic shapes labelled with COCO's first three classes (80 names), so that it detects something in
    the stand-in videos; it detects nothing in COCO photos (bus.jpg), which is what the tests needing COCO weights
    show. `coco8.yaml` (Ultralytics' own file, `path: coco8`) finds 4 + 4 such images in the datasets folder.
    """
    import cv2
    from ultralytics.utils import ROOT, YAML

    from deim_ultra.data.synthetic import make_synthetic_dataset

    weights, datasets, assets = work / "weights", work / "datasets", work / "weights" / "solution_assets"
    names = YAML.load(ROOT / "cfg" / "datasets" / "coco8.yaml")["names"]
    coco8 = make_synthetic_dataset(datasets / "coco8", n_train=4, n_val=4, imgsz=160, seed=0, image_format="jpg")
    coco8.unlink()  # read through Ultralytics' coco8.yaml
    shapes = make_synthetic_dataset(work / "shapes", n_train=32, n_val=8, imgsz=160, max_objects=3, min_size=24, seed=1)
    shapes.write_text(yaml.safe_dump({**yaml.safe_load(shapes.read_text()), "names": names}, sort_keys=False))
    best = train_standin(family, shapes, work / "standin")
    for name in DETECTION_WEIGHTS:
        (weights / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(best, weights / name)
    assets.mkdir(parents=True, exist_ok=True)
    scenes = [
        cv2.resize(cv2.imread(str(f)), (320, 320)) for f in sorted((work / "shapes" / "images" / "val").glob("*"))
    ]
    for video, size in VIDEOS.items():
        writer = cv2.VideoWriter(str(assets / video), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
        for i in range(30):  # the shapes slide right, 8 pixels a frame, over a 320-pixel scene
            frame = cv2.resize(np.roll(scenes[i // 10 % len(scenes)], 8 * i, axis=1), size)
            writer.write(frame)
        writer.release()


def run_suite(work: Path, detection_yaml: str, extra: list[str]) -> dict[str, tuple[str, str]]:
    """Run pytest on the rewritten suite; returns {test id: (outcome, message)} from its JUnit report, with the
    detection YAML written DETECTION_YAML in the ids, so that the two families' ids compare."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        YOLO_CONFIG_DIR=str(work / "config"),
        YOLO_OFFLINE="1",
        YOLO_AUTOINSTALL="False",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    report = work / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-p", "no:cacheprovider", "-q", "-rN", f"--junitxml={report}",
         "-o", "junit_family=xunit1", "--rootdir", str(work), *extra],
        cwd=work, env=env, check=False,
    )  # fmt: skip
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{Path(case.get('file', '')).name}::{case.get('name')}".replace(detection_yaml, "DETECTION_YAML")
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "skipped" if kind == "skipped" else "failed"
                message = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                break
        results[test_id] = (outcome, message)
    return results


def expected_failures() -> list[dict]:
    """The committed list: entries with `test` (a test id, `*` for any text), `category` and `reason`."""
    entries = yaml.safe_load(EXPECTED.read_text())
    for e in entries:
        if e["category"] not in CATEGORIES:
            raise ValueError(f"{EXPECTED.name}: {e['test']}: category must be one of {CATEGORIES}")
    return entries


def matches(test_id: str, pattern: str) -> bool:
    """Whether `test_id` fits `pattern`, in which `*` stands for any text (brackets are literal, as in test ids)."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), test_id) is not None


def compare(results: dict[str, tuple[str, str]], entries: list[dict], control: dict | None) -> int:
    """Print counts, unexpected failures, expected failures that passed and, given the RT-DETR control run's
    results, "shared by RT-DETR" entries that RT-DETR passes; returns the exit status."""

    def entry_for(test_id: str) -> dict | None:
        return next((e for e in entries if matches(test_id, e["test"])), None)

    counts = {o: sum(1 for v, _ in results.values() if v == o) for o in ("passed", "failed", "skipped")}
    failed = {t: m for t, (o, m) in results.items() if o == "failed"}
    unexpected = {t: m for t, m in failed.items() if entry_for(t) is None}
    # A pattern with `*` describes a kind of test (some of which may pass); a plain id is one test that must fail.
    fixed = [t for t, (o, _) in results.items() if o == "passed" and any(e["test"] == t for e in entries)]
    stale = [e["test"] for e in entries if not any(matches(t, e["test"]) for t in failed)]
    by_category = {}
    for t in failed:
        if (e := entry_for(t)) is not None:
            by_category[e["category"]] = by_category.get(e["category"], 0) + 1
    not_shared = [
        t for t in failed
        if (e := entry_for(t)) and e["category"] == CATEGORIES[3] and control and control.get(t, ["?"])[0] != "failed"
    ]  # fmt: skip
    print(f"\n{len(results)} tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    print("expected failures by category: " + ", ".join(f"{k} {v}" for k, v in sorted(by_category.items())))
    for t, m in sorted(unexpected.items()):
        print(f"UNEXPECTED FAILURE {t}: {m}")
    for t in sorted(fixed):
        print(f"EXPECTED TO FAIL BUT PASSED {t} ({entry_for(t)['reason']})")
    for pattern in stale:
        print(f"EXPECTED FAILURE NOT SEEN {pattern} (update {EXPECTED.name})")
    for t in sorted(not_shared):
        print(f"LISTED AS SHARED BY RT-DETR BUT NOT FAILED IN THE RT-DETR RUN {t} ({control.get(t, ['absent'])[0]})")
    if control is None:
        print("(no RT-DETR control results: run with --family rtdetr to check the 'shared by RT-DETR' entries)")
    return int(bool(unexpected or fixed or not_shared or stale))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ultralytics-suite"), help="work folder (absolute)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="deim", help="rtdetr: the control run")
    parser.add_argument("-k", default=None, help="pytest -k expression, to run part of the suite")
    args = parser.parse_args()
    work = args.work.resolve() / args.family
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(YOLO_CONFIG_DIR=str(work / "config"), YOLO_OFFLINE="1", YOLO_AUTOINSTALL="False")
    from ultralytics import __version__
    from ultralytics.utils import SETTINGS

    from deim_ultra.cfg import CFG_DIR

    SETTINGS.update(weights_dir=str(work / "weights"), datasets_dir=str(work / "datasets"), runs_dir=str(work / "runs"))
    tests = fetch_tests(work, __version__)
    detection_yaml = FAMILIES[args.family][2].replace("{deim_yaml}", str(CFG_DIR / "deim-n.yaml"))
    rewrite(tests, args.family, detection_yaml)
    make_standins(work, args.family)
    extra = ["-k", args.k] if args.k else []
    results = run_suite(work, detection_yaml, extra)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if args.family != "deim":
        return 0
    control = args.work.resolve() / "rtdetr" / "results.json"
    return compare(results, expected_failures(), json.loads(control.read_text()) if control.is_file() else None)


if __name__ == "__main__":
    sys.exit(main())
