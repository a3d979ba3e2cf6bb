"""Process-group setup for one process without a launcher, or many under ``deepspeed`` / ``torchrun``.

The DeepSpeed launcher (and torchrun) export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and pass
``--local_rank=N``. Tasks started by SLURM's ``srun`` (``srun -N2 --ntasks-per-node=4 python train/train.py ...``: no
pdsh or ssh) take them from SLURM's variables (:func:`slurm_launch_env`): RANK = SLURM_PROCID, WORLD_SIZE =
SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID, LOCAL_WORLD_SIZE = this node's share of SLURM_STEP_TASKS_PER_NODE,
MASTER_ADDR = the step's first node (``scontrol show hostnames $SLURM_STEP_NODELIST``), MASTER_PORT = a port
derived from the job id (the same on every task), unless set. A launcher's own RANK wins (the deepspeed launcher
inside an allocation). A plain ``python train/train.py`` gets single-process defaults (rank 0 of 1 on 127.0.0.1 and a
free port), so DeepSpeed never falls back to MPI discovery.

On CPU the process group is gloo, and DeepSpeed's shared-memory all-reduce op (a JIT build of minutes on first
use) is switched off before the process group starts (:func:`dartmamba.compat.deepspeed.disable_cpu_shm_comm`);
everything else is DeepSpeed's own code path.

Threads. Each process runs torch's intra-op work on the node's threads (torch's default count: its physical cores,
at most the CPUs this process may use) divided by the processes of its node (``LOCAL_WORLD_SIZE`` from torchrun,
``LOCAL_SIZE`` from the deepspeed launcher, else ``WORLD_SIZE``), as torchrun does with OMP_NUM_THREADS: with 2
threads each, two processes on 2 cores ran many times slower than with 1 each. A choice the user made is kept:
OMP_NUM_THREADS / MKL_NUM_THREADS in the environment (also what launchers set), or ``torch.set_num_threads``
called before the run started. The choice and its reason go into the run's log.

To tell the user's ``torch.set_num_threads`` from torch's default, the command line (:mod:`.cli`) calls
:func:`record_default_threads` first of all, before any of its own code could change the count; nothing is read
at import. A caller that runs training in its own process (``loop.run``) and wants its own count set with
``torch.set_num_threads`` calls :func:`record_default_threads` before that; without a recorded count, the count in
force when the run starts counts as torch's default.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "ThreadChoice", "launch_rank_and_world", "slurm_launch_env", "apply_env_defaults",
           "record_default_threads", "configure_threads", "init_distributed", "barrier", "all_reduce_mean",
           "all_reduce_sum"]

# {"threads": torch's intra-op count before the user's code could change it}, once recorded
_DEFAULT: dict = {}


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def describe(self) -> str:
        return f"{self.threads} intra-op thread{'s' if self.threads != 1 else ''} per process ({self.reason})"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    threads: ThreadChoice | None = None
    allocator: str | None = None      # what dartmamba.runtime.tune_cpu_allocator did (CPU runs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM host list (``scontrol show hostnames``; without scontrol, its first entry expanded
    by hand: ``node[03-05,9],gpu1`` -> ``node03``)."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()[0]
    return _first_of_hostlist(nodelist)


def _first_of_hostlist(nodelist: str) -> str:
    """The first host of a SLURM host list, expanded by hand (``node[03-05,9],gpu1`` -> ``node03``)."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, ranges = nodelist[:nodelist.index("]")].split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def _tasks_on_node(tasks_per_node: str, node: int) -> int:
    """This node's task count from SLURM's compressed form (``2(x3),1``: nodes 0-2 run 2 tasks, node 3 one)."""
    counts = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node] if node < len(counts) else counts[-1]


def slurm_launch_env(environ=None) -> dict[str, str]:
    """The launcher variables of a task started by ``srun`` (see the module docstring); {} outside an ``srun``
    step (a batch script's own shell has no SLURM_STEP_NUM_TASKS) or where a launcher already set RANK."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if env.get("SLURM_STEP_TASKS_PER_NODE"):
        out["LOCAL_WORLD_SIZE"] = str(_tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], int(env.get("SLURM_NODEID", 0))))
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in env and nodes:
        out["MASTER_ADDR"] = _first_host(nodes)
    if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
        step = env.get("SLURM_STEP_ID", "0")
        out["MASTER_PORT"] = str(20000 + (int(env["SLURM_JOB_ID"]) * 7 + (int(step) if step.isdigit() else 0)) % 20000)
    return out


def launch_rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as the launcher (or ``srun``) set them (0, 1 without one), before any process group
    exists."""
    slurm = slurm_launch_env()
    if slurm:
        return int(slurm["RANK"]), int(slurm["WORLD_SIZE"])
    return (_env_int("RANK") if "RANK" in os.environ else 0,
            _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1)


def apply_env_defaults(local_rank: int | None = None) -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for a single process where unset.

    ``local_rank`` is the launcher's ``--local_rank`` argument (it wins over a missing LOCAL_RANK). A multi-process
    world (WORLD_SIZE > 1) must come with MASTER_ADDR and MASTER_PORT from its launcher.
    """
    os.environ.update(slurm_launch_env())
    if local_rank is not None and local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    world = os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    if _env_int("WORLD_SIZE") > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several processes with "
                               f"the deepspeed launcher (deepspeed train/train.py ...) or torchrun")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={size})")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, else
    WORLD_SIZE (one node), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        if os.environ.get(name):
            return max(1, _env_int(name))
    return 1


def record_default_threads() -> int:
    """Record torch's intra-op thread count as its default (the first call wins; later calls return it). Call it
    before anything may call ``torch.set_num_threads``: the command line does, first of all."""
    return _DEFAULT.setdefault("threads", torch.get_num_threads())


def configure_threads() -> ThreadChoice:
    """Set torch's intra-op threads to the node's threads // local processes unless the user chose (see the module
    docstring); returns the count in force and why."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name):
            return ThreadChoice(torch.get_num_threads(), f"{name}={os.environ[name]} set by the user or launcher")
    current = torch.get_num_threads()
    default = record_default_threads()
    if current != default:
        return ThreadChoice(current, "set with torch.set_num_threads before the run")
    cores, procs = min(available_cores(), default), local_processes()
    threads = max(1, cores // procs)
    if threads != current:
        torch.set_num_threads(threads)
    return ThreadChoice(threads, f"{cores} core{'s' if cores != 1 else ''} / {procs} local "
                                 f"process{'es' if procs != 1 else ''}")


def init_distributed(local_rank: int | None = None) -> DistInfo:
    """Join (or create) the process group through DeepSpeed, pick this process's device and its intra-op threads."""
    apply_env_defaults(local_rank)
    threads = configure_threads()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from dartmamba.compat.deepspeed import disable_cpu_shm_comm

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        disable_cpu_shm_comm()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = _env_int("LOCAL_RANK")
    allocator = None
    if accelerator.device_name() == "cpu":
        from dartmamba.runtime import tune_cpu_allocator

        device = torch.device("cpu")
        allocator = tune_cpu_allocator()
    else:
        accelerator.set_device(local)
        device = torch.device(accelerator.device_name(local))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device, threads=threads,
                    allocator=allocator)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; identity without a process group)."""
    out = tensor.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    out = all_reduce_sum(tensor)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out /= torch.distributed.get_world_size()
    return out
