"""Each training process's intra-op threads: available cores // processes on the node, unless the user chose."""
from __future__ import annotations

import platform

import pytest
import torch

from dartmamba_train import distributed

from tests.train.train_helpers import run_train, train_env


@pytest.fixture
def threads_env(monkeypatch):
    """No thread settings in the environment, 4 usable CPUs (of 6 torch would use), torch at its start-up count;
    torch's count restored afterwards."""
    saved = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    torch.set_num_threads(6)
    monkeypatch.setitem(distributed._DEFAULT, "threads", 6)
    yield monkeypatch
    torch.set_num_threads(saved)


@pytest.mark.parametrize("variable, procs, expected", [
    (None, None, 4),                      # one process: every core
    ("LOCAL_WORLD_SIZE", "2", 2),         # torchrun
    ("LOCAL_SIZE", "4", 1),               # the deepspeed launcher
    ("WORLD_SIZE", "3", 1),               # no launcher variable: one node assumed, 4 // 3
    ("LOCAL_SIZE", "8", 1),               # never below 1
])
def test_threads_are_cores_over_local_processes(threads_env, variable, procs, expected):
    if variable:
        threads_env.setenv(variable, procs)
    choice = distributed.configure_threads()
    assert choice.threads == expected == torch.get_num_threads()
    assert choice.describe() == (f"{expected} intra-op thread{'s' if expected != 1 else ''} per process (4 cores / "
                                 f"{procs or 1} local process{'es' if (procs or '1') != '1' else ''})")


def test_the_users_choice_is_kept(threads_env):
    threads_env.setenv("LOCAL_SIZE", "2")
    threads_env.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)                          # what torch makes of OMP_NUM_THREADS at start-up
    threads_env.setitem(distributed._DEFAULT, "threads", 3)
    choice = distributed.configure_threads()
    assert (choice.threads, torch.get_num_threads()) == (3, 3)
    assert choice.reason == "OMP_NUM_THREADS=3 set by the user or launcher"
    threads_env.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(1)                          # torch.set_num_threads before the run
    choice = distributed.configure_threads()
    assert (choice.threads, torch.get_num_threads()) == (1, 1)
    assert choice.reason == "set with torch.set_num_threads before the run"


def test_a_bad_process_count_is_named(threads_env):
    threads_env.setenv("LOCAL_SIZE", "two")
    with pytest.raises(ValueError, match="environment variable LOCAL_SIZE must be an integer, got 'two'"):
        distributed.configure_threads()


def test_fewer_threads_than_cpus_when_torch_uses_fewer(threads_env):
    """torch's default (physical cores) caps the count: SMT siblings are not added."""
    threads_env.setitem(distributed._DEFAULT, "threads", 2)
    torch.set_num_threads(2)
    assert distributed.configure_threads().threads == 2


def test_without_a_recorded_default_the_current_count_is_the_default(threads_env):
    """A caller that never recorded torch's default (training in its own process): the count in force when the run
    starts is recorded as the default, so it is split over the local processes, not kept as a choice."""
    threads_env.delitem(distributed._DEFAULT, "threads")
    threads_env.setenv("LOCAL_SIZE", "2")
    choice = distributed.configure_threads()
    assert (choice.threads, choice.reason) == (2, "4 cores / 2 local processes")
    assert distributed._DEFAULT == {"threads": 6}
    assert distributed.record_default_threads() == 6          # the first record wins


def test_importing_reads_no_thread_count():
    """Nothing is recorded at import: the entry point records torch's default, first of all."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); from dartmamba_train import distributed, cli, loop; "
            "assert distributed._DEFAULT == {}, distributed._DEFAULT; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_command_line_records_torchs_default_first(threads_env, tiny_recipe, capsys):
    from dartmamba_train import cli

    threads_env.delitem(distributed._DEFAULT, "threads")
    assert cli.main(["--config", tiny_recipe, "--print-config"]) == 0
    assert distributed._DEFAULT == {"threads": 6}


def test_a_run_logs_its_thread_choice(tiny_recipe, tmp_path):
    env = train_env()
    env.pop("OMP_NUM_THREADS")
    result = run_train(["--config", tiny_recipe, f"output.dir={tmp_path / 'run'}", "train.epochs=1"], env=env)
    cores = min(distributed.available_cores(), torch.get_num_threads())
    assert f"threads: {cores} intra-op thread{'s' if cores != 1 else ''} per process ({cores} core" in result.stdout
    result = run_train(["--config", tiny_recipe, f"output.dir={tmp_path / 'run1'}", "train.epochs=1"])
    assert "threads: 1 intra-op thread per process (OMP_NUM_THREADS=1 set by the user or launcher)" in result.stdout


def test_a_cpu_run_logs_its_allocator(tiny_recipe, tmp_path):
    result = run_train(["--config", tiny_recipe, f"output.dir={tmp_path / 'run'}", "train.epochs=1"])
    assert "allocator: glibc malloc: mmap threshold 32 MiB" in result.stdout or platform.libc_ver()[0] != "glibc"
