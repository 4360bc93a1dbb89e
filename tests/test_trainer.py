"""The DEIM recipe as the trainer actually runs it: stages per epoch, denser batches, FlatCosine lr, resume."""

import copy
import csv
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from deim_ultra import DEIM
from deim_ultra.data.synthetic import make_synthetic_dataset

POLICY = [2, 4, 6]  # warmup epochs 0-1, Dense O2O 2-3, augment 4-5, no-aug tail 6-7
EPOCHS = 8
STAGES = ["warmup"] * 2 + ["dense_o2o"] * 2 + ["aug"] * 2 + ["no_aug"] * 2
LR0, LR_GAMMA = 8e-4, 0.5
SETTINGS = dict(
    epochs=EPOCHS,
    imgsz=128,
    batch=4,
    workers=2,
    policy_epochs=POLICY,
    warmup_iters=1,
    lrf=LR_GAMMA,
    plots=False,
    seed=0,
)


class Run(NamedTuple):
    """What the fixture run records: stage per epoch, results.csv rows, EMA at each tail epoch's start, weights dir."""

    stages: list
    rows: list
    tail_states: dict
    weights: Path


class Interrupt(Exception):
    """Stops a run from a callback, as a crash or Ctrl-C would."""


def record_stages(model: DEIM, stages: list) -> None:
    """Log, per epoch, the stage the training set's pipeline was really in."""
    model.add_callback("on_train_epoch_end", lambda t: stages.append(t.train_loader.dataset.stage))


def results(run: Path) -> list[dict]:
    with open(run / "results.csv") as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes16"), n_train=16, n_val=4, imgsz=128, seed=0)


def record_tail_starts(model: DEIM, states: dict) -> None:
    """Keep the EMA weights each tail epoch starts training from (first batch, after any restart)."""

    def record(trainer) -> None:
        if trainer.epoch >= POLICY[2] and trainer.batch_in_epoch == 0:
            states[trainer.epoch] = {k: v.clone() for k, v in trainer.ema.ema.state_dict().items()}

    model.add_callback("on_train_batch_start", record)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    project = tmp_path_factory.mktemp("full")
    model, stages, tail_states = DEIM("deim-n.yaml"), [], {}
    record_stages(model, stages)
    record_tail_starts(model, tail_states)
    model.train(data=str(data), project=str(project), name="run", save_period=1, **SETTINGS)
    return Run(stages, results(project / "run"), tail_states, project / "run" / "weights")


def test_stage_per_epoch(full_run):
    stages = full_run.stages
    assert stages == STAGES


def test_dense_o2o_batches_carry_more_boxes(full_run):
    rows = full_run.rows
    per_stage = {s: [r["train/pos_per_img"] for r, st in zip(rows, STAGES) if st == s] for s in set(STAGES)}
    mean = {s: sum(v) / len(v) for s, v in per_stage.items()}
    assert mean["dense_o2o"] > 1.5 * mean["warmup"]  # mosaic (4 images) and mixup (2) in the workers' batches
    assert mean["no_aug"] == pytest.approx(mean["warmup"])  # the same un-augmented boxes


def test_lr_is_flat_then_cosine_then_constant(full_run):
    rows = full_run.rows
    lr = [r["lr/pg2"] for r in rows]  # encoder/decoder weights at lr0; recorded at each epoch's last iteration
    assert lr[:4] == pytest.approx([LR0] * 4)  # warmup of 1 iteration, then flat until e1
    assert LR0 > lr[4] > lr[5] > LR0 * LR_GAMMA  # cosine between e1 and e2
    assert lr[6:] == pytest.approx([LR0 * LR_GAMMA] * 2)  # constant tail
    assert [r["lr/pg0"] for r in rows][0] == pytest.approx(LR0 / 2)  # the N recipe's backbone lr


def test_resume_mid_dense_o2o(full_run, data, tmp_path):
    model, stages = DEIM("deim-n.yaml"), []
    record_stages(model, stages)

    def stop_after_third_epoch(trainer):
        if trainer.epoch == 2:
            raise Interrupt

    model.add_callback("on_fit_epoch_end", stop_after_third_epoch)
    with pytest.raises(Interrupt):
        model.train(data=str(data), project=str(tmp_path), name="run", **SETTINGS)
    last = tmp_path / "run" / "weights" / "last.pt"

    resumed, resumed_stages = DEIM(last), []
    record_stages(resumed, resumed_stages)
    resumed.train(resume=True)
    assert stages + resumed_stages == STAGES  # epoch 4 (index 3) resumes inside Dense O2O
    full = full_run.rows
    rows = results(tmp_path / "run")
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    for key in ("lr/pg0", "lr/pg1", "lr/pg2"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full])


