"""Checkpoints: DeepSpeed's (model, optimizer, ZeRO partitions) plus consolidated ``.safetensors`` of the model and
its EMA, written so that a kill at any moment leaves every pointer naming a complete checkpoint.

Layout of ``<output.dir>``::

    checkpoints/epoch0007/        one complete checkpoint (DeepSpeed files, model.safetensors,
                                  model_ema.safetensors, trainer_state.json)
    checkpoints/last, best        pointer files holding a tag (replaced atomically)
    last.safetensors, last_ema.safetensors, best.safetensors, best_ema.safetensors   (hard links or copies)

A save writes everything into ``checkpoints/.staging/<tag>/``, renames that directory to ``checkpoints/<tag>``
(atomic), then replaces the ``last`` (and ``best``) pointer, then the top-level files, then prunes old tags. A
kill before the pointer moves leaves the previous checkpoint in charge; a kill after it leaves top-level files that
the resume publishes again (:func:`repair_published`, also when the run had finished); leftovers (``.staging``,
``.trash-*``) are cleared by the next save. Weights holding NaN or inf are never saved. The output directory must be
on a file system every rank sees (multi-node runs).

Nothing is deleted that is not proven superseded: with the ``last`` pointer missing or damaged, ``resume=auto``
takes the newest checkpoint whose state file parses and whose weights match their digests; a fresh run into a
folder holding checkpoints stops (:func:`check_fresh_output`), and ``output.overwrite=true`` moves them aside into
``previous-<UTC time>/`` (:func:`move_aside`). Only pruning (``train.keep_last``) removes checkpoints.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields

import torch

from dartmamba.files import (CONFIG_KEY, DiskFullError, atomic_write_text, digest_mismatch, format_bytes, free_bytes,
                             fsync_dir, read_safetensors, read_safetensors_header, read_state_dict, space_errno,
                             write_safetensors)
from .distributed import DistInfo, all_reduce_sum, barrier
from .engine import EngineParts, consolidated_state_dict
from .errors import CheckpointError, CorruptRunFile, DiskFull, OutputDirUnusable, RunFileError, file_error

__all__ = ["TrainerState", "save_checkpoint", "find_checkpoint", "load_checkpoint", "check_resumable", "checkpoint_root",
           "check_same_model", "check_fresh_output", "move_aside", "previous_run_files", "repair_published",
           "last_checkpoint", "first_nonfinite", "check_run_files", "CheckpointError", "OutputNotEmpty",
           "NonFiniteWeights", "RunFileError", "CorruptRunFile", "DiskFull", "OutputDirUnusable", "CRASH_ENV"]

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
TRASH = ".trash-"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
# Fault injection for the atomicity tests: with DARTMAMBA_TRAIN_CRASH_AT=<point>@<epoch> the process SIGKILLs itself
# at that point of the save after that epoch (points: save:staged, save:renamed, save:pointed).
CRASH_ENV = "DARTMAMBA_TRAIN_CRASH_AT"


class OutputNotEmpty(CheckpointError):
    """A fresh run into an output.dir that holds a previous run's checkpoints."""


class NonFiniteWeights(RuntimeError):
    """The weights to be saved hold NaN or inf (nothing was written)."""


