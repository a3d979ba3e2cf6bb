"""Files, written once: atomic writes, reading checkpoints, and the project's safetensors format.

Atomic writes. Every writer puts the bytes in a temporary file in the destination folder (same file system),
flushes and fsyncs it, gives it ordinary permissions, then ``os.replace``-s it over the final name, so a reader (or a
resumed run after ``kill -9``) sees either the old file or the new one, never a half-written one. A write that meets
a full disk removes its temporary file and raises :class:`DiskFullError` (an ``OSError``, ENOSPC) naming the file,
the bytes it needed and the bytes free.

Checkpoints. :func:`read_state_dict` reads a ``.safetensors`` or torch file (hustvl/Vim and DeiT files hold the
tensors under ``"model"``); :func:`write_safetensors` writes ours (the model's config and any metadata inside).

Content digests. Our safetensors files carry the SHA-256 of every tensor's bytes (as stored: C order, little
endian), computed once when the file is written, in two places:

- the header metadata (:data:`DIGEST_KEY`), read by our own readers (:func:`read_safetensors`,
  :func:`read_state_dict`, :func:`verify_digests`) and by ``dartmamba_train`` (resume checks);
- one extra uint8 tensor, :data:`DIGEST_TENSOR` (the same table as JSON, with a SHA-256 of the table itself),
  written for files of dartmamba's models (``config`` given). It travels with the weights through any loader
  that hands the file's tensors to the model (``timm.create_model(checkpoint_path=...)``,
  ``timm.models.load_checkpoint``, ``pretrained_cfg_overlay=dict(file=...)``, ``safetensors.torch.load_file`` +
  ``load_state_dict``); the model's ``pretrained_filter_fn`` or its ``load_state_dict`` pre-hook verifies the
  tensors against it and removes it (:func:`verify_and_strip_digests`), so strict loading sees the model's tensors
  only. Files of other models get the header table only, so any strict loader still reads them.

A file whose payload changed after it was written (a bad copy, disk or transfer; safetensors itself checks only the
header) is a :class:`CorruptCheckpointError` naming the file (or, in a loader that does not tell the model the
file, the model) and the first tensor that differs. Files without digests (other tools') load as before; files
with the header table only (written before the digest tensor existed) are verified by our readers, not by timm's
loaders. The hash is SHA-256 (see docs/benchmarks.md for its cost).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "read_state_dict", "DiskFullError",
           "free_bytes", "format_bytes", "space_errno",
           "read_safetensors", "read_safetensors_header", "unwrap_state_dict", "write_safetensors", "tensor_digest",
           "digest_mismatch", "verify_digests", "verify_and_strip_digests", "CorruptCheckpointError", "STATE_DICT_KEYS",
           "CONFIG_KEY", "DIGEST_KEY", "DIGEST_TENSOR"]

CONFIG_KEY = "dartmamba_config"     # safetensors metadata entry holding the model's timm name and kwargs
DIGEST_KEY = "dartmamba_digests"    # safetensors metadata entry: {"algorithm": "sha256", "tensors": {name: hex}}
DIGEST_TENSOR = "__dartmamba_digests__"   # uint8 tensor in our models' files: the digest table as JSON
DIGEST_ALGORITHM = "sha256"

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


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (its nearest existing
    folder); None where that cannot be read."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def format_bytes(count: int | None) -> str:
    if count is None:
        return "an unknown amount"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


class DiskFullError(OSError):
    """Writing ``path`` failed for lack of space (ENOSPC or EDQUOT): one line naming the file, the bytes it needed
    (``needed``, None: not known) and the bytes free after the partial file was removed (``free``)."""

    def __init__(self, path: str, needed: int | None, code: int = errno.ENOSPC):
        self.path, self.needed, self.free = path, needed, free_bytes(path)
        need = "" if needed is None else f" needs {format_bytes(needed)},"
        message = (f"{path}: no space left on device: writing it{need} {format_bytes(self.free)} free in "
                   f"{os.path.dirname(path)}")
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return type(self), (self.path, self.needed, self.errno)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, needed: int | None = None):
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.
    ``needed``: the bytes to be written, for the message of :class:`DiskFullError` (raised instead of an
    ``OSError`` ENOSPC / EDQUOT, after the temporary file is gone).

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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        space = space_errno(exc)
        if space is not None and not isinstance(exc, DiskFullError):
            raise DiskFullError(path, needed, space) from exc
        raise


def space_errno(exc: BaseException) -> int | None:
    """ENOSPC / EDQUOT when ``exc`` or an exception it was raised from is such an OSError (safetensors' writer
    reports it wrapped), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc.errno
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return errno.EDQUOT if "quota" in str(exc) else errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, needed=len(data)) as tmp:
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


