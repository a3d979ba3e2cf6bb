"""The typed errors of a run's files: each message is one line naming the file and the cause; the CLI prints it
and exits 2. All are :class:`CheckpointError` s, so one ``except CheckpointError`` catches every file problem of
a run (checkpoints, logs, the output folder)."""
from __future__ import annotations

import errno
import os

from dartmamba.files import DiskFullError, free_bytes, format_bytes

__all__ = ["CheckpointError", "RunFileError", "OutputDirUnusable", "CorruptRunFile", "DiskFull", "file_error"]


class CheckpointError(RuntimeError):
    pass


class RunFileError(CheckpointError):
    """A file of the run (in output.dir, or of the checkpoint it resumes) cannot be written or read."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class OutputDirUnusable(RunFileError):
    """output.dir is a file, or a folder in which files cannot be created (read-only, no permission)."""


class CorruptRunFile(RunFileError):
    """A file of the run does not parse (steps.csv, trainer_state.json, a DeepSpeed ``.pt``)."""


class DiskFull(RunFileError):
    """A write failed for lack of space (ENOSPC, EDQUOT); ``needed`` and ``free`` are bytes (None: not known)."""

    def __init__(self, message: str, path: str | None = None, needed: int | None = None, free: int | None = None):
        super().__init__(message, path)
        self.needed, self.free = needed, free


_SPACE = (errno.ENOSPC, errno.EDQUOT)


def file_error(path: str, exc: BaseException, doing: str, needed: int | None = None, hint: str = "") -> RunFileError:
    """The typed error for an OSError ``exc`` met while ``doing`` something to ``path`` (``"writing"``):
    :class:`DiskFull` with the bytes needed and free for ENOSPC / EDQUOT, :class:`RunFileError` otherwise."""
    hint = f"; {hint}" if hint else ""
    if isinstance(exc, DiskFullError):
        return DiskFull(f"{exc}{hint}", exc.path, exc.needed, exc.free)
    if getattr(exc, "errno", None) in _SPACE:
        free = free_bytes(path)
        need = "" if needed is None else f" needs {format_bytes(needed)},"
        return DiskFull(f"{path}: no space left on device: {doing} it{need} {format_bytes(free)} free in "
                        f"{os.path.dirname(path)}{hint}", path, needed, free)
    reason = os.strerror(exc.errno) if getattr(exc, "errno", None) else f"{type(exc).__name__}: {exc}"
    return RunFileError(f"{path}: {doing} it failed: {reason.lower()}{hint}", path)
