"""Preemption: a signal (SIGTERM, SIGUSR1 by default) asks the run to stop; it finishes the update in flight, saves a
checkpoint on every rank through the normal atomic path (mid-epoch checkpoints carry the data position inside the
epoch), asks SLURM to requeue the job where told to, and exits with :data:`REQUEUE_EXIT_CODE`.

The handler only sets a Python flag; the loop reads it between updates. With several ranks, the ranks must stop at
the same update even when only one of them got the signal (``scancel --signal`` reaches every task, a node's
``SIGTERM`` only that node's): :class:`StopAgreement` all-reduces the flag (MAX) over a gloo group of CPU tensors,
asynchronously: the reduction started at update ``k`` is waited for at update ``k + 1``, so no device is ever
synchronised and the network round trip overlaps an update's compute. Every rank reads the same reduced value of
the same round, so all stop after the same update (one update after the signal at most).

Settings, read when a run starts:

- ``train.preempt_signals`` (else the environment's ``DARTMAMBA_PREEMPT_SIGNALS``): comma-separated signal names
  (``TERM,USR1``, the default; ``none`` handles none).
- ``train.preempt_requeue: true`` (or ``DARTMAMBA_PREEMPT_REQUEUE=1``): after the save, rank 0 runs ``scontrol
  requeue $SLURM_JOB_ID`` (under SLURM).

Exit status :data:`REQUEUE_EXIT_CODE` (75, ``EX_TEMPFAIL`` of sysexits.h: "temporary failure, retry") means "saved,
resume me": a batch script requeues on it (``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``), and
``resume=auto`` continues exactly where the run stopped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import torch

__all__ = ["REQUEUE_EXIT_CODE", "SIGNALS_ENV", "REQUEUE_ENV", "Preempted", "PreemptionHandler", "StopAgreement",
           "parse_signals", "requeue_slurm_job"]

REQUEUE_EXIT_CODE = 75
SIGNALS_ENV = "DARTMAMBA_PREEMPT_SIGNALS"
REQUEUE_ENV = "DARTMAMBA_PREEMPT_REQUEUE"
DEFAULT_SIGNALS = "TERM,USR1"
# Fault injection for the tests: DARTMAMBA_TRAIN_SIGNAL_AT=<update>[,<update>...] makes the process send itself
# SIGUSR1 right after finishing the first listed update above the one it started from.
SIGNAL_AT_ENV = "DARTMAMBA_TRAIN_SIGNAL_AT"


class Preempted(SystemExit):
    """The run stopped on a signal after saving; a SystemExit with :data:`REQUEUE_EXIT_CODE`, so the command line
    (and any script) exits with it. ``checkpoint`` is the saved checkpoint's folder."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message, self.checkpoint = message, checkpoint

    def __str__(self) -> str:
        return self.message


def parse_signals(text: str | None, source: str = SIGNALS_ENV) -> list[signal.Signals]:
    """``"TERM,USR1"`` -> [SIGTERM, SIGUSR1]; ``"none"`` or ``""`` -> []. ValueError names a bad entry and ``source``
    (where the text came from)."""
    text = (DEFAULT_SIGNALS if text is None else text).strip()
    if text.lower() in ("", "none"):
        return []
    out = []
    for part in text.split(","):
        name = part.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise ValueError(f"{source}: {part.strip()!r} is not a catchable signal name; expected a "
                             f"comma-separated list such as TERM,USR1 (or none)")
        out.append(signal.Signals[name])
    return out


class PreemptionHandler:
    """Install handlers that record the first signal received (``signum``; None until one arrives) and restore the
    previous handlers on :meth:`restore`. Only the main thread can install handlers; elsewhere nothing is installed
    (``installed`` is False) and the run cannot be preempted gracefully."""

    def __init__(self, signals: list[signal.Signals], requeue: bool = False):
        self.signals, self.signum, self._previous = list(signals), None, {}
        self.requeue = requeue                          # train.preempt_requeue
        self.installed = False
        self._signal_at = sorted(int(x) for x in os.environ.get(SIGNAL_AT_ENV, "").split(",") if x.strip())

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> "PreemptionHandler":
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.installed = True
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous, self.installed = {}, False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def describe(self) -> str:
        if not self.signals:
            return f"preemption: no signals handled ({SIGNALS_ENV}=none)"
        if not self.installed:
            return "preemption: not handled (training does not run in the main thread)"
        names = ", ".join(s.name for s in self.signals)
        return (f"preemption: {names} save a checkpoint after the current update and exit {REQUEUE_EXIT_CODE}"
                + (" after scontrol requeue" if requeue_requested(self.requeue) else ""))

    def after_update(self, start_step: int, global_step: int) -> None:
        """Test hook (:data:`SIGNAL_AT_ENV`): signal this process after the chosen update."""
        if self._signal_at and global_step == next((u for u in self._signal_at if u > start_step), None):
            os.kill(os.getpid(), signal.SIGUSR1)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"


class StopAgreement:
    """Do all ranks stop now? One asynchronous all-reduce (MAX) of the local flag per call, waited for at the next
    call, over a gloo group of CPU tensors (``group``; None: no other ranks). :meth:`poll` (between updates) returns
    the previous round's verdict; :meth:`settle` (where no update follows: the end of an epoch) finishes the round
    in flight and runs one more synchronously. Every rank must call both the same number of times, in the same
    order."""

    def __init__(self, handler: PreemptionHandler, group=None, world_size: int = 1):
        self.handler, self.group, self.world_size = handler, group, world_size
        self._work, self._flag = None, None

    def _local(self) -> torch.Tensor:
        return torch.tensor([1 if self.handler.requested else 0], dtype=torch.int32)

    def _start(self) -> None:
        self._flag = self._local()
        self._work = torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX, group=self.group,
                                                  async_op=True)

    def _finish(self) -> bool:
        if self._work is None:
            return False
        self._work.wait()
        verdict = bool(self._flag.item())
        self._work, self._flag = None, None
        return verdict

    def poll(self) -> bool:
        if self.world_size == 1:
            return self.handler.requested
        verdict = self._finish()
        self._start()
        return verdict

    def settle(self) -> bool:
        if self.world_size == 1:
            return self.handler.requested
        verdict = self._finish()
        self._start()
        return self._finish() or verdict

    def close(self) -> None:
        """Wait for the round in flight (all ranks call it, e.g. when training ends)."""
        self._finish()


def requeue_requested(configured: bool = False) -> bool:
    """``train.preempt_requeue`` (``configured``) or :data:`REQUEUE_ENV` set to a true value."""
    return configured or os.environ.get(REQUEUE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def requeue_slurm_job(configured: bool = False) -> str | None:
    """``scontrol requeue $SLURM_JOB_ID`` when asked to (:data:`REQUEUE_ENV`) and under SLURM. Returns what was
    done (for the log), or None when nothing was asked."""
    if not requeue_requested(configured):
        return None
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" or os.environ.get("SLURM_JOB_ID")
    if not job:
        return f"requeue was asked for but this is not a SLURM job (no SLURM_JOB_ID): not requeued"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol requeue {job} failed: {err}"
    if proc.returncode != 0:
        return f"scontrol requeue {job} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
    return f"scontrol requeue {job}: done"
