"""Files, written once: atomic writes, reading checkpoints, and the project's safetensors format.

Atomic writes. Every writer puts the bytes in a temporary file in the destination folder (same file system),
flushes and fsyncs it, gives it ordinary permissions, then ``os.replace``-s it over the final name, so a reader (or a
resumed run after ``kill -9``) sees either the old file or the new one, never a half-written one.

Checkpoints. :func:`read_state_dict` reads a ``.safetensors`` or torch file (hustvl/Vim and DeiT files hold the
tensors under ``"model"``); :func:`write_safetensors` writes ours (the model's config and any metadata inside).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile

import torch
from torch import Tensor

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "read_state_dict",
           "unwrap_state_dict", "write_safetensors", "STATE_DICT_KEYS", "CONFIG_KEY"]

CONFIG_KEY = "dartmamba_config"     # safetensors metadata entry holding the model's timm name and kwargs

# where checkpoint files of other tools keep their tensors: hustvl/Vim and DeiT {"model": ...}, Lightning-style
# {"state_dict": ...}, DeepSpeed {"module": ...}, timm's EMA {"model_ema": ...} (the first one present wins)
STATE_DICT_KEYS = ("model", "state_dict", "module", "model_ema")


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------
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


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

        with atomic_path("model.safetensors") as tmp:
            save_file(state, tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())          # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def unwrap_state_dict(state: dict) -> dict:
    """The tensors of a loaded checkpoint: the first of :data:`STATE_DICT_KEYS` that holds a dict, else ``state``."""
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors of a local ``.safetensors`` or torch file (unwrapped, see :func:`unwrap_state_dict`), with a clear
    error naming the file when it is missing, truncated or not a checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            # official training checkpoints (hustvl/Vim, DART, DeiT) also hold their argparse arguments
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {what} file {path}: it is truncated, corrupt or not a checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    state = unwrap_state_dict(state)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} file {path} does not hold a state dict of tensors")
    return state


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, *, config: dict | None = None,
                      metadata: dict | None = None) -> None:
    """Write ``tensors`` (moved to CPU, made contiguous) to ``path`` atomically, in the project's format: the
    ``format`` entry safetensors readers expect, the model ``config`` (timm name + kwargs, under
    :data:`CONFIG_KEY`) when given, and ``metadata`` (values as strings)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"path must end with .safetensors, got {path!r}")
    header = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    if config is not None:
        header[CONFIG_KEY] = json.dumps(config)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(payload, tmp, metadata=header)