@dataclass
class TrainerState:
    """What the loop needs to continue: epochs done, optimizer updates done, the best result, the epoch rows."""

    epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list = field(default_factory=list)
    world_size: int = 1
    zero_stage: int = 0
    precision: str = "fp32"
    skipped: int = 0                     # micro-batches skipped for a non-finite loss (train.nonfinite=skip)
    # a mid-epoch checkpoint (preemption, train/preempt.py): micro-steps of epoch ``epoch`` already done, and that
    # epoch's running sums at the stop (loss sums and counts of the epoch and of the open log interval)
    micro_in_epoch: int = 0
    epoch_partial: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        """ValueError saying what is wrong: not JSON, not an object, a key unknown, a count not an integer."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} (expected {', '.join(known)})")
        for key in ("epoch", "global_step", "world_size", "zero_stage", "skipped"):
            if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0):
                raise ValueError(f"{key!r} must be a non-negative integer, got {data[key]!r}")
        if not isinstance(data.get("history", []), list):
            raise ValueError(f"'history' must be a list, got {type(data['history']).__name__}")
        return cls(**data)


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINTS)


def tag_for_epoch(epoch: int) -> str:
    return f"epoch{epoch:04d}"


def _crash_point(name: str, epoch: int) -> None:
    if os.environ.get(CRASH_ENV) == f"{name}@{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def _read_pointer(root: str, name: str) -> str | None:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        tag = handle.read().strip()
    return tag or None


def _remove_tree(path: str) -> None:
    """Rename to a trash name first (atomic), then delete, so a half-deleted tree never carries a real tag."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f"{TRASH}{name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clear_leftovers(root: str) -> None:
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name == STAGING or name.startswith(TRASH):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _model_config(parts: EngineParts) -> dict | None:
    """The model's timm name and kwargs (``dartmamba.load_model`` reads them from the files) when it is one of
    dartmamba's models."""
    return getattr(parts.engine.module, CONFIG_KEY, None)


def _publish(src: str, dst: str) -> None:
    """Make ``dst`` a hard link to (or copy of) ``src``, replacing it atomically (a failed copy is removed)."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if space_errno(exc) is not None:
            raise DiskFullError(dst, os.path.getsize(src), space_errno(exc)) from exc
        raise


def _tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("epoch") and os.path.isdir(os.path.join(root, n)))


def save_checkpoint(parts: EngineParts, ema, state: TrainerState, out_dir: str, dist: DistInfo, *,
                    is_best: bool, keep_last: int) -> str:
    """Save after epoch ``state.epoch``; every rank calls this. Returns the tag. Weights (or EMA weights)
    holding NaN or inf raise NonFiniteWeights before anything is written."""
    model_state = consolidated_state_dict(parts)       # collective; checked before anything is staged
    ema_state = None if ema is None else {k: v.detach().float() for k, v in ema.module.state_dict().items()}
    bad = first_nonfinite(model_state) or first_nonfinite(ema_state or {}, "EMA ")
    if bad is not None:
        raise NonFiniteWeights(f"the weights after epoch {state.epoch} are not finite ({bad}); not saved")
    root = checkpoint_root(out_dir)
    tag = tag_for_epoch(state.epoch) + (f"-micro{state.micro_in_epoch:06d}" if state.micro_in_epoch else "")
    staging_root = os.path.join(root, STAGING)
    staging = os.path.join(staging_root, tag)
    needed = _checkpoint_bytes(parts, model_state, ema_state, dist.world_size)
    error = None
    if dist.is_main:
        try:
            os.makedirs(root, exist_ok=True)
            _clear_leftovers(root)
            os.makedirs(staging_root, exist_ok=True)
        except OSError as exc:
            error = file_error(exc.filename or root, exc, "creating")
    if not _any_rank_failed(error, dist):            # (also the barrier before DeepSpeed writes)
        try:
            parts.engine.save_checkpoint(staging_root, tag=tag, client_state={}, save_latest=False)
        except Exception as exc:        # torch reports a full disk as "unexpected pos ..." (a RuntimeError)
            error = _staging_error(exc, staging_root, needed)
            if error is None:
                shutil.rmtree(staging_root, ignore_errors=True)
                raise
    if dist.is_main and error is None:
        try:
            config = _model_config(parts)
            write_safetensors(model_state, os.path.join(staging, MODEL_FILE), config=config)
            if ema_state is not None:
                write_safetensors(ema_state, os.path.join(staging, EMA_FILE), config=config)
            atomic_write_text(os.path.join(staging, STATE_FILE), state.to_json())
            fsync_dir(staging)
        except OSError as exc:
            error = _staging_error(exc, staging_root, needed)
    if _any_rank_failed(error, dist):
        if dist.is_main:
            shutil.rmtree(staging_root, ignore_errors=True)      # nothing half-written stays behind
        raise _save_failed(error, root, tag, needed)
    if dist.is_main:
        _crash_point("save:staged", state.epoch)
        final = os.path.join(root, tag)
        try:
            _set_aside_or_remove(root, tag)
            os.replace(staging, final)
            fsync_dir(root)
        except OSError as exc:
            shutil.rmtree(staging_root, ignore_errors=True)
            raise _save_failed(file_error(exc.filename or final, exc, "renaming"), root, tag, needed) from None
        shutil.rmtree(staging_root, ignore_errors=True)    # DeepSpeed's helper scripts; the rename is done
        _crash_point("save:renamed", state.epoch)
        try:
            atomic_write_text(os.path.join(root, "last"), tag)
            if is_best:
                atomic_write_text(os.path.join(root, "best"), tag)
            _crash_point("save:pointed", state.epoch)
            _publish_top_level(out_dir, root, tag, "last", ema is not None)
            if is_best:
                _publish_top_level(out_dir, root, tag, "best", ema is not None)
            _prune(root, keep_last)
        except OSError as exc:
            raise file_error(getattr(exc, "path", None) or exc.filename or root, exc, "writing",
                             hint=f"checkpoint {final} is complete; resume=auto resumes from it and publishes "
                                  f"last/best again") from None
    barrier()
    return tag


# -- a failed save: one line naming the file and the cause; the previous checkpoint stays in charge ----------------
def _any_rank_failed(error, dist: DistInfo) -> bool:
    """Whether ``error`` is set on any rank (one all-reduce, which also keeps the ranks in step: a rank that failed
    alone must not leave the others waiting in a barrier)."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=dist.device)
    return bool(all_reduce_sum(flag).item())


def _checkpoint_bytes(parts: EngineParts, model_state: dict, ema_state: dict | None, world_size: int) -> int:
    """About how many bytes one checkpoint takes: DeepSpeed's model file, the optimizer state (every rank's
    partition), ZeRO's fp32 master weights, ``model.safetensors`` and the EMA file."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    weights = size(model_state.values())
    optimizer = sum(size(values.values()) for values in parts.optimizer.state.values())
    if parts.zero_stage > 0:
        optimizer = optimizer * world_size + sum(v.numel() * 4 for v in model_state.values())
    return 2 * weights + optimizer + size((ema_state or {}).values())


def _newest_file(folder: str) -> str | None:
    newest, when = None, -1
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                continue
            if mtime > when:
                newest, when = path, mtime
    return newest


def _staging_error(exc: BaseException, staging_root: str, needed: int) -> RunFileError | None:
    """The typed error of a failed write into the staging folder (None: not a file problem). Torch's writer reports
    a full disk without an errno ("unexpected pos ..."): a write error while less than the checkpoint's size is free
    counts as a full disk. Called before the staging folder is removed (its newest file is the one that failed)."""
    if isinstance(exc, DiskFullError):
        return DiskFull(str(exc), exc.path, needed, exc.free)
    text = str(exc)
    free = free_bytes(staging_root)
    torch_write = isinstance(exc, RuntimeError) and ("unexpected pos" in text or "write" in text.lower())
    if space_errno(exc) is not None or (torch_write and free is not None and free < needed):
        path = (exc.filename if isinstance(exc, OSError) and exc.filename else None) or _newest_file(staging_root) \
            or staging_root
        return DiskFull(f"{path}: no space left on device", path, needed)
    if isinstance(exc, OSError):
        return file_error(exc.filename or staging_root, exc, "writing")
    return None


def _save_failed(error: RunFileError | None, root: str, tag: str, needed: int) -> CheckpointError:
    """One line: what failed (the file, the cause; for a full disk the bytes needed, and free once the partial
    checkpoint is gone) and that the previous checkpoint is untouched."""
    previous = _read_pointer(root, "last")
    kept = (f"the previous checkpoint {os.path.join(root, previous)} is intact and still published"
            if previous else "no earlier checkpoint exists")
    if error is None:
        return CheckpointError(f"saving checkpoint {tag} failed on another rank (its own message says why); "
                               f"nothing was published; {kept}")
    if isinstance(error, DiskFull):
        free = free_bytes(root)
        return DiskFull(f"saving checkpoint {tag} failed: {error.path}: no space left on device: the checkpoint "
                        f"needs about {format_bytes(needed)}, {format_bytes(free)} is free in {root}; the partial "
                        f"checkpoint was removed and nothing was published; {kept}; free space, then "
                        + ("resume=auto continues from it" if previous else "start the run again"),
                        error.path, needed, free)
    return type(error)(f"saving checkpoint {tag} failed: {error}; the partial checkpoint was removed and nothing "
                       f"was published; {kept}", error.path)


def _set_aside_or_remove(root: str, tag: str) -> None:
    """Clear the way for ``tag``: an intact copy (a run killed after its rename) is removed; a damaged one (passed
    over by resume=auto) is kept as ``damaged-<tag>-<UTC time>``, as it may still be repaired by hand."""
    final = os.path.join(root, tag)
    if not os.path.exists(final):
        return
    if _intact(root, tag) is None:
        _remove_tree(final)
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    os.replace(final, os.path.join(root, f"damaged-{tag}-{stamp}"))


def _publish_top_level(out_dir: str, root: str, tag: str, name: str, with_ema: bool) -> None:
    _publish(os.path.join(root, tag, MODEL_FILE), os.path.join(out_dir, f"{name}.safetensors"))
    if with_ema:
        _publish(os.path.join(root, tag, EMA_FILE), os.path.join(out_dir, f"{name}_ema.safetensors"))


def _prune(root: str, keep_last: int) -> None:
    keep = {_read_pointer(root, "last"), _read_pointer(root, "best")}
    tags = _tags(root)
    keep.update(tags[-keep_last:])
    for tag in tags:
        if tag not in keep:
            _remove_tree(os.path.join(root, tag))


def first_nonfinite(state: dict, prefix: str = "") -> str | None:
    """The first floating tensor of ``state`` holding NaN or inf, named (None: all finite). One host sync."""
    floating = [(name, value) for name, value in state.items() if value.is_floating_point() and value.numel()]
    if not floating:
        return None
    finite = torch.stack([torch.isfinite(value).all() for _, value in floating]).tolist()
    bad = next((name for (name, _), ok in zip(floating, finite) if not ok), None)
    return None if bad is None else f"{prefix}tensor {bad!r}"


TOP_LEVEL = tuple(f"{name}{suffix}" for name in ("last", "best") for suffix in (".safetensors", "_ema.safetensors"))
# what a previous run leaves besides its checkpoints; moved aside with them so its record stays whole
RUN_RECORD = ("config.yaml", "steps.csv", "summary.csv", "ranks", "tensorboard")


def previous_run_files(out_dir: str) -> list[str]:
    """The checkpoint tags, pointers and top-level weights a previous run left in ``out_dir`` (names)."""
    root = checkpoint_root(out_dir)
    found = [f"{CHECKPOINTS}/{tag}" for tag in _tags(root)]
    found += [f"{CHECKPOINTS}/{name}" for name in ("last", "best") if os.path.isfile(os.path.join(root, name))]
    return found + [name for name in TOP_LEVEL if os.path.exists(os.path.join(out_dir, name))]


def check_fresh_output(out_dir: str) -> None:
    """A run that neither resumes nor starts over must not mix with (or remove) a previous run's checkpoints."""
    found = previous_run_files(out_dir)
    if found:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise OutputNotEmpty(f"output.dir {out_dir} holds the checkpoints of a previous run ({shown}); resume=auto "
                             f"continues that run, output.overwrite=true moves them aside into "
                             f"{out_dir}/previous-<UTC time>/ and starts over, or choose another output.dir")


def move_aside(out_dir: str) -> str | None:
    """Move a previous run's checkpoints, top-level weights and logs into ``<out_dir>/previous-<UTC time>/``
    (renames, nothing deleted). Returns that folder, or None when there was nothing to move."""
    if not previous_run_files(out_dir):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(out_dir, f"previous-{stamp}")
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(out_dir, f"previous-{stamp}-{suffix}")
        suffix += 1
    os.makedirs(target)
    for name in (CHECKPOINTS, *TOP_LEVEL, *RUN_RECORD):
        path = os.path.join(out_dir, name)
        if os.path.lexists(path):
            os.replace(path, os.path.join(target, name))
    fsync_dir(target)
    fsync_dir(out_dir)
    return target


def _pt_problem(folder: str, crc: bool = False) -> str | None:
    """The first DeepSpeed ``.pt`` file of ``folder`` that is truncated or not a readable archive, described as
    ``"<path> is ..."`` (None: all open). Reads each file's zip directory (at its end, so any truncation shows);
    ``crc``: also every entry's CRC-32 (reads the whole file; torch.load itself does not check them, so a flipped
    byte in the optimizer state would load silently). Files in torch's legacy (non-zip) format are not checked."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    except OSError as exc:
        return f"{folder}: {os.strerror(exc.errno).lower() if exc.errno else exc}"
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
            if not magic:
                return f"{path} is empty (0 bytes)"
            if magic == b"PK\x03\x04":
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip() if crc else None
                if bad is not None:
                    return f"{path} is corrupt (its entry {bad} does not match its CRC-32)"
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
            return f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})"
    return None


def _intact(root: str, tag: str) -> str | None:
    """Why checkpoint ``tag`` cannot be resumed (None: it can): its state file parses, its DeepSpeed files open and
    its model file's tensors match their digests."""
    try:
        read_state(root, tag)
    except CheckpointError as exc:
        return str(exc)
    problem = _pt_problem(os.path.join(root, tag), crc=True)
    if problem is not None:
        return problem
    try:
        read_safetensors(os.path.join(root, tag, MODEL_FILE), "checkpoint")
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def _readable(root: str, tag: str) -> str | None:
    """The cheap part of :func:`_intact` (no tensor read): the state file parses and the DeepSpeed files open."""
    if not os.path.isfile(os.path.join(root, tag, STATE_FILE)):
        return f"it has no {STATE_FILE}"
    try:
        read_state(root, tag)
    except CheckpointError as exc:
        return str(exc)
    return _pt_problem(os.path.join(root, tag))


def _pointer_problem(root: str) -> str:
    path = os.path.join(root, "last")
    tag = _read_pointer(root, "last")
    if not os.path.isfile(path):
        return f"{path} is missing"
    if tag is None:
        return f"{path} is empty"
    if tag not in _tags(root):
        return f"{path} names {tag[:60]!r}, which is not a checkpoint there"
    if not os.path.isfile(os.path.join(root, tag, STATE_FILE)):
        return f"{path} names {tag}, which has no {STATE_FILE}"
    return f"{path} names {tag}, which is damaged"


def _scan(root: str) -> tuple[str | None, list[str]]:
    """The newest intact tag of ``root`` and why each newer one was passed over."""
    passed = []
    for tag in reversed(_tags(root)):
        problem = _intact(root, tag)
        if problem is None:
            return tag, passed
        passed.append(f"{tag}: {problem}")
    return None, passed


def check_run_files(out_dir: str, found: tuple[str, str] | None) -> None:
    """Preflight of the run's files: output.dir can hold the run (a folder, or one can be made, where files can be
    created) and, when resuming ``found`` (root, tag), the run's logs can be cut at that checkpoint's update count.
    Writes nothing; RunFileError (OutputDirUnusable, CorruptRunFile) in one line naming the file."""
    from .lock import check_output_dir
    from .logs import check_logs

    check_output_dir(out_dir)
    if found is not None:
        check_logs(out_dir, read_state(*found).global_step)


def last_checkpoint(out_dir: str) -> str | None:
    """The checkpoint the ``last`` pointer of ``out_dir`` names (a path), if any."""
    root = checkpoint_root(out_dir)
    tag = _read_pointer(root, "last")
    return os.path.join(root, tag) if tag is not None and os.path.isdir(os.path.join(root, tag)) else None


def find_checkpoint(resume: str | None, out_dir: str, notes: list | None = None) -> tuple[str, str] | None:
    """Where to resume from: ``None`` (no resume), ``"auto"`` (the ``last`` pointer of ``out_dir``, or nothing if
    the run has none yet), or a path to a checkpoint tag directory or a checkpoints/ folder with a ``last`` pointer.
    Returns (checkpoints root, tag) or None.

    With ``"auto"`` and the pointer missing, naming no checkpoint or a damaged one (its state file or DeepSpeed
    files do not parse, :func:`_readable`), the newest intact tag (:func:`_intact`) is taken and why is appended to
    ``notes``; with tags but none intact, CheckpointError. Nothing is deleted."""
    if resume is None:
        return None
    if resume == "auto":
        root = checkpoint_root(out_dir)
        tag = _read_pointer(root, "last")
        if tag in _tags(root) and _readable(root, tag) is None:
            return root, tag                 # load_checkpoint verifies its weights
        if not _tags(root):
            return None
        problem = _pointer_problem(root)
        found, passed = _scan(root)
        if found is None:
            raise CheckpointError(f"resume=auto: {problem} and no checkpoint in {root} is intact "
                                  f"({'; '.join(passed)}); output.overwrite=true moves them aside and starts over")
        if notes is not None:
            notes.append(f"resume=auto: {problem}; resuming from {os.path.join(root, found)}, the newest intact "
                         f"checkpoint (state file and weight digests verified)"
                         + (f"; passed over {'; '.join(passed)}" if passed else ""))
        return root, found
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(path), os.path.basename(path)
    tag = _read_pointer(path, "last")
    if tag is not None and os.path.isfile(os.path.join(path, tag, STATE_FILE)):
        return path, tag
    raise FileNotFoundError(f"resume: no checkpoint at {path} (expected a checkpoint directory holding {STATE_FILE}, "
                            f"or a checkpoints/ folder with a 'last' pointer; resume=auto continues the run in "
                            f"output.dir)")


def read_state(root: str, tag: str) -> TrainerState:
    """The trainer state of checkpoint ``tag``; CorruptRunFile naming the file when it does not parse."""
    path = os.path.join(root, tag, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return TrainerState.from_json(handle.read())
    except FileNotFoundError:
        raise CorruptRunFile(f"{path}: missing: the checkpoint is incomplete; {_other_tag_hint(root)}", path) from None
    except (OSError, ValueError) as exc:      # UnicodeDecodeError is a ValueError
        cause = str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"
        raise CorruptRunFile(f"{path}: not a readable trainer state: {cause}; {_other_tag_hint(root)}", path) \
            from None


def _other_tag_hint(root: str) -> str:
    return (f"restore the file from a copy, or resume from another checkpoint (resume={root}/epochNNNN; resume=auto "
            f"takes the newest intact one when the 'last' pointer names none)")


def _check_pt_files(root: str, tag: str, crc: bool = False) -> None:
    problem = _pt_problem(os.path.join(root, tag), crc)
    if problem is not None:
        raise CorruptRunFile(f"resume: {problem}; {_other_tag_hint(root)}", os.path.join(root, tag))


def check_resumable(root: str, tag: str, *, world_size: int, zero_stage: int, precision: str) -> TrainerState:
    """The checkpoint's partitioning must match this run's (checked before anything is written)."""
    folder = os.path.join(root, tag)
    state = read_state(root, tag)
    _check_pt_files(root, tag)
    partitioned = state.zero_stage > 0 or state.precision == "bf16"
    if partitioned and state.world_size != world_size:
        raise CheckpointError(f"resume: {folder} was written by {state.world_size} process(es) with ZeRO stage "
                              f"{state.zero_stage} / {state.precision}; this run has {world_size}. Partitioned "
                              f"optimizer states cannot be re-split: resume with {state.world_size} process(es), or "
                              f"start a new run from the weights with model.init_checkpoint={folder}/{MODEL_FILE}")
    if state.zero_stage != zero_stage or state.precision != precision:
        raise CheckpointError(f"resume: {folder} was written with ZeRO stage {state.zero_stage} / {state.precision}; "
                              f"this run uses stage {zero_stage} / {precision}")
    return state


# regularisation, not architecture: a resumed run may change them
_NOT_COMPARED = ("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate",
                 "patch_drop_rate")


def _flatten(config, prefix: str = "") -> dict:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    flat = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def check_same_model(root: str, tag: str, model: torch.nn.Module) -> None:
    """The checkpoint holds the run's model: the same timm name and architecture kwargs (from the ``model.safetensors``
    metadata, for dartmamba's models) and the same tensor names and shapes (from its header). Reads headers only;
    raises CheckpointError listing what differs."""
    folder = os.path.join(root, tag)
    path = os.path.join(folder, MODEL_FILE)
    try:
        metadata, shapes = read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"resume: {exc}") from None
    differences = []
    saved, ours = metadata.get(CONFIG_KEY), getattr(model, CONFIG_KEY, None)
    if saved is not None and ours is not None:
        saved, ours = _flatten(json.loads(saved)), _flatten(json.loads(json.dumps(ours)))
        for key in sorted(set(saved) | set(ours)):
            if key.rsplit(".", 1)[-1] in _NOT_COMPARED or saved.get(key) == ours.get(key):
                continue
            differences.append(f"{key}: checkpoint {saved.get(key, '(unset)')!r}, this run {ours.get(key, '(unset)')!r}")
    if not differences:
        own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
        for name in list(own) + [n for n in shapes if n not in own]:
            theirs = shapes[name][1] if name in shapes else None
            if theirs != own.get(name):
                differences.append(f"tensor {name!r}: checkpoint {theirs or 'none'}, this run {own.get(name) or 'none'}")
                break
    if differences:
        raise CheckpointError(f"resume: {folder} holds a different model than this run ({'; '.join(differences)}); "
                              f"resume with the run's own config, or start a new run from those weights with "
                              f"model.init_checkpoint={path}")


def _verify_restored(parts: EngineParts, folder: str) -> None:
    """The weights DeepSpeed restored are, bit for bit, the ones the checkpoint's ``model.safetensors`` was written
    from (its digests). Every rank calls (the consolidation is collective under ZeRO-3)."""
    path = os.path.join(folder, MODEL_FILE)
    metadata, _ = read_safetensors_header(path)
    problem = digest_mismatch(consolidated_state_dict(parts), metadata)
    if problem is not None:
        raise CheckpointError(f"resume: the weights DeepSpeed restored from {folder} are not the ones saved there "
                              f"({problem} of {MODEL_FILE}): its DeepSpeed files are damaged; resume from an "
                              f"earlier checkpoint (resume=<output.dir>/checkpoints/epochNNNN)")


def load_checkpoint(parts: EngineParts, ema, root: str, tag: str, dist: DistInfo, precision: str) -> TrainerState:
    """Restore the engine (weights, optimizer, ZeRO partitions), the EMA and the trainer state, and verify the
    restored weights and the EMA against the digests saved with them. Every rank calls."""
    folder = os.path.join(root, tag)
    state = check_resumable(root, tag, world_size=dist.world_size, zero_stage=parts.zero_stage, precision=precision)
    error = None
    if dist.is_main:                    # every entry's CRC (one rank reads the files; the others wait for its word)
        try:
            _check_pt_files(root, tag, crc=True)
        except CorruptRunFile as exc:
            error = exc
    if _any_rank_failed(error, dist):
        raise error or CorruptRunFile(f"resume: a DeepSpeed file of {folder} is damaged (rank 0 names it)", folder)
    try:
        path, _ = parts.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False, load_module_strict=True)
    except Exception as exc:            # torch: "PytorchStreamReader failed reading zip archive ..."
        _check_pt_files(root, tag)      # names the damaged file, else the error is not a file's
        if isinstance(exc, OSError):
            raise file_error(exc.filename or folder, exc, "reading", hint=_other_tag_hint(root)) from None
        raise
    if path is None:
        raise CheckpointError(f"resume: DeepSpeed could not load {folder}")
    _verify_restored(parts, folder)
    if ema is not None:
        ema_path = os.path.join(folder, EMA_FILE)
        if not os.path.isfile(ema_path):
            raise CheckpointError(f"resume: train.ema.enabled is true but {ema_path} is missing")
        try:
            ema_state, _ = read_safetensors(ema_path, "EMA checkpoint")
        except ValueError as exc:
            raise CheckpointError(f"resume: {exc}") from None
        ema.module.load_state_dict({k: v.to(dtype=ema.module.state_dict()[k].dtype) for k, v in ema_state.items()})
    return state


