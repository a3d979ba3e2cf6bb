"""Resume and atomic checkpoints, with real processes: a run killed with SIGKILL (mid-epoch, or inside a save) and
resumed with resume=auto reproduces the uninterrupted run exactly (CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dartmamba_train.logs import read_csv

from tests.train.train_helpers import TRAIN_SCRIPT, REPO, run_train, snapshot, train_env
from tests.train.train_helpers import assert_same_run as same_run
from tests.train.train_helpers import recipe_and_reference

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

# 3 epochs of 20 updates, a loss logged at every update, every checkpoint kept
RESUME_RECIPE = dict(train={"epochs": 3, "batch_size": 32, "compile": False, "precision": "fp32", "log_interval": 1,
                            "keep_last": 5, "seed": 7},
                     data={"kind": "canvas", "num_workers": 0,
                           "canvas": {"canvas_size": 32, "object_size": [12, 16], "num_distractors": [1, 2],
                                      "train_length": 640, "val_length": 48}})


recipe, reference = recipe_and_reference("resume.yaml", **RESUME_RECIPE)


def assert_same_run(out, ref):
    same_run(out, ref, updates=60, epochs=3)


def test_kill9_mid_epoch_then_resume_reproduces_the_run(recipe, reference, tmp_path):
    out = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")                # a file, not a pipe nobody reads (it could fill up)
    proc = subprocess.Popen([sys.executable, TRAIN_SCRIPT, "--config", recipe, f"output.dir={out}"], cwd=REPO,
                            env=train_env(), stdout=log, stderr=subprocess.STDOUT)
    steps_file = out / "steps.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        rows = read_csv(str(steps_file))
        if rows and int(rows[-1]["step"]) >= 27:          # epoch 2 of 3, after the epoch-1 checkpoint
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    if proc.poll() is None and time.monotonic() >= deadline:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    log.close()
    killed_at = int(read_csv(str(steps_file))[-1]["step"])
    assert 27 <= killed_at < 60
    tag = (out / "checkpoints" / "last").read_text()        # epoch0001, or epoch0002 on a slow machine
    assert tag in ("epoch0001", "epoch0002")
    done = int(tag[-4:])
    resumed = run_train(["--config", recipe, f"output.dir={out}", "resume=auto"])
    assert f"resumed from {out}/checkpoints/{tag} (epoch {done}, update {20 * done})" in resumed.stdout
    assert_same_run(out, reference)


@pytest.mark.parametrize("point, pointer", [("save:staged", "epoch0001"), ("save:renamed", "epoch0001")])
def test_kill9_inside_a_save_keeps_the_previous_checkpoint(recipe, reference, tmp_path, point, pointer):
    out = tmp_path / "crashed"
    env = dict(train_env(), DARTMAMBA_TRAIN_CRASH_AT=f"{point}@2")
    crashed = run_train(["--config", recipe, f"output.dir={out}"], check=False, env=env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    root = out / "checkpoints"
    assert (root / "last").read_text() == pointer
    assert (root / "best").read_text() in ("epoch0001",)
    # the previous checkpoint is complete and is exactly the uninterrupted run's epoch-1 checkpoint
    previous = load_file(str(root / "epoch0001" / "model.safetensors"))
    expected = load_file(str(reference / "checkpoints" / "epoch0001" / "model.safetensors"))
    assert previous.keys() == expected.keys() and all(torch.equal(previous[k], expected[k]) for k in previous)
    assert (root / "epoch0001" / "trainer_state.json").is_file()
    assert os.path.samefile(out / "last.safetensors", root / "epoch0001" / "model.safetensors")
    if point == "save:staged":
        assert not (root / "epoch0002").exists() and (root / ".staging" / "epoch0002").is_dir()
    else:
        assert (root / "epoch0002" / "trainer_state.json").is_file()   # complete, but not pointed to yet
    run_train(["--config", recipe, f"output.dir={out}", "resume=auto"])
    assert_same_run(out, reference)
    assert sorted(p for p in os.listdir(root) if p.startswith(".")) == []   # leftovers cleared


def test_resume_refuses_a_different_partitioning(recipe, reference, tmp_path):
    """A checkpoint knows its stage and precision; resuming with others is a clear error, not a silent mix, and
    nothing in the run's folder changes."""
    config = (reference / "config.yaml").read_text()
    result = run_train(["--config", recipe, f"output.dir={reference}", "resume=auto", "deepspeed.stage=1"],
                       check=False)
    assert result.returncode != 0 and (reference / "config.yaml").read_text() == config
    assert (f"resume: {reference}/checkpoints/epoch0003 was written with ZeRO stage 0 / fp32; this run uses "
            f"stage 1 / fp32") in result.stderr


def test_resume_refuses_a_different_architecture_and_changes_nothing(recipe, reference):
    """Resuming with another embed_dim names the keys that differ, before anything is written: every file of the run
    (config.yaml, checkpoints, logs) stays byte for byte as it was."""
    before = snapshot(reference)
    result = run_train(["--config", recipe, f"output.dir={reference}", "resume=auto", "model.kwargs.embed_dim=48"],
                       check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"dartmamba-train: resume: {reference}/checkpoints/epoch0003 holds a different model than this run "
        f"(kwargs.embed_dim: checkpoint 32, this run 48); resume with the run's own config, or start a new run from "
        f"those weights with model.init_checkpoint={reference}/checkpoints/epoch0003/model.safetensors")
    assert snapshot(reference) == before


def test_resume_from_a_missing_path_is_a_clear_error(recipe, tmp_path, capsys):
    from dartmamba_train.cli import main

    assert main(["--config", recipe, f"output.dir={tmp_path}/out", f"resume={tmp_path}/nowhere"]) == 2
    assert capsys.readouterr().err.startswith(f"dartmamba-train: resume: no checkpoint at {tmp_path}/nowhere "
                                              f"(expected a checkpoint directory holding trainer_state.json")
    assert not (tmp_path / "out").exists()
