"""Preemption (train/preempt.py): a signal stops the run after the update in flight, saves a checkpoint holding the
data position inside the epoch, exits 75, and resume=auto continues exactly: the interrupted-and-resumed run's
losses, learning rates, epoch rows and final weights equal the uninterrupted run's, for signals at the first update,
the last update of an epoch and the first update of the next one; and the ranks of a multi-rank run agree on the
update to stop at."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest


from tests.train.train_helpers import REPO, TRAIN_SCRIPT, run_train, train_env
from tests.train.train_helpers import assert_same_run as same_run
from tests.train.train_helpers import recipe_and_reference

pytest.importorskip("deepspeed")

# 2 epochs of 6 updates, a loss logged at every update
RECIPE = dict(train={"epochs": 2, "batch_size": 32, "compile": False, "precision": "fp32", "log_interval": 1,
                     "keep_last": 1, "seed": 3})


recipe, reference = recipe_and_reference("preempt.yaml", **RECIPE)


def assert_same_run(out, ref):
    same_run(out, ref, updates=12, epochs=2)


def test_signals_at_the_first_and_at_epoch_edges_then_resume_reproduces_the_run(recipe, reference, tmp_path):
    """SIGTERM from outside (sent during setup: honoured after update 1, the first), then SIGUSR1 after update 6
    (the last of epoch 1) and 7 (the first of epoch 2); each run exits 75 and the next resumes."""
    out = tmp_path / "run"
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, TRAIN_SCRIPT, "--config", recipe, f"output.dir={out}"], cwd=REPO,
                                env=train_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if "preemption: SIGTERM" in log_path.read_text():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)     # the handler is installed: honoured at the next update boundary
        assert proc.wait(timeout=120) == 75, log_path.read_text()[-3000:]
    stdout = [log_path.read_text()]
    env = dict(train_env(), DARTMAMBA_TRAIN_SIGNAL_AT="6,7")
    for _ in range(3):
        result = run_train(["--config", recipe, f"output.dir={out}", "resume=auto"], check=False, env=env)
        stdout.append(result.stdout)
        assert result.returncode == (0 if len(stdout) == 4 else 75), result.stdout[-2000:] + result.stderr[-3000:]
    expected = [("SIGTERM", "update 1 (epoch 1, micro-batch 1 of 6)", "epoch0000-micro000001"),
                ("SIGUSR1", "the end of epoch 1", "epoch0001"),
                ("SIGUSR1", "update 7 (epoch 2, micro-batch 1 of 6)", "epoch0001-micro000001")]
    for text, (name, where, tag) in zip(stdout, expected):
        assert f"preempted ({name}): stopped after {where}; saved {out}/checkpoints/{tag};" in text, text[-2000:]
    for text, (_, _, tag), update in zip(stdout[1:], expected, (1, 6, 7)):
        assert f"resumed from {out}/checkpoints/{tag} (epoch {int(tag[5:9])}, update {update})" in text
    assert_same_run(out, reference)


def test_signal_names_are_checked(recipe, monkeypatch):
    from dartmamba_train.config import ConfigError, load_config
    from dartmamba_train.loop import _signals
    from dartmamba_train.preempt import parse_signals

    assert parse_signals(None) == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals("usr2, SIGINT") == [signal.SIGUSR2, signal.SIGINT] and parse_signals("none") == []
    monkeypatch.setenv("DARTMAMBA_PREEMPT_SIGNALS", "TERM,KILL")
    with pytest.raises(ConfigError, match=r"^DARTMAMBA_PREEMPT_SIGNALS: 'KILL' is not a catchable signal name; "
                                          r"expected a comma-separated list such as TERM,USR1 \(or none\)$"):
        _signals(load_config(recipe))
    # the config's value wins over the environment's, and its errors name the config key
    assert _signals(load_config(recipe, ["train.preempt_signals=USR2"])) == [signal.SIGUSR2]
    with pytest.raises(ConfigError, match=r"^train.preempt_signals: 'STOP' is not a catchable signal name"):
        _signals(load_config(recipe, ["train.preempt_signals=TERM,STOP"]))


def _agree(rank: int, port: int, signal_round: int, queue) -> None:
    import torch.distributed as dist

    from dartmamba_train.preempt import PreemptionHandler, StopAgreement

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    handler = PreemptionHandler([])
    stop = StopAgreement(handler, dist.new_group(backend="gloo"), 2)
    verdicts = []
    for round_ in range(6):
        if rank == 1 and round_ == signal_round:
            handler.signum = signal.SIGUSR1          # only rank 1 got the signal
        verdicts.append(stop.poll())
    verdicts.append(stop.settle())
    stop.close()
    dist.destroy_process_group()
    queue.put((rank, verdicts))


def test_ranks_agree_on_the_update_to_stop_at():
    """One rank's signal stops every rank at the same update: the round after the one that carried it."""
    import multiprocessing

    from tests.train.test_launcher import free_port

    # spawn, not fork: a forked child would inherit a default process group that earlier in-process tests of the
    # suite left initialised
    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_agree, args=(rank, port, 2, queue)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    # poll k returns the verdict of round k-1: the flag set before poll 2 is seen by both ranks at poll 3
    assert results[0] == results[1] == [False, False, False, True, True, True, True]