def test_resume_of_a_checkpoint_older_than_a_setting(tiny_data, tmp_path):
    """A last.pt written before a DEIM setting existed (here `freeze_norm`) resumes with that setting at its default."""
    model = DEIM("deim-n.yaml")

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 0:
            raise Interrupt

    model.add_callback("on_fit_epoch_end", stop_after_first_epoch)
    with pytest.raises(Interrupt):
        model.train(data=str(tiny_data), project=str(tmp_path), name="run", epochs=2, imgsz=64, batch=4, workers=0)
    last = tmp_path / "run" / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    del ckpt["train_args"]["freeze_norm"]  # as deim-ultra versions before the setting saved it
    torch.save(ckpt, last)

    resumed = DEIM(last)
    resumed.train(resume=True)
    assert [r["epoch"] for r in results(tmp_path / "run")] == [1, 2]
    assert resumed.trainer.args.freeze_norm is None


KILLED_MID_EPOCH = textwrap.dedent(
    """
    import json, os, signal, sys
    from deim_ultra import DEIM

    data, project, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def kill_in_fourth_epoch(trainer):  # after epoch 3 was saved, halfway through epoch 4 (Dense O2O)
        if trainer.epoch == 3 and trainer.batch_in_epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    model = DEIM("deim-n.yaml")
    model.add_callback("on_train_batch_end", kill_in_fourth_epoch)
    model.train(data=data, project=project, name="run", **settings)
    """
)


def test_sigkill_mid_epoch_then_resume(full_run, data, tmp_path):
    """A training process killed with SIGKILL mid-epoch resumes from its last saved epoch with the uninterrupted run's
    EMA and optimizer state, stages and lr."""
    script = tmp_path / "child.py"
    script.write_text(KILLED_MID_EPOCH)
    child = subprocess.run(
        [sys.executable, str(script), str(data), str(tmp_path), json.dumps(SETTINGS)], capture_output=True, timeout=600
    )
    assert child.returncode == -signal.SIGKILL
    resumed, resumed_stages, at_start = DEIM(tmp_path / "run" / "weights" / "last.pt"), [], {}
    record_stages(resumed, resumed_stages)

    def keep_resumed_state(trainer):
        at_start["ema"] = {k: v.clone() for k, v in trainer.ema.ema.state_dict().items()}
        at_start["optimizer"] = copy.deepcopy(trainer.optimizer.state_dict()["state"])  # the live moments change

    resumed.add_callback("on_train_start", keep_resumed_state)
    resumed.train(resume=True)
    assert resumed_stages == STAGES[3:]  # epoch 4 again, in Dense O2O
    uninterrupted = torch.load(full_run.weights / "epoch2.pt", weights_only=False)  # after epoch 3, 0-based name
    ema = uninterrupted["ema"].float().state_dict()
    assert all(torch.equal(at_start["ema"][k].float(), v.float()) for k, v in ema.items())
    state = uninterrupted["optimizer"]["state"]
    assert state.keys() == at_start["optimizer"].keys()
    for i, moments in state.items():
        assert torch.equal(at_start["optimizer"][i]["exp_avg"].half(), moments["exp_avg"].half())
    rows, full = results(tmp_path / "run"), full_run.rows
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    for key in ("lr/pg0", "lr/pg1", "lr/pg2"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full])


def test_recipe_trains_ultralytics_rtdetr(data, tmp_path):
    """Ultralytics' rtdetr-l.yaml with MAL and the schedule: no distribution head, so no FGL/DDF terms."""
    model = DEIM("rtdetr-l.yaml")
    model.train(
        data=str(data),
        project=str(tmp_path),
        name="rt",
        **{**SETTINGS, "epochs": 2, "imgsz": 64, "recipe": "n", "policy_epochs": [1, 1, 2], "workers": 0},
    )
    assert type(model.trainer.model).__name__ == "RTDETRDEIMModel"
    rows = results(tmp_path / "rt")
    assert all(r["train/mal"] > 0 and r["train/fgl"] == 0 and r["train/ddf"] == 0 for r in rows)


def test_trainer_survives_ddp_rebuild(data, tmp_path):
    """Ultralytics' DDP workers rebuild the trainer from pickled args and callbacks, with Ultralytics' default cfg."""
    import cloudpickle  # what Ultralytics uses to ship the trainer state to DDP workers
    from ultralytics.utils import DEFAULT_CFG_DICT

    from deim_ultra.recipe.hooks import on_train_batch_start, on_train_epoch_start
    from deim_ultra.train import DEIMTrainer

    trainer = DEIMTrainer(overrides=dict(model="deim-s.yaml", data=str(data), project=str(tmp_path), name="ddp"))
    state = cloudpickle.loads(
        cloudpickle.dumps({"trainer": type(trainer), "args": vars(trainer.args), "callbacks": trainer.callbacks})
    )
    worker = state["trainer"](
        cfg={**DEFAULT_CFG_DICT, "save_dir": ""}, overrides=state["args"], _callbacks=state["callbacks"]
    )
    assert worker.args.recipe == "s" and worker.args.backbone_lr == 2e-4 and worker.args.lr0 == 4e-4
    assert worker.callbacks["on_train_epoch_start"].count(on_train_epoch_start) == 1
    assert worker.callbacks["on_train_batch_start"].count(on_train_batch_start) == 1


