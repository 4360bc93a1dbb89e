"""A process killed while it writes a checkpoint leaves the previous complete checkpoint, never a truncated one."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import deim_cli

# The child trains 2 epochs and is SIGKILLed halfway through writing last.pt: at the end of epoch 2 (Ultralytics
# writes checkpoint bytes with Path.write_bytes) or in the final optimizer strip (torch.save to a path); or ("row")
# just before writing epoch 2's checkpoint, after its results.csv row.
CHILD = textwrap.dedent(
    """
    import io, os, pathlib, signal, sys, json
    import torch
    from deim_ultra import DEIM

    mode, data, project = sys.argv[1:4]

    def half_then_die(path, payload: bytes):
        with open(path, "wb") as f:
            f.write(payload[: len(payload) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    if mode in ("epoch", "row"):
        write_bytes, calls = pathlib.Path.write_bytes, []

        def patched(self, payload):
            if self.name == "last.pt":
                calls.append(self)
                if len(calls) == 2 and mode == "row":  # epoch 2's results.csv row is written, its checkpoint not
                    os.kill(os.getpid(), signal.SIGKILL)
                if len(calls) == 2:
                    half_then_die(self, payload)
            return write_bytes(self, payload)

        pathlib.Path.write_bytes = patched
    else:
        save = torch.save

        def patched(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and "last.pt" in os.fspath(f):
                buffer = io.BytesIO()
                save(obj, buffer)
                half_then_die(f, buffer.getvalue())
            return save(obj, f, *args, **kwargs)

        torch.save = patched
    DEIM("deim-n.yaml").train(data=data, project=project, name="run", **json.loads(sys.argv[4]))
    """
)
SETTINGS = dict(epochs=2, imgsz=64, batch=4, workers=0, policy_epochs=[1, 1, 2], warmup_iters=1, plots=False, seed=0)


def killed_child(mode: str, tiny_data, tmp_path) -> None:
    """Run CHILD in `mode` and require that it was SIGKILLed."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [sys.executable, str(script), mode, str(tiny_data), str(tmp_path), json.dumps(SETTINGS)]
    child = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def results_epochs(run) -> list[int]:
    """The epoch column of a run's results.csv."""
    return [int(float(line.split(",")[0])) for line in (run / "results.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("mode, epoch", [("epoch", 0), ("strip", 1)])
def test_kill_while_saving_keeps_the_previous_checkpoint(tiny_data, tmp_path, mode, epoch):
    killed_child(mode, tiny_data, tmp_path)
    last = torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=False)  # complete, so it loads
    assert last["epoch"] == epoch  # strip: the final epoch's checkpoint, still unstripped (optimizer state kept)
    assert (last["optimizer"] is not None) and last["ema"] is not None


@pytest.mark.parametrize("form", ["python", "cli path"])
def test_resume_after_a_kill_between_results_row_and_checkpoint_logs_each_epoch_once(form, tiny_data, tmp_path):
    from ultralytics.utils import YAML

    from deim_ultra import DEIM

    killed_child("row", tiny_data, tmp_path)
    run = tmp_path / "run"
    assert results_epochs(run) == [1, 2]
    assert torch.load(run / "weights" / "last.pt", weights_only=False)["epoch"] == 0  # epoch 2 is trained again
    if form == "python":
        DEIM(run / "weights" / "last.pt").train(resume=True)
    else:  # Ultralytics' `resume=<last.pt>` form, no model given
        result = deim_cli("train", f"resume={run / 'weights' / 'last.pt'}", cwd=tmp_path)
        assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
        assert "Resume ignores" not in result.stdout + result.stderr  # neither recipe defaults nor `recipe` itself
    assert results_epochs(run) == [1, 2]  # Ultralytics alone appends a second row for epoch 2
    assert YAML.load(run / "args.yaml")["batch"] == SETTINGS["batch"]  # not recipe n's 128


@pytest.mark.parametrize(
    "written, kept",
    [
        ("epoch,time,loss\n1,10,0.5\n2,20,0.4\n3,30,0.3\n", "epoch,time,loss\n1,10,0.5\n2,20,0.4\n"),
        ("epoch,time,loss\n1,10,0.5\n2,20,0.4\n3,3", "epoch,time,loss\n1,10,0.5\n2,20,0.4\n"),  # row cut short
        ("epoch,time,loss\n1,10,0.5\n2,20,0.4", "epoch,time,loss\n1,10,0.5\n2,20,0.4\n"),  # last newline lost
        ("epoch,ti", None),  # header cut short: removed, Ultralytics writes a new one
        ("", None),
    ],
)
def test_results_csv_is_cut_back_to_the_resumed_epoch(written, kept, tmp_path):
    from deim_ultra.checkpoints.atomic import drop_results_after

    csv = tmp_path / "results.csv"
    csv.write_text(written)
    drop_results_after(csv, 2)
    assert (csv.read_text() if csv.exists() else None) == kept
