"""Test session set-up: Ultralytics offline and isolated, shared tiny datasets and paths."""

import os
import tempfile
from pathlib import Path

# Ultralytics reads these at import time: no downloads, no auto-installs, settings outside the user's home.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="deim-yolo-cfg-"))

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PARITY = SHARED / "parity" / "deim_n_official.pt"


@pytest.fixture(scope="session")
def parity_fixture() -> dict:
    """The authors' DEIM-N tensors, or a skip when ../shared is not beside the repository."""
    if not PARITY.is_file():
        pytest.skip(f"parity fixture not found at {PARITY} (../shared absent)")
    import torch

    return torch.load(PARITY, weights_only=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A generated 3-class shapes dataset: 8 train and 4 val images of 160 px; returns its data YAML."""
    from deim_ultra.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, imgsz=160, seed=0)


@pytest.fixture(scope="session")
def easy_data(tmp_path_factory) -> Path:
    """One class, 1-2 large shapes per 96-px image: a set DEIM-N from scratch detects something on within minutes."""
    from deim_ultra.data.synthetic import make_synthetic_dataset

    from helpers import EASY_IMGSZ

    root = tmp_path_factory.mktemp("easy")
    return make_synthetic_dataset(
        root, n_train=16, n_val=4, imgsz=EASY_IMGSZ, nc=1, max_objects=2, min_size=30, max_size=60
    )


@pytest.fixture(scope="session")
def easy_trained(easy_data, tmp_path_factory) -> Path:
    """best.pt of DEIM-N trained 12 epochs on `easy_data` (a non-zero mAP to compare, distinct scores)."""
    from deim_ultra import DEIM

    from helpers import EASY_IMGSZ

    project = tmp_path_factory.mktemp("easy_run")
    settings = dict(
        epochs=12, imgsz=EASY_IMGSZ, batch=4, workers=0, plots=False, policy_epochs=[1, 2, 10], warmup_iters=1
    )
    DEIM("deim-n.yaml").train(
        data=str(easy_data), project=str(project), name="run", lr0=2e-3, backbone_lr=1e-3, seed=0, **settings
    )
    return project / "run" / "weights" / "best.pt"