class CorruptCheckpointError(ValueError):
    """A checkpoint whose tensors do not match the digests written with them."""


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes as safetensors stores them: C order, native (little-endian) layout."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Digest tables: {name: sha256 hex}, in the header metadata (DIGEST_KEY) and in the digest tensor (DIGEST_TENSOR)
# ----------------------------------------------------------------------------------------------------------------
def _table_digest(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(digests, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digest_tensor(digests: dict[str, str]) -> Tensor:
    """(n,) uint8: the JSON of ``{"algorithm", "tensors": digests, "table": sha256 of the canonical digests}``; the
    table's own digest tells a damaged table from a damaged tensor."""
    text = json.dumps({"algorithm": DIGEST_ALGORITHM, "tensors": digests, "table": _table_digest(digests)})
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def _read_digest_tensor(value) -> dict[str, str]:
    """The ``{name: digest}`` table a digest tensor holds; ValueError saying what is wrong with it."""
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"it is not a 1-D uint8 tensor (got {type(value).__name__} "
                         f"{getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))})")
    try:
        table = json.loads(bytes(value.detach().to("cpu").numpy()).decode())
        algorithm, digests, check = table["algorithm"], table["tensors"], table["table"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"it does not hold a digest table ({type(exc).__name__}: {exc})") from None
    if algorithm != DIGEST_ALGORITHM:
        raise ValueError(f"its digests use {algorithm!r}, this dartmamba verifies {DIGEST_ALGORITHM!r}")
    if not isinstance(digests, dict) or _table_digest(digests) != check:
        raise ValueError("the table does not match its own sha256 digest")
    return digests


def _header_table(metadata: dict) -> dict[str, str] | None:
    """The digest table of a file's header metadata (None: the file has none); ValueError when it is damaged."""
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None:
        return None
    try:
        recorded = json.loads(recorded)
        algorithm, digests = recorded["algorithm"], recorded["tensors"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"its {DIGEST_KEY!r} metadata is damaged ({exc})") from None
    if algorithm != DIGEST_ALGORITHM:
        raise ValueError(f"its digests use {algorithm!r}, this dartmamba verifies {DIGEST_ALGORITHM!r}")
    return digests


def _first_difference(tensors: Mapping[str, Tensor], digests: dict[str, str], *, prefix: str = "",
                      unlisted_ok: bool = False, missing_ok: bool = False) -> str | None:
    """The first tensor of ``tensors`` (names under ``prefix``) that differs from ``digests``, in the order the file
    was written, or None. ``unlisted_ok``: names the table does not list are not checked (a filter renamed them);
    ``missing_ok``: tensors the table lists may be absent (a loader dropped them)."""
    if not unlisted_ok:
        for key in tensors:
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and name != DIGEST_TENSOR and name not in digests:
                return f"tensor {name!r} is not among the tensors it was written with"
    for name, digest in digests.items():
        value = tensors.get(prefix + name)
        if value is None:
            if missing_ok:
                continue
            return f"tensor {name!r} is missing"
        if tensor_digest(value) != digest:
            return f"tensor {name!r} does not match its {DIGEST_ALGORITHM} digest"
    return None


def _corrupt(subject: str, problem: str, cause: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{subject} is corrupt: {problem} ({cause}); restore it from a good copy")


_FILE_CAUSE = "the file changed after it was saved: a bad copy, disk or transfer"


def digest_mismatch(tensors: dict[str, Tensor], metadata: dict, partial: bool = False) -> str | None:
    """What differs between ``tensors`` and the digests in a file's header ``metadata`` (None: nothing, or no
    digests).

    ``partial``: ``tensors`` may hold a subset of the file's (a loader that dropped some); a tensor the digests do
    not list differs either way (the digest tensor itself is not a tensor of the model and is skipped). Tensors are
    checked in the order the file was written; the first difference is reported ("tensor 'x' does not match its
    sha256 digest").
    """
    try:
        digests = _header_table(metadata)
    except ValueError as exc:
        return str(exc)
    if digests is None:
        return None
    return _first_difference(tensors, digests, missing_ok=partial)


def verify_digests(tensors: dict[str, Tensor], metadata: dict, path: str, what: str = "checkpoint",
                   partial: bool = False) -> None:
    """Raise :class:`CorruptCheckpointError` naming the file and the first tensor of ``tensors`` that differs from
    the digests in its header ``metadata`` (see :func:`digest_mismatch`); files without digests pass."""
    problem = digest_mismatch(tensors, metadata, partial)
    if problem is not None:
        raise _corrupt(f"{what} file {path}", problem, _FILE_CAUSE)


def verify_and_strip_digests(state_dict: MutableMapping[str, Tensor], source: str, prefix: str = "") -> bool:
    """When ``state_dict`` holds the digest tensor (``prefix + DIGEST_TENSOR``): remove it (in place) and verify the
    tensors it lists that are present (under ``prefix``) against it, hashing each once. Returns whether it held one.

    The rule every loader path shares: a listed tensor that arrives under its file name must hold the bytes it was
    written with. Tensors a loader dropped are left to ``load_state_dict``'s strict check, names the table does not
    list (renamed by a ``filter_fn``) are not checked. A ``filter_fn`` that changes a tensor's values under its own
    name must verify first and drop the digest tensor, as the models' ``checkpoint_filter_fn`` does.

    Args:
        state_dict: what a loader read ({name: tensor}); the digest tensor is removed from it.
        source: what the tensors are, for the error ("checkpoint file run/model.safetensors", "the state dict
            loaded into VisionMamba").
        prefix: the module prefix the tensors (and the digest tensor) carry.

    Raises:
        CorruptCheckpointError: ``"<source> is corrupt: tensor 'x' does not match its sha256 digest (...)"``, or
            ``"...: its digest tensor '__dartmamba_digests__' is damaged (...)"``.
    """
    key = prefix + DIGEST_TENSOR
    if key not in state_dict:
        return False
    try:
        digests = _read_digest_tensor(state_dict.pop(key))
    except ValueError as exc:
        raise _corrupt(source, f"its digest tensor {DIGEST_TENSOR!r} is damaged: {exc}", _FILE_CAUSE) from None
    problem = _first_difference(state_dict, digests, prefix=prefix, unlisted_ok=True, missing_ok=True)
    if problem is not None:
        raise _corrupt(source, problem, f"{_FILE_CAUSE}; or a filter_fn changed it, and such a filter must drop "
                                        f"{DIGEST_TENSOR!r} after verifying")
    return True


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------------------------
def read_safetensors_header(path: str | os.PathLike, what: str = "checkpoint") -> tuple[dict, dict]:
    """(metadata, {name: (dtype, shape)}) of a ``.safetensors`` file, read from its header only; the digest tensor
    is not listed (it is not a tensor of the model)."""
    from safetensors import safe_open

    path = _existing_file(path, what)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                      for name in handle.keys() if name != DIGEST_TENSOR}
    except Exception as exc:
        raise _unreadable(path, what, exc) from exc
    return metadata, shapes


def read_safetensors(path: str | os.PathLike, what: str = "checkpoint", verify: bool = True
                     ) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a ``.safetensors`` file, the digest tensor removed; with ``verify``, every tensor is
    checked against the file's digests (the digest tensor's table when there is one, else the header's; each
    tensor hashed once) and a tensor either table does not list is an error."""
    from safetensors import safe_open

    path = _existing_file(path, what)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:
        raise _unreadable(path, what, exc) from exc
    if DIGEST_TENSOR not in tensors:
        if verify:
            verify_digests(tensors, metadata, path, what)
        return tensors, metadata
    encoded = tensors.pop(DIGEST_TENSOR)
    if verify:
        subject = f"{what} file {path}"
        try:
            digests = _read_digest_tensor(encoded)
        except ValueError as exc:
            raise _corrupt(subject, f"its digest tensor {DIGEST_TENSOR!r} is damaged: {exc}", _FILE_CAUSE) from None
        problem = _first_difference(tensors, digests)
        if problem is not None:
            raise _corrupt(subject, problem, _FILE_CAUSE)
    return tensors, metadata


def _existing_file(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def _unreadable(path: str, what: str, exc: Exception) -> ValueError:
    return ValueError(f"cannot read {what} file {path}: it is truncated, corrupt or not a checkpoint "
                      f"({type(exc).__name__}: {exc})")


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors of a local ``.safetensors`` or torch file (unwrapped, see :func:`unwrap_state_dict`; the digest
    tensor verified and removed), with a clear error naming the file when it is missing, truncated, not a checkpoint
    or fails its digests."""
    path = _existing_file(path, what)
    if path.endswith(".safetensors"):
        state, _ = read_safetensors(path, what)
    else:
        try:
            # official training checkpoints (hustvl/Vim, DART, DeiT) also hold their argparse arguments
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _unreadable(path, what, exc) from exc
        state = unwrap_state_dict(state)
        if isinstance(state, dict) and DIGEST_TENSOR in state:       # a state dict of ours saved with torch.save
            state = dict(state)
            verify_and_strip_digests(state, f"{what} file {path}")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} file {path} does not hold a state dict of tensors")
    return state


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, *, config: dict | None = None,
                      metadata: dict | None = None, digest_tensor: bool | None = None) -> None:
    """Write ``tensors`` (moved to CPU, made contiguous) to ``path`` atomically, in the project's format: the
    ``format`` entry safetensors readers expect, the model ``config`` (timm name + kwargs, under
    :data:`CONFIG_KEY`) when given, the SHA-256 of every tensor (under :data:`DIGEST_KEY`) and ``metadata`` (values
    as strings).

    ``digest_tensor``: also store the digest table as the tensor :data:`DIGEST_TENSOR`, which timm's loaders hand to
    the model for verification; default: when ``config`` is given (a dartmamba model, whose load hook removes it).
    Leave it off for other models: their strict ``load_state_dict`` would call it an unexpected key."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"path must end with .safetensors, got {path!r}")
    if DIGEST_TENSOR in tensors:
        raise ValueError(f"tensors must not hold {DIGEST_TENSOR!r} (write_safetensors writes it; drop the one a "
                         f"loaded file held)")
    header = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    if config is not None:
        header[CONFIG_KEY] = json.dumps(config)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    digests = {k: tensor_digest(v) for k, v in payload.items()}
    header[DIGEST_KEY] = json.dumps({"algorithm": DIGEST_ALGORITHM, "tensors": digests})
    if config is not None if digest_tensor is None else digest_tensor:
        payload[DIGEST_TENSOR] = _digest_tensor(digests)
    needed = sum(v.numel() * v.element_size() for v in payload.values())
    needed += len(json.dumps(header)) + 128 * len(payload)          # the header: metadata + one entry per tensor
    with atomic_path(path, needed=needed) as tmp:
        save_file(payload, tmp, metadata=header)