def test_multiscale_batches_until_the_tail(data, tmp_path):
    """S recipe at 640: each batch takes one size of the spec's list while augmenting, the base size in the tail."""
    import torch

    from deim_ultra.recipe.schedule import multiscale_sizes
    from deim_ultra.train import DEIMTrainer

    trainer = DEIMTrainer(overrides=dict(model="deim-s.yaml", data=str(data), imgsz=640, project=str(tmp_path)))
    allowed = [480, 512, 544, 576, 608] + [640] * 20 + [672, 704, 736, 768, 800]
    assert trainer.args.multi_scale == 0.25  # filled by the recipe, so Ultralytics sees the range in use
    assert multiscale_sizes(640, trainer.args.base_size_repeat, trainer.args.multi_scale) == allowed
    image = torch.randint(0, 256, (2, 3, 640, 640), dtype=torch.uint8)

    def batch():
        return {
            "img": image.clone(),
            "cls": torch.zeros(0, 1),
            "bboxes": torch.zeros(0, 4),
            "batch_idx": torch.zeros(0),
        }

    trainer.stage = "aug"
    images = [trainer.preprocess_batch(batch())["img"] for _ in range(60)]
    sizes = [img.shape[-1] for img in images]
    assert set(sizes) <= set(allowed) and len(set(sizes)) > 1 and sizes.count(640) > len(sizes) / 3
    for img in images:  # resized once, from the original: Ultralytics' own multi-scale does not run on top
        once = torch.nn.functional.interpolate(image.float() / 255, size=img.shape[-2:], mode="nearest")
        assert torch.equal(img, once if img.shape[-1] != 640 else image.float() / 255)
    trainer.stage = "no_aug"
    assert {trainer.preprocess_batch(batch())["img"].shape[-1] for _ in range(5)} == {640}


def test_rtdetr_checkpoint_fine_tunes_with_the_deim_loss(data, tmp_path):
    """An Ultralytics RT-DETR checkpoint (rtdetr-l.pt's architecture) loads in DEIM and keeps its weights."""
    import torch
    from ultralytics import RTDETR

    from deim_ultra.nn.tasks import RTDETRDEIMModel
    from deim_ultra.train import DEIMTrainer

    checkpoint = tmp_path / "rtdetr-l.pt"
    RTDETR("rtdetr-l.yaml").save(checkpoint)
    model = DEIM(checkpoint)
    trainer = DEIMTrainer(overrides=dict(model=str(checkpoint), data=str(data), recipe="l", project=str(tmp_path)))
    trained = trainer.get_model(cfg=model.model.yaml, weights=model.model, verbose=False)
    assert isinstance(trained, RTDETRDEIMModel)
    assert trainer.args.lr0 == 5e-4 and trainer.args.backbone_lr == 2.5e-5  # the L recipe
    source, target = model.model.state_dict(), trained.state_dict()
    same = [k for k in source if k in target and source[k].shape == target[k].shape]
    dropped = [k for k in source if k not in target]  # recipe l freezes the backbone's norms, which keep no counter
    assert dropped and all(k.endswith("num_batches_tracked") for k in dropped)
    assert len(same) > 0.95 * (len(source) - len(dropped))
    assert all(torch.equal(source[k].float(), target[k].float()) for k in same)


def test_tail_restarts_from_the_best_epoch_before_it(full_run):
    """The tail's first epoch starts from the best pre-tail epoch's state; the next one only if the first did not
    beat it (the authors' rule, `restore_before`)."""
    import torch

    from deim_ultra.recipe.tail_restart import restore_before

    rows = full_run.rows
    maps = [r["metrics/mAP50-95(B)"] for r in rows]
    saved = torch.load(full_run.weights / "best_stage1.pt", weights_only=True)
    assert saved["epoch"] == maps[: POLICY[2]].index(max(maps[: POLICY[2]]))  # the first epoch with the best mAP
    states = full_run.tail_states
    same = [all(torch.equal(states[e][k], v) for k, v in saved["ema"].items()) for e in (6, 7)]
    assert same[0]
    assert same[1] == restore_before(7, maps, POLICY[2])


def test_validation_leaves_the_training_batches_alone(tiny_data, tmp_path):
    """With a fixed seed, a run that validates after every epoch trains on the same batches as one that does not.

    On CPU the augmentations draw from the process's global random streams, which validation also draws from (one
    colour-order coin per val image in Ultralytics' Format); that would change every flip of the second epoch.
    """
    settings = dict(epochs=2, imgsz=64, batch=4, workers=0, policy_epochs=[1, 1, 2], warmup_iters=1, plots=False)
    losses = {}
    for val in (True, False):
        DEIM("deim-n.yaml").train(
            data=str(tiny_data), project=str(tmp_path), name=f"val_{val}", seed=0, val=val, **settings
        )
        rows = results(tmp_path / f"val_{val}")
        losses[val] = [{k: v for k, v in row.items() if k.startswith("train/")} for row in rows]
    assert len(losses[True]) == 2
    assert losses[True] == losses[False]
