"""A NaN in training never reaches the weights: the step is skipped and logged, a run that keeps diverging stops."""

import logging

import pytest
import torch

from deim_ultra import DEIM
from deim_ultra.nn.hgnetv2 import HGStem
from deim_ultra.nonfinite import DivergedError, NonFiniteSteps

SETTINGS = dict(epochs=2, imgsz=64, batch=4, workers=0, policy_epochs=[1, 1, 2], warmup_iters=1, plots=False, seed=0)


def poison_forwards(model: DEIM, bad: set[int]) -> None:
    """From training start, turn the stem's output into NaN on the training forwards numbered in `bad` (1-based).

    This is what an overflow in the forward pass does (fp16 AMP): every loss term and gradient of the batch is NaN.
    """
    seen = {"forwards": 0}

    def hook(module, inputs, output):
        if not module.training:
            return output
        seen["forwards"] += 1
        return output * float("nan") if seen["forwards"] in bad else output

    def install(trainer):
        stem = next(m for m in trainer.model.modules() if isinstance(m, HGStem))
        stem.register_forward_hook(hook)

    model.add_callback("on_train_start", install)


def all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def checkpoint_weights(path) -> torch.nn.Module:
    """The weights a checkpoint carries: its EMA, or its model once Ultralytics' final strip moved the EMA there."""
    ckpt = torch.load(path, weights_only=False)
    return ckpt["ema"] or ckpt["model"]


def test_a_nan_batch_is_skipped_and_training_goes_on(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ultralytics")
    model = DEIM("deim-n.yaml")
    poison_forwards(model, bad={2})
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", **SETTINGS)
    trainer = model.trainer
    assert trainer.nonfinite.total == 1
    assert all_finite(trainer.model)  # weights and BatchNorm statistics: the NaN batch's running stats were restored
    assert all_finite(checkpoint_weights(trainer.last))
    skipped = next(r.getMessage() for r in caplog.records if "optimizer step skipped" in r.getMessage())
    assert "Non-finite loss nan at epoch 1" in skipped
    assert sum(name in skipped for name in (p.name for p in (tiny_data.parent / "images" / "train").iterdir())) == 4
    assert "Epoch 1: 1 optimizer step(s) skipped this epoch" in caplog.text
    assert "Epoch 2: " not in caplog.text  # the count restarts with each epoch


def test_a_nan_last_batch_does_not_make_ultralytics_redo_the_epoch(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ultralytics")
    model = DEIM("deim-n.yaml")
    poison_forwards(model, bad={4})  # 2 batches per epoch: the last batch of epoch 2
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", **{**SETTINGS, "epochs": 3})
    assert model.trainer.nonfinite.total == 1 and "Epoch 2: 1 optimizer step(s) skipped" in caplog.text
    assert "recovering from last.pt" not in caplog.text  # Ultralytics' own NaN check would reload and redo epoch 2
    rows = (tmp_path / "run" / "results.csv").read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == [1, 2, 3]


def test_a_run_that_keeps_diverging_stops_and_keeps_its_last_checkpoint(tiny_data, tmp_path):
    model = DEIM("deim-n.yaml")
    poison_forwards(model, bad=set(range(3, 100)))  # epoch 1 has 2 batches: epoch 2 is NaN from its first batch
    with pytest.raises(DivergedError, match=r"3 optimizer steps in a row had a non-finite loss .*images .*\.png"):
        settings = {**SETTINGS, "epochs": 4, "nonfinite_patience": 3}
        model.train(data=str(tiny_data), project=str(tmp_path), name="run", **settings)
    last = torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=False)
    assert last["epoch"] == 1 and all_finite(last["ema"])  # epoch 2 finished with every step skipped
    assert all_finite(model.trainer.model)


def test_gradients_are_judged_only_without_an_amp_scaler():
    steps = NonFiniteSteps(patience=0)
    finite, files = torch.tensor(1.0), ["a.jpg"]
    assert steps.skip(finite, torch.tensor(float("inf")), files, "epoch 1")  # no scaler: an overflow is skipped here
    assert not steps.skip(finite, None, files, "epoch 1")  # an enabled GradScaler skips overflowing steps itself
    assert steps.skip(torch.tensor(float("nan")), None, files, "epoch 1")  # a NaN loss always counts
    assert (steps.total, steps.consecutive) == (2, 1)
    steps.patience = 2
    steps.check_patience()  # one skip in a row: training goes on
    assert steps.skip(torch.tensor(float("inf")), None, files, "epoch 2")
    with pytest.raises(DivergedError, match="2 optimizer steps in a row had a non-finite loss .*epoch 2.*a.jpg"):
        steps.check_patience()


@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e-8), (torch.float16, torch.finfo(torch.float16).tiny)])
def test_adamw_epsilon_keeps_half_precision_steps_finite(dtype, eps):
    """A zero gradient leaves Adam's second moment at 0; in float16 an epsilon of 1e-8 is 0 and the step is 0 / 0."""
    from deim_ultra.recipe.optim import build_adamw

    weight = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    optimizer = build_adamw([{"params": [weight]}], lr=1e-3, weight_decay=0.0)
    assert optimizer.param_groups[0]["eps"] == eps
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(4, dtype=dtype))
    if dtype == torch.float16:  # the default epsilon would have written NaN
        plain = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        plain.grad = torch.zeros_like(plain)
        torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.0).step()
        assert plain.isnan().all()
