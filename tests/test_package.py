"""What a fresh clone and its wheel hold: every file the docs name is tracked, every shipped YAML is in the wheel and
resolves by bare name from an empty directory."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")), "examples"]
# Repository paths as the docs write them, e.g. `deim_ultra/cfg/datasets/deepforest.yaml` or docs/mal_vs_vfl.png.
PATH_PATTERN = re.compile(r"\b((?:deim_ultra|docs|examples|benchmarks|tests)/[\w./-]*\w\.(?:py|yaml|md|png|csv))\b")


def git(*args: str) -> list[str]:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0 and "not a git repository" in result.stderr:
        pytest.skip("not a git checkout")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def tracked_package_yamls() -> list[str]:
    """Model and dataset YAMLs of the package (default.yaml holds settings, not a model)."""
    return [f for f in git("ls-files", "deim_ultra/cfg") if f.endswith(".yaml") and not f.endswith("default.yaml")]


def test_no_package_file_is_ignored():
    untracked = git("ls-files", "--others", "--ignored", "--exclude-standard", "deim_ultra")
    ignored = [f for f in untracked if ".pyc" not in f]
    assert ignored == [], f"ignored by .gitignore, so missing from every clone: {ignored}"


def test_every_file_the_docs_name_is_tracked():
    tracked = set(git("ls-files"))
    named = set()
    for doc in DOCS:
        for path in (REPO / doc).rglob("*") if (REPO / doc).is_dir() else [REPO / doc]:
            if path.suffix in {".md", ".py"}:
                named |= set(PATH_PATTERN.findall(path.read_text()))
    assert "deim_ultra/cfg/datasets/deepforest.yaml" in named  # the pattern finds what the README names
    assert sorted(named - tracked) == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(out.glob("deim_ultra-*.whl"))


def test_wheel_holds_every_tracked_package_file(wheel):
    members = set(zipfile.ZipFile(wheel).namelist())
    wanted = [f for f in git("ls-files", "deim_ultra") if f.endswith((".py", ".yaml"))]
    assert "deim_ultra/cfg/datasets/deepforest.yaml" in wanted
    assert sorted(set(wanted) - members) == []


RESOLVE = """
import json, sys
from pathlib import Path
import deim_ultra
from deim_ultra.cfg import resolve_data_yaml, resolve_model_yaml
from ultralytics.utils import YAML
out = {"package": deim_ultra.__file__, "resolved": {}}
for name in sys.argv[1:]:
    kind = "data" if "/datasets/" in name else "model"
    path = Path((resolve_data_yaml if kind == "data" else resolve_model_yaml)(Path(name).name))
    out["resolved"][name] = [str(path.resolve()), sorted(YAML.load(path))]
print(json.dumps(out))
"""


def test_shipped_yamls_resolve_by_bare_name_from_an_empty_directory(wheel, tmp_path):
    site, cwd = tmp_path / "site", tmp_path / "empty"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    names = tracked_package_yamls()
    result = subprocess.run(
        [sys.executable, "-c", RESOLVE, *names],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(site)  # the wheel's copy, not this checkout
    for name in names:
        resolved, keys = out["resolved"][name]
        assert Path(resolved) == (site / name).resolve()
        assert ("names" in keys and "download" in keys) if "/datasets/" in name else ("backbone" in keys)
