"""Ultralytics bodies that `DEIMTrainer` repeats: a change upstream must be seen, so that the copy is brought along.

Each entry pins the source of the Ultralytics method that a DEIM method repeats (with its changes, named in its
docstring). When Ultralytics changes that method, this test fails: compare the two, carry the change over, and
update the hash.
"""

import hashlib
import inspect

import pytest
from ultralytics.engine.trainer import BaseTrainer

from deim_ultra.train import DEIMTrainer

# Ultralytics 8.4.190, ultralytics/engine/trainer.py: BaseTrainer.optimizer_step (lines 909-920) and final_eval
# (lines 1005-1022).
COPIES = {"optimizer_step": "bec16cbc552a8f2d", "final_eval": "398e74e935f34789"}


@pytest.mark.parametrize("method", sorted(COPIES))
def test_repeated_ultralytics_methods_are_unchanged_upstream(method):
    source = inspect.getsource(getattr(BaseTrainer, method))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == COPIES[method], (
        f"Ultralytics changed BaseTrainer.{method}, which DEIMTrainer.{method} repeats: carry the change over, then "
        "update the hash in tests/test_upstream_copies.py"
    )
    assert method in vars(DEIMTrainer)  # the copy still exists; drop the entry when it goes
