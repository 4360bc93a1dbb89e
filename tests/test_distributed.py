"""DDP through the real trainer: two CPU processes (gloo) started by torchrun agree on every decision.

Each process records, per iteration, its stage and learning rate, and after every epoch a checksum of its weights;
rank 1's loss is made non-finite at one step (its gradient stays finite, so only a shared decision keeps the two
processes' weights equal). The weights must stay equal on both ranks through the step skip and the no-aug tail's
restart from the best pre-tail state, which each process loads from the file rank 0 wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys, torch
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model
from deim_ultra import DEIM
from deim_ultra.train import DEIMTrainer

data, project, out = sys.argv[1:4]
records = {"steps": [], "weights": [], "skipped": 0}


class PoisonedTrainer(DEIMTrainer):
    def optimizer_step(self):
        if RANK == 1 and self.epoch == 1 and self.batch_in_epoch == 1:
            self.loss = self.loss * float("nan")  # rank 1 alone: its gradients were already reduced, finite
        super().optimizer_step()


def on_train_batch_end(trainer):
    records["steps"].append([trainer.epoch, trainer.stage, trainer.optimizer.param_groups[0]["lr"]])


def on_train_epoch_end(trainer):
    params = unwrap_model(trainer.model).parameters()
    records["weights"].append(float(sum(p.detach().double().abs().sum() for p in params)))
    records["skipped"] = trainer.nonfinite.total
    records["amp"] = bool(trainer.amp)


model = DEIM("deim-n.yaml")
model.add_callback("on_train_batch_end", on_train_batch_end)
model.add_callback("on_train_epoch_end", on_train_epoch_end)
model.train(trainer=PoisonedTrainer, data=data, epochs=4, policy_epochs=[1, 2, 3], imgsz=64, batch=4, device="cpu",
            workers=0, project=project, name="ddp", exist_ok=True, pretrained=False, plots=False, seed=0)
with open(f"{out}/rank{RANK}.json", "w") as f:
    json.dump(records, f)
"""


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory) -> tuple[Path, list[dict], str]:
    """A 4-epoch run of two CPU processes; returns the run folder, each rank's records and the console output."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "train_ddp.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(tiny_data), str(tmp), str(tmp)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    return tmp / "ddp", records, result.stdout + result.stderr


def test_both_processes_share_every_stage_and_learning_rate(ddp_run):
    _, (rank0, rank1), _ = ddp_run
    assert rank0["amp"] is rank1["amp"] is False  # no CPU autocast in the process Ultralytics' AMP check skips
    assert rank0["steps"] == rank1["steps"]
    assert {stage for _, stage, _ in rank0["steps"]} == {"warmup", "dense_o2o", "aug", "no_aug"}


def test_a_non_finite_loss_in_one_process_skips_the_step_in_both(ddp_run):
    _, (rank0, rank1), output = ddp_run
    assert rank0["skipped"] == rank1["skipped"] == 1
    assert "Non-finite loss or gradient in another process" in output  # rank 0's line
    assert rank0["weights"] == rank1["weights"]  # a step taken by one process only would part them


def test_the_tail_restart_loads_the_same_state_in_both(ddp_run):
    run, (rank0, rank1), output = ddp_run
    assert "epoch 4 restarts from the state after epoch" in output
    assert len(rank0["weights"]) == 4 and rank0["weights"] == rank1["weights"]


def test_results_and_checkpoints_are_written_once(ddp_run):
    run, _, output = ddp_run
    header, *rows = (run / "results.csv").read_text().strip().splitlines()
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3, 4]
    assert (run / "weights" / "last.pt").is_file() and (run / "weights" / "best_stage1.pt").is_file()
    assert "Final validation of" in output and "skipped in CPU DDP processes" in output


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cli = ["-m", "deim_ultra.cli", "train", "model=deim-n.yaml", f"data={tiny_data}", "epochs=1", "imgsz=64"]
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", *cli, "batch=3", "device=cpu", "workers=0", f"project={tmp_path}"],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "batch=3 does not split over 2 processes; each would train on 1 image(s). Fix: batch=2" in (
        result.stdout + result.stderr
    )


EQUIVALENCE_SCRIPT = """
import sys, torch
from torch import nn
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model
from deim_ultra import DEIM
from deim_ultra.train import DEIMTrainer

