"""One run per output directory: an OS lock on ``<output.dir>/.dartmamba-run.lock`` held for the run's lifetime.

Rank 0 takes it (``fcntl.flock``, exclusive, non-blocking) before it deletes or writes anything in the folder, and
writes who holds it (pid, host, start time, command) into the file. The kernel drops the lock when the process
ends however it ends (``kill -9`` included), so there is never a stale lock to clean up; a second run into the
same folder stops at once with a message naming the first. Processes forked while the lock is held (data loader
workers) close their copy of the descriptor, so only the run's own process keeps the lock alive. Multi-node runs
share one folder and one lock (rank 0's); on NFS, Linux implements ``flock`` with NFS byte-range locks.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile

from .errors import OutputDirUnusable

__all__ = ["OutputDirLock", "OutputDirLocked", "LOCK_FILE", "check_output_dir"]

LOCK_FILE = ".dartmamba-run.lock"
_HELD: dict[int, "OutputDirLock"] = {}     # fd -> lock, closed in forked children


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class OutputDirLocked(RuntimeError):
    """Another live run holds the output directory."""


def check_output_dir(out_dir: str) -> None:
    """``out_dir`` can hold a run: it is a folder, or can be made one, in which files can be created. Probes by
    creating (and removing) a temporary file or folder, so it leaves nothing behind; OutputDirUnusable in one line
    naming the path and the cause (a file in the way, a read-only file system, no permission)."""
    path = os.path.abspath(out_dir)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "it" if existing == path else existing
        kind = "a regular file, not a folder" if os.path.isfile(existing) else "not a folder"
        raise OutputDirUnusable(f"output.dir {path}: {what} is {kind}; move it away or choose another output.dir",
                                path)
    try:
        if existing == path:
            fd, probe = tempfile.mkstemp(prefix=".dartmamba-probe-", dir=path)
            os.close(fd)
            os.remove(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".dartmamba-probe-", dir=existing))
    except OSError as exc:
        raise _unusable(path, existing, exc) from None


def _unusable(path: str, folder: str, exc: OSError) -> OutputDirUnusable:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    doing = "create files in it" if folder == path else f"create it in {folder}"
    return OutputDirUnusable(f"output.dir {path}: cannot {doing} ({reason}); make it writable or choose another "
                             f"output.dir", path)


def _describe(owner: dict) -> str:
    keys = ("pid", "host", "started")
    if not all(k in owner for k in keys):
        return "details not written yet"
    return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"


class OutputDirLock:
    """``with OutputDirLock(out_dir):`` (or :meth:`acquire` / :meth:`release`). Creates ``out_dir`` if needed; that
    and the lock file are all it writes."""

    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        self.path = os.path.join(self.out_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            check_output_dir(self.out_dir)            # says why in one line
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read(fd)
            os.close(fd)
            raise OutputDirLocked(
                f"output.dir {self.out_dir} is in use by another run ({_describe(owner)}); wait for it to finish, "
                f"stop it, or give this run another output.dir") from None
        except BaseException:
            os.close(fd)
            raise
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self.fd = fd
        _HELD[fd] = self
        return self

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is not None:
            _HELD.pop(self.fd, None)
            os.close(self.fd)          # drops the lock; the file stays (removing it would race a new owner)
            self.fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
