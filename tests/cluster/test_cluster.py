"""Training and the scaling study on a real one-node SLURM (2 CPUs; scripts/test_cluster.sh), or, with
DARTMAMBA_CLUSTER=local, through submitit's local executor and the deepspeed launcher:

- 2 gloo tasks under ``srun`` (local: ``--submit local``) give the losses of the 2-process DeepSpeed-launcher run;
- a job signalled with ``scancel --signal=USR1`` saves, requeues itself and finishes with the uninterrupted run's
  losses (local: SIGUSR1 to one rank of a deepspeed-launcher run, then ``resume=auto``);
- a 4-cell scaling study through the slurm (local) executor fills the CSV.
The slurm_launch_env tests need no cluster."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dartmamba_train.distributed import slurm_launch_env
from dartmamba_train.logs import read_csv

from tests.train.train_helpers import REPO, TRAIN_SCRIPT, train_env, write_recipe

TIMING = {"img_per_s", "data_ms", "epoch_time_s"}
# 2 epochs of 3 updates on 2 ranks (192 canvases / (2 x 32)), ZeRO-2
RECIPE = dict(train={"epochs": 2, "batch_size": 32, "compile": False, "precision": "fp32", "log_interval": 1,
                     "keep_last": 1, "seed": 3})
TRAIN_ARGS = ["deepspeed.stage=2", "output.rank_log=true"]


def losses(out) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_csv(os.path.join(out, "steps.csv"))]


def keep_log(log_dir, name, text) -> None:
    with open(os.path.join(log_dir, name), "w") as handle:
        handle.write(text)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("recipe") / "cluster.yaml", **RECIPE)


@pytest.fixture(scope="module")
def launcher_run(recipe, tmp_path_factory, log_dir):
    """The 2-process run under the deepspeed launcher: the reference."""
    pytest.importorskip("deepspeed")
    from tests.train.test_launcher import free_port

    out = tmp_path_factory.mktemp("launcher") / "run"
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    cmd = [sys.executable, launcher, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN_SCRIPT,
           "--config", recipe, f"output.dir={out}", *TRAIN_ARGS]
    result = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    keep_log(log_dir, "deepspeed_launcher.log", result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(losses(out)) == 6
    return out


@pytest.mark.cluster
def test_two_tasks_under_srun_match_the_deepspeed_launcher(mode, recipe, launcher_run, tmp_path, log_dir):
    out = tmp_path / "run"
    if mode == "slurm":
        cmd = ["srun", "-N1", "-n2", "--time=5", "--kill-on-bad-exit=1", sys.executable, TRAIN_SCRIPT, "--config",
               recipe, f"output.dir={out}", *TRAIN_ARGS]
    else:
        cmd = [sys.executable, TRAIN_SCRIPT, "--submit", "local", "--tasks-per-node", "2", "--time", "5", "--wait",
               "--config", recipe, f"output.dir={out}", *TRAIN_ARGS]
    result = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    keep_log(log_dir, f"{mode}_two_tasks.log", result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if mode == "slurm":
        assert "2 process(es), ZeRO stage 2" in result.stdout
    else:
        assert "dartmamba-train: submitted job" in result.stdout and "finished" in result.stdout
    assert losses(out) == losses(launcher_run)
    ranks = [read_csv(str(out / "ranks" / f"rank{r}.csv")) for r in (0, 1)]
    assert all(a["local_loss"] != b["local_loss"] for a, b in zip(*ranks))        # two ranks, different shards


@pytest.mark.cluster
def test_submit_through_submitit_to_slurm(mode, recipe, launcher_run, tmp_path, log_dir):
    if mode != "slurm":
        pytest.skip("--submit local runs in test_two_tasks_under_srun_match_the_deepspeed_launcher")
    out = tmp_path / "run"
    cmd = [sys.executable, TRAIN_SCRIPT, "--submit", "slurm", "--tasks-per-node", "2", "--time", "5", "--wait",
           "--signal-delay", "30", "--config", recipe, f"output.dir={out}", *TRAIN_ARGS]
    result = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    keep_log(log_dir, "submitit_slurm.log", result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job = result.stdout.split("submitted job ")[1].split(" ")[0]
    assert f"job {job} finished" in result.stdout
    assert sorted(os.listdir(out / "jobs" / job))[:2] == [f"{job}_0_log.err", f"{job}_0_log.out"]
    assert losses(out) == losses(launcher_run)


def _wait_for(path, text, proc=None, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isfile(path) and text in open(path).read():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    seen = open(path).read()[-3000:] if os.path.isfile(path) else "(no file)"
    raise AssertionError(f"{text!r} did not appear in {path}:\n{seen}")


@pytest.mark.cluster
def test_usr1_saves_requeues_and_resumes_exactly(mode, recipe, launcher_run, tmp_path, log_dir):
    out = tmp_path / "run"
    log = tmp_path / "job.log"
    if mode == "slurm":
        script = tmp_path / "job.sh"
        script.write_text(
            f"#!/bin/bash\n#SBATCH -N1 -n2 --time=5 --requeue --open-mode=append -o {log} -J preempt-test\n"
            f"echo \"job $SLURM_JOB_ID start, restart ${{SLURM_RESTART_COUNT:-0}}, $(date +%T)\"\n"
            f"export DARTMAMBA_PREEMPT_REQUEUE=1\n"
            f"srun {sys.executable} {TRAIN_SCRIPT} --config {recipe} output.dir={out} resume=auto "
            f"{' '.join(TRAIN_ARGS)}\necho \"srun exit status $?\"\n")
        job = subprocess.run(["sbatch", "--parsable", str(script)], cwd=REPO, env=train_env(), capture_output=True,
                             text=True, check=True).stdout.strip()
        _wait_for(log, "preemption: SIGTERM, SIGUSR1")
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                                   text=True).stdout
            if "JobState=COMPLETED" in state or "JobState=FAILED" in state or "JobState=CANCELLED" in state:
                break
            time.sleep(1)
        text = log.read_text()
        keep_log(log_dir, "slurm_requeue.log", text + "\n" + state)
        assert "JobState=COMPLETED" in state and "Restarts=1" in state, state + text[-3000:]
        assert f"job {job} start, restart 0, " in text and f"job {job} start, restart 1, " in text
        assert "preempted (SIGUSR1): stopped after " in text and f"scontrol requeue {job}: done" in text
    else:
        # the signal reaches one rank only: both must stop after the same update
        import psutil

        from tests.train.test_launcher import free_port

        launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
        cmd = [sys.executable, launcher, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN_SCRIPT,
               "--config", recipe, f"output.dir={out}", *TRAIN_ARGS]
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=handle, stderr=subprocess.STDOUT)
            _wait_for(log, "preemption: SIGTERM, SIGUSR1", proc)
            rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if any(a.startswith("--local_rank=1") for a in p.cmdline())]
            assert len(rank1) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
            rank1[0].send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=240) != 0
        text = log.read_text()
        assert "preempted (another rank's signal): stopped after update " in text       # rank 0 stopped too
        resumed = subprocess.run([sys.executable, launcher, "--num_gpus", "2", "--master_port", str(free_port()),
                                  TRAIN_SCRIPT, "--config", recipe, f"output.dir={out}", "resume=auto", *TRAIN_ARGS],
                                 cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
        text += resumed.stdout + resumed.stderr
        keep_log(log_dir, "local_preempt.log", text)
        assert resumed.returncode == 0, text[-3000:]
    assert "resumed from " in text
    assert losses(out) == losses(launcher_run)


@pytest.mark.cluster
def test_scaling_study_fans_out_four_cells(mode, tmp_path, log_dir):
    from tests.helpers import TINY_DART, TINY_FIXED, TINY_VIM

    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--out", str(out), "--metrics", "flops", "--families", "vim",
           "--sizes", "ti", "--tokens", "16", "36", "--model-kwargs", json.dumps(TINY_VIM),
           "--fixed-kwargs", json.dumps(TINY_FIXED), "--dart-kwargs", json.dumps(TINY_DART),
           "--executor", mode, "--max-parallel", "2", "--job-time", "5"]
    result = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    keep_log(log_dir, f"{mode}_scaling.log", result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(str(out / "scaling.csv"))
    assert sorted(r["cell"] for r in rows) == sorted(f"vim-tiny-{t}-{n}" for t in ("fixed", "dart") for n in (16, 36))
    assert all(float(r["gflops"]) > 0 and r["job_status"] == "ok" for r in rows)
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(f"{r['cell']}.json" for r in rows)
    assert len([p for p in (out / "jobs").iterdir() if p.name.isdigit()]) == 4       # a log folder per job
    assert "progress: 4 done / 0 running / 0 failed / 0 pending" in result.stdout
    again = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert "0 cell(s) to run" in again.stdout and "4 cell(s) already done" in again.stdout


def test_srun_variables_give_rank_world_and_master():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NODELIST": "gpu[07-09],cpu3", "SLURM_JOB_ID": "1234",
           "SLURM_STEP_ID": "0"}
    got = slurm_launch_env(env)
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert got["MASTER_ADDR"] == "gpu07"          # scontrol show hostnames, or by hand without scontrol
    assert got["MASTER_PORT"] == str(20000 + 1234 * 7 % 20000)
    assert slurm_launch_env({**env, "SLURM_NODEID": "3"})["LOCAL_WORLD_SIZE"] == "1"
    # a launcher's own RANK wins; a batch script's shell (no step) is no launch
    assert slurm_launch_env({**env, "RANK": "0"}) == {}
    assert slurm_launch_env({k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}) == {}
    assert slurm_launch_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"}).keys() == \
        {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}


def test_first_host_and_tasks_per_node_by_hand():
    from dartmamba_train.distributed import _first_of_hostlist, _tasks_on_node

    assert _first_of_hostlist("vm") == "vm" and _first_of_hostlist("a1,b2") == "a1"
    assert _first_of_hostlist("node[03-05,9],gpu1") == "node03" and _first_of_hostlist("n[7,2]") == "n7"
    assert _tasks_on_node("4", 0) == 4 and _tasks_on_node("3(x2),1", 1) == 3 and _tasks_on_node("3(x2),1", 2) == 1


def test_submit_options_are_checked(tmp_path, capsys):
    from dartmamba_train.cli import main, parse_args
    from dartmamba_train.submit import job_argv

    recipe = write_recipe(tmp_path / "r.yaml", **RECIPE)
    for options, message in ((["--time", "0"], "--time: expected an integer >= 1, got 0"),
                             (["--nodes", "0"], "--nodes: expected an integer >= 1, got 0"),
                             (["--partition", "gpu"], "--partition / --account: only for --submit slurm"),
                             (["--time", "2", "--signal-delay", "120"],
                              "--signal-delay: 120 s must be shorter than --time 2 min")):
        assert main(["--submit", "local", *options, "--config", recipe, f"output.dir={tmp_path / 'o'}"]) == 2
        assert capsys.readouterr().err == f"dartmamba-train: {message}\n"
    assert not (tmp_path / "o").exists()                      # nothing submitted, nothing written
    args = parse_args(["--submit", "slurm", "--config", str(recipe), "train.epochs=1"])
    assert job_argv(args) == ["--config", os.path.abspath(recipe), "train.epochs=1", "resume=auto"]
    args = parse_args(["--submit", "slurm", "--config", "demo/vim_dart", "resume=/x/checkpoints"])
    assert job_argv(args) == ["--config", "demo/vim_dart", "resume=/x/checkpoints"]