weights, data, project, out, batch = sys.argv[1:6]
steps = []


class RecordingTrainer(DEIMTrainer):
    def optimizer_step(self):
        params = list(unwrap_model(self.model).parameters())
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        super().optimizer_step()
        steps.append({"lr": self.optimizer.param_groups[0]["lr"], "grad": grads.clone(),
                      "weights": torch.cat([p.detach().flatten() for p in params])})


def batch_norm_on_running_statistics(trainer):
    for m in trainer.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


model = DEIM(weights)
model.add_callback("on_train_batch_start", batch_norm_on_running_statistics)
model.train(trainer=RecordingTrainer, data=data, epochs=3, policy_epochs=[0, 0, 0], warmup_iters=2, fliplr=0.0,
            loss_ddf=0.0, imgsz=96, batch=int(batch), device="cpu", workers=0, project=project, name="run",
            exist_ok=True, val=False, plots=False, seed=0)
torch.save(steps, f"{out}/steps_rank{max(RANK, 0)}.pt")
"""


@pytest.fixture(scope="module")
def equivalence_runs(easy_trained, tmp_path_factory) -> tuple[list[dict], list[dict], list[dict]]:
    """The optimizer steps of one process with batch 4 and of each of two processes with batch 2 (the same 4 images).

    Four training images make one step per epoch over all of them, whatever the sampler's order, so both set-ups see
    the same images at every step. Both start from a trained model: from random weights all queries predict nearly
    the same, and the Hungarian matching of near-ties flips with the last bits of a batch-size dependent convolution.
    Everything random or per-process is off:
    - augmentation (the no-aug stage from the first epoch, no flips) and denoising queries (they draw noise);
    - DDF (the authors balance it by each process's own positives, as ours does);
    - BatchNorm's batch statistics (those of 2 images are not those of 4, and torch's SyncBatchNorm does not run on
      CPU): it normalises with its running statistics.
    """
    from deim_ultra import DEIM
    from deim_ultra.data.synthetic import make_synthetic_dataset

    from helpers import EASY_IMGSZ

    tmp = tmp_path_factory.mktemp("ddp_equivalence")
    data = make_synthetic_dataset(
        tmp / "data", n_train=4, n_val=2, imgsz=EASY_IMGSZ, nc=1, max_objects=2, min_size=30, max_size=60, seed=1
    )
    model = DEIM(easy_trained)
    decoder_args = model.model.yaml["head"][-1][3]
    assert decoder_args[6] == 100  # denoising queries, rebuilt from this YAML by the trainer
    decoder_args[6] = 0
    model.save(tmp / "init.pt")
    script = tmp / "train_equivalence.py"
    script.write_text(EQUIVALENCE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = {
        "single": [sys.executable, str(script)],
        "ddp": [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", str(script)],
    }
    for name, command in runs.items():
        out = tmp / name
        out.mkdir()
        batch = "4"  # the whole batch: 2 images in each of 2 processes under torchrun
        result = subprocess.run(
            [*command, str(tmp / "init.pt"), str(data), str(out / "project"), str(out), batch],
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp,
        )  # fmt: skip
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    import torch

    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    return load(tmp / "single/steps_rank0.pt"), load(tmp / "ddp/steps_rank0.pt"), load(tmp / "ddp/steps_rank1.pt")


def test_two_processes_of_batch_2_take_the_steps_of_one_of_batch_4(equivalence_runs):
    import torch

    single, rank0, rank1 = equivalence_runs
    assert len(single) == len(rank0) == len(rank1) == 3
    for one, two, other in zip(single, rank0, rank1):
        assert torch.equal(two["grad"], other["grad"]) and torch.equal(two["weights"], other["weights"])
        assert one["lr"] == two["lr"]
        scale = one["grad"].abs().max()
        torch.testing.assert_close(two["grad"], one["grad"], rtol=0, atol=1e-4 * scale)
        torch.testing.assert_close(two["weights"], one["weights"], rtol=1e-5, atol=1e-6)
