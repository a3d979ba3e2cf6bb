"""``dartmamba-train --submit slurm|local ...``: submit the run as a job through submitit instead of training here.

    dartmamba-train --submit slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 --account myproj \\
        --config vim_small_dart data.root=/data/imagenet output.dir=/shared/runs/vim_s
    dartmamba-train --submit local --tasks-per-node 2 --wait --config demo/vim_dart output.dir=runs/demo

The job runs the same command line (with ``resume=auto`` unless ``resume`` is given) in every task: ``nodes x
tasks-per-node`` processes (tasks per node default to the GPUs per node, else 1), which find their rank, world size
and master address from submitit's job environment (SLURM's variables under SLURM), so no pdsh or ssh is needed.
Logs go per job into ``--job-dir`` (default ``<output.dir>/jobs/<job id>/``: submitit's stdout and stderr of every
task); outputs into ``output.dir`` as usual.

Preemption (:mod:`.preempt`): SLURM sends SIGUSR2 ``--signal-delay`` seconds before the time limit (submitit's
``--signal=USR2@delay``) and SIGTERM on preemption; the job handles TERM, USR1 and USR2, saves after the update in
flight and, with requeue on (the default), requeues itself with ``scontrol requeue``; the requeued job resumes
where it stopped. The ``local`` executor (machines without SLURM) runs the tasks as local processes; it cannot
requeue.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_submit_arguments", "check_submit_arguments", "job_argv", "TrainJob", "submit"]


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("submitting a job (submitit; see docs/cluster.md)")
    group.add_argument("--submit", choices=["slurm", "local"], default=None,
                       help="submit the run as a job to SLURM, or to submitit's local executor, instead of training "
                            "in this process")
    group.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    group.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    group.add_argument("--tasks-per-node", type=int, default=None,
                       help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    group.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per process")
    group.add_argument("--partition", default=None, help="SLURM partition")
    group.add_argument("--time", type=int, default=60, help="time limit in minutes (default 60)")
    group.add_argument("--account", default=None, help="SLURM account")
    group.add_argument("--signal-delay", type=int, default=120,
                       help="seconds before the time limit at which SLURM signals the job to save (default 120)")
    group.add_argument("--no-requeue", dest="requeue", action="store_false",
                       help="do not requeue the job after a preemption or time-limit save")
    group.add_argument("--job-dir", default=None, help="folder of the job's logs (default <output.dir>/jobs)")
    group.add_argument("--job-name", default="dartmamba", help="the job's name (default dartmamba)")
    group.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")


def check_submit_arguments(args: argparse.Namespace) -> str | None:
    """The first bad submit option as one line (None: all fine)."""
    for name, minimum in (("nodes", 1), ("gpus_per_node", 0), ("tasks_per_node", 1), ("cpus_per_task", 1),
                          ("time", 1), ("signal_delay", 0)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            return f"--{name.replace('_', '-')}: expected an integer >= {minimum}, got {value}"
    if args.submit == "local" and (args.partition or args.account):
        return "--partition / --account: only for --submit slurm"
    if args.signal_delay >= args.time * 60:
        return f"--signal-delay: {args.signal_delay} s must be shorter than --time {args.time} min"
    return None


def job_argv(args: argparse.Namespace) -> list[str]:
    """The command line every task of the job runs: the same config and overrides (the config as an absolute path
    when it is a file), ``resume=auto`` added unless ``resume`` is set, no submit options."""
    argv = []
    if args.config:
        argv += ["--config", os.path.abspath(args.config) if os.path.isfile(args.config) else args.config]
    overrides = list(args.overrides)
    if not any(item.split("=", 1)[0].strip() == "resume" for item in overrides):
        overrides.append("resume=auto")
    return argv + overrides


class TrainJob:
    """The job submitit runs in every task: the launcher variables from submitit's job environment, then the
    command line's ``main``. ``checkpoint`` (submitit calls it on the time-limit signal when training is not running
    to handle it) requeues the same job."""

    def __init__(self, argv: list[str], cwd: str, signals: str, requeue: bool):
        self.argv, self.cwd, self.signals, self.requeue = list(argv), cwd, signals, requeue

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        os.chdir(self.cwd)
        env = {"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
               "LOCAL_WORLD_SIZE": str(max(1, job.num_tasks // max(1, job.num_nodes))),
               "MASTER_ADDR": job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1",
               "MASTER_PORT": str(20000 + int("".join(c for c in str(job.job_id) if c.isdigit()) or 0) % 20000),
               "DARTMAMBA_PREEMPT_SIGNALS": self.signals,
               "DARTMAMBA_PREEMPT_REQUEUE": "1" if self.requeue else "0"}
        os.environ.update(env)
        from .cli import main

        code = main(self.argv)
        if code:
            raise RuntimeError(f"dartmamba-train {' '.join(self.argv)} exited with status {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self) if self.requeue else None


def submit(args: argparse.Namespace, cfg) -> int:
    """Submit the run ``args`` / ``cfg`` describe; prints the job id and where its logs go. Returns the CLI's exit
    status (0; with ``--wait``, the job's)."""
    problem = check_submit_arguments(args)
    if problem:
        print(f"dartmamba-train: {problem}", file=sys.stderr)
        return 2
    try:
        import submitit
    except ImportError:
        print("dartmamba-train: --submit needs submitit (pip install submitit)", file=sys.stderr)
        return 2
    job_dir = os.path.abspath(args.job_dir or os.path.join(cfg.output.dir, "jobs"))
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    executor = submitit.AutoExecutor(folder=os.path.join(job_dir, "%j"), cluster=args.submit)
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=tasks, timeout_min=args.time)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.submit == "slurm":
        params.update(slurm_signal_delay_s=args.signal_delay)
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
        if args.requeue:
            params["slurm_additional_parameters"] = {"requeue": True}
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(job_argv(args), os.getcwd(), "TERM,USR1,USR2", args.requeue))
    print(f"dartmamba-train: submitted job {job.job_id} ({args.submit}: {args.nodes} node(s) x {tasks} task(s)); "
          f"logs in {os.path.dirname(str(job.paths.stdout))}", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()                       # one per task
    except Exception as err:  # noqa: BLE001  (submitit raises the job's failure with its traceback)
        print(f"dartmamba-train: job {job.job_id} failed: {str(err).strip().splitlines()[-1]}; logs in "
              f"{os.path.dirname(str(job.paths.stdout))}", file=sys.stderr)
        return 1
    print(f"dartmamba-train: job {job.job_id} finished", flush=True)
    return 0
