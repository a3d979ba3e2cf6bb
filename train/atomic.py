"""Atomic file writes: nothing half-written is ever visible under the final name.

Every writer puts the bytes in a temporary file in the destination folder (same file system), flushes and fsyncs
it, then ``os.replace``-s it over the final name, so a reader (or a resumed run after ``kill -9``) sees either the
old file or the new one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_path", "fsync_dir"]


def fsync_dir(path: str) -> None:
    """Persist a directory entry (a rename) on file systems that need it; a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

        with atomic_path("model.safetensors") as tmp:
            save_file(state, tmp)
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
