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

from dartmamba.files import atomic_write_text, fsync_dir, write_safetensors
from .distributed import DistInfo, barrier
from .engine import EngineParts, consolidated_state_dict

__all__ = ["TrainerState", "save_checkpoint", "find_checkpoint", "load_checkpoint", "check_resumable", "checkpoint_root",
           "clear_checkpoints",
           "CheckpointError", "CRASH_ENV"]

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
    from dartmamba.files import CONFIG_KEY

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


def load_checkpoint(parts: EngineParts, ema, root: str, tag: str, dist: DistInfo, precision: str) -> TrainerState:
    """Restore the engine (weights, optimizer, ZeRO partitions), the EMA and the trainer state. Every rank calls."""
    folder = os.path.join(root, tag)
    state = check_resumable(root, tag, world_size=dist.world_size, zero_stage=parts.zero_stage, precision=precision)
    path, _ = parts.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise CheckpointError(f"resume: DeepSpeed could not load {folder}")
    if ema is not None:
        ema_path = os.path.join(folder, EMA_FILE)
        if not os.path.isfile(ema_path):
            raise CheckpointError(f"resume: train.ema.enabled is true but {ema_path} is missing")
        from safetensors.torch import load_file

        ema_state = load_file(ema_path)
        ema.module.load_state_dict({k: v.to(dtype=ema.module.state_dict()[k].dtype) for k, v in ema_state.items()})
    return state


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A consolidated ``.safetensors`` file as a state dict (CPU)."""
    from safetensors.torch import load_file

    return load_file(path)