def _same_content(src: str, dst: str) -> bool:
    if not os.path.isfile(dst):
        return False
    return os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)


def repair_published(out_dir: str, root: str, tag: str, state: TrainerState, with_ema: bool) -> list[str]:
    """Make the published files agree with the checkpoint a run resumes from (``tag``, whose state is ``state``),
    whatever point a kill interrupted the save at: the ``last`` pointer names ``tag``, the ``best`` pointer the
    state's best epoch, and the top-level ``.safetensors`` are those of the tags the pointers name. Only for the
    run's own checkpoints (``root`` inside ``out_dir``); rank 0 calls. Returns what was published again."""
    if os.path.abspath(root) != checkpoint_root(out_dir):
        return []
    fixed = []
    pointers = {"last": tag}
    if state.best_epoch is not None and os.path.isdir(os.path.join(root, tag_for_epoch(state.best_epoch + 1))):
        pointers["best"] = tag_for_epoch(state.best_epoch + 1)
    for name, target in pointers.items():
        if _read_pointer(root, name) != target:
            atomic_write_text(os.path.join(root, name), target)
            fixed.append(f"{CHECKPOINTS}/{name} -> {target}")
    for name, target in pointers.items():
        files = [(MODEL_FILE, ".safetensors")] + ([(EMA_FILE, "_ema.safetensors")] if with_ema else [])
        for source, suffix in files:
            src, dst = os.path.join(root, target, source), os.path.join(out_dir, name + suffix)
            if os.path.isfile(src) and not _same_content(src, dst):
                _publish(src, dst)
                fixed.append(f"{name}{suffix} <- {target}")
    return fixed


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A consolidated ``.safetensors`` file as a state dict (CPU), its digests verified."""
    return read_state_dict(path)
