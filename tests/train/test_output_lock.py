"""One run per output directory, with real processes: a second run into a live run's folder stops at once (exit 2,
one line naming the first run) without touching anything, and a run killed with SIGKILL leaves no stale lock, not
even while its forked data-loader workers are still alive."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dartmamba_train.lock import LOCK_FILE, OutputDirLock, OutputDirLocked
from dartmamba_train.logs import read_csv

from tests.train.train_helpers import REPO, TRAIN_SCRIPT, run_train, snapshot, train_env, write_recipe

pytest.importorskip("deepspeed")

# long enough to be caught mid-run: 4 epochs of 20 updates, one logged row per update
LONG = dict(train={"epochs": 4, "batch_size": 32, "compile": False, "precision": "fp32", "log_interval": 1,
                   "keep_last": 1},
            data={"kind": "canvas", "num_workers": 1,
                  "canvas": {"canvas_size": 32, "object_size": [12, 16], "num_distractors": [1, 2],
                             "train_length": 640, "val_length": 48}})


def start_and_wait(recipe, out, log, steps, timeout=300):
    """``train.py`` in a new process, returned once its steps.csv reaches update ``steps``."""
    proc = subprocess.Popen([sys.executable, TRAIN_SCRIPT, "--config", recipe, f"output.dir={out}"], cwd=REPO,
                            env=train_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        rows = read_csv(str(out / "steps.csv"))
        if rows and int(rows[-1]["step"]) >= steps:
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the run did not reach step {steps} (exit {proc.wait()})")


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_folder_stops_at_once(tmp_path):
    recipe = write_recipe(tmp_path / "long.yaml", **LONG)
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = start_and_wait(recipe, out, log, 25)          # epoch 1 saved, epoch 2 under way
        try:
            os.kill(first.pid, signal.SIGSTOP)                # hold it still while the second one tries
            before = snapshot(out)
            began = time.monotonic()
            # resume=auto: a fresh run would already stop in preflight (the folder holds checkpoints)
            second = run_train(["--config", recipe, f"output.dir={out}", "resume=auto"], check=False)
            took = time.monotonic() - began
            after = snapshot(out)
            os.kill(first.pid, signal.SIGCONT)
            assert first.wait(timeout=300) == 0
        finally:
            if first.poll() is None:
                first.kill()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    host = socket.gethostname()
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"dartmamba-train: output.dir {out} is in use by another run (pid {first.pid} on {host}, started "), lines
    assert after == before                                    # nothing deleted or written
    assert took < 60
    steps = read_csv(str(out / "steps.csv"))                  # the first run's rows only, each update once
    assert [int(r["step"]) for r in steps] == list(range(1, 81))
    assert (out / "checkpoints" / "last").read_text() == "epoch0004"


@pytest.mark.slow
def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    recipe = write_recipe(tmp_path / "long.yaml", **LONG)
    out = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        first = start_and_wait(recipe, out, log, 3)           # data-loader worker (a forked child) alive
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    result = run_train(["--config", recipe, f"output.dir={out}", "train.epochs=1"], check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(r["step"]) for r in read_csv(str(out / "steps.csv"))] == list(range(1, 21))      # a fresh run


def test_lock_semantics_in_one_process(tmp_path):
    out = tmp_path / "run"
    with OutputDirLock(str(out)) as held:
        assert held.fd is not None and f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
        with pytest.raises(OutputDirLocked, match=rf"output.dir {out} is in use by another run \(pid {os.getpid()} "
                                                  rf"on {socket.gethostname()}, started "):
            OutputDirLock(str(out)).acquire()
    OutputDirLock(str(out)).acquire().release()              # released on exit


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """The holder forks a long-lived child (as a data loader does) and is killed: the lock is free at once."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, sys, time
        from dartmamba_train.lock import OutputDirLock
        OutputDirLock({str(out)!r}).acquire()
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=train_env())
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(OutputDirLocked):
            OutputDirLock(str(out)).acquire()
        holder.kill()
        holder.wait()
        os.kill(child, 0)                                     # the child is still alive
        OutputDirLock(str(out)).acquire().release()
    finally:
        holder.kill()
        if child is not None:
            os.kill(child, signal.SIGKILL)
