"""Checkpoints: DeepSpeed's (model, optimizer, ZeRO partitions) plus consolidated ``.safetensors`` of the model and
its EMA, written so that a kill at any moment leaves every pointer naming a complete checkpoint.

Layout of ``<output.dir>``::

    checkpoints/epoch0007/        one complete checkpoint (DeepSpeed files, model.safetensors,
                                  model_ema.safetensors, trainer_state.json)
    checkpoints/last, best        pointer files holding a tag (replaced atomically)
    last.safetensors, last_ema.safetensors, best.safetensors, best_ema.safetensors   (hard links or copies)

A save writes everything into ``checkpoints/.staging/<tag>/``, renames that directory to ``checkpoints/<tag>``
(atomic), then replaces the ``last`` (and ``best``) pointer, then the top-level files, then prunes old tags. A
kill before the pointer moves leaves the previous checkpoint in charge; leftovers (``.staging``, ``.trash-*``)
are cleared by the next save. The output directory must be on a file system every rank sees (multi-node runs).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field

import torch

from dartmamba.files import (CONFIG_KEY, atomic_write_text, digest_mismatch, fsync_dir, read_safetensors,
                             read_safetensors_header, read_state_dict, write_safetensors)
from .distributed import DistInfo, barrier
from .engine import EngineParts, consolidated_state_dict

__all__ = ["TrainerState", "save_checkpoint", "find_checkpoint", "load_checkpoint", "check_resumable", "checkpoint_root",
           "check_same_model", "clear_checkpoints", "CheckpointError", "CRASH_ENV"]

CHECKPOINTS = "checkpoints"
STAGING = ".staging"
TRASH = ".trash-"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
# Fault injection for the atomicity tests: with DARTMAMBA_TRAIN_CRASH_AT=<point>@<epoch> the process SIGKILLs itself
# at that point of the save after that epoch (points: save:staged, save:renamed, save:pointed).
CRASH_ENV = "DARTMAMBA_TRAIN_CRASH_AT"


class CheckpointError(RuntimeError):
    pass


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        return cls(**json.loads(text))


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
    """Make ``dst`` a hard link to (or copy of) ``src``, replacing it atomically."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("epoch") and os.path.isdir(os.path.join(root, n)))


def save_checkpoint(parts: EngineParts, ema, state: TrainerState, out_dir: str, dist: DistInfo, *,
                    is_best: bool, keep_last: int) -> str:
    """Save after epoch ``state.epoch``; every rank calls this. Returns the tag."""
    root = checkpoint_root(out_dir)
    tag = tag_for_epoch(state.epoch)
    staging_root = os.path.join(root, STAGING)
    staging = os.path.join(staging_root, tag)
    if dist.is_main:
        os.makedirs(root, exist_ok=True)
        _clear_leftovers(root)
        os.makedirs(staging_root, exist_ok=True)
    barrier()
    parts.engine.save_checkpoint(staging_root, tag=tag, client_state={}, save_latest=False)
    model_state = consolidated_state_dict(parts)
    if dist.is_main:
        config = _model_config(parts)
        write_safetensors(model_state, os.path.join(staging, MODEL_FILE), config=config)
        if ema is not None:
            write_safetensors({k: v.detach().float() for k, v in ema.module.state_dict().items()},
                              os.path.join(staging, EMA_FILE), config=config)
        atomic_write_text(os.path.join(staging, STATE_FILE), state.to_json())
        fsync_dir(staging)
    barrier()
    if dist.is_main:
        _crash_point("save:staged", state.epoch)
        final = os.path.join(root, tag)
        _remove_tree(final)             # a complete but unreferenced copy from a run killed after its rename
        os.replace(staging, final)
        fsync_dir(root)
        shutil.rmtree(staging_root, ignore_errors=True)    # DeepSpeed's helper scripts; the rename is done
        _crash_point("save:renamed", state.epoch)
        atomic_write_text(os.path.join(root, "last"), tag)
        if is_best:
            atomic_write_text(os.path.join(root, "best"), tag)
        _crash_point("save:pointed", state.epoch)
        _publish_top_level(out_dir, root, tag, "last", ema is not None)
        if is_best:
            _publish_top_level(out_dir, root, tag, "best", ema is not None)
        _prune(root, keep_last)
    barrier()
    return tag


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


def clear_checkpoints(out_dir: str) -> bool:
    """Remove a previous run's checkpoints and top-level weights from ``out_dir`` (a fresh run into the same folder
    must not mix with them). Returns whether there was anything to remove."""
    root = checkpoint_root(out_dir)
    found = os.path.isdir(root)
    _remove_tree(root)
    for name in ("last", "best"):
        for suffix in (".safetensors", "_ema.safetensors"):
            path = os.path.join(out_dir, name + suffix)
            if os.path.exists(path):
                os.remove(path)
                found = True
    return found


def find_checkpoint(resume: str | None, out_dir: str) -> tuple[str, str] | None:
    """Where to resume from: ``None`` (no resume), ``"auto"`` (the ``last`` pointer of ``out_dir``, or nothing if
    the run has none yet), or a path to a checkpoint tag directory or a checkpoints/ folder with a ``last`` pointer.
    Returns (checkpoints root, tag) or None."""
    if resume is None:
        return None
    if resume == "auto":
        root = checkpoint_root(out_dir)
        tag = _read_pointer(root, "last")
        return (root, tag) if tag is not None and os.path.isdir(os.path.join(root, tag)) else None
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
    with open(os.path.join(root, tag, STATE_FILE)) as handle:
        return TrainerState.from_json(handle.read())


def check_resumable(root: str, tag: str, *, world_size: int, zero_stage: int, precision: str) -> TrainerState:
    """The checkpoint's partitioning must match this run's (checked before anything is written)."""
    folder = os.path.join(root, tag)
    state = read_state(root, tag)
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
    path, _ = parts.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=True)
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


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A consolidated ``.safetensors`` file as a state dict (CPU), its digests verified."""
    return read_state_dict(path)
