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
from dataclasses import asdict, dataclass, field

import torch

from dartmamba.files import (CONFIG_KEY, atomic_write_text, digest_mismatch, fsync_dir, read_safetensors,
                             read_safetensors_header, read_state_dict, write_safetensors)
from .distributed import DistInfo, barrier
from .engine import EngineParts, consolidated_state_dict

__all__ = ["TrainerState", "save_checkpoint", "find_checkpoint", "load_checkpoint", "check_resumable", "checkpoint_root",
           "check_same_model", "check_fresh_output", "move_aside", "previous_run_files", "repair_published",
           "last_checkpoint", "first_nonfinite", "CheckpointError", "OutputNotEmpty", "NonFiniteWeights", "CRASH_ENV"]

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
    """Save after epoch ``state.epoch``; every rank calls this. Returns the tag. Weights (or EMA weights)
    holding NaN or inf raise NonFiniteWeights before anything is written."""
    model_state = consolidated_state_dict(parts)       # collective; checked before anything is staged
    ema_state = None if ema is None else {k: v.detach().float() for k, v in ema.module.state_dict().items()}
    bad = first_nonfinite(model_state) or first_nonfinite(ema_state or {}, "EMA ")
    if bad is not None:
        raise NonFiniteWeights(f"the weights after epoch {state.epoch} are not finite ({bad}); not saved")
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
    if dist.is_main:
        config = _model_config(parts)
        write_safetensors(model_state, os.path.join(staging, MODEL_FILE), config=config)
        if ema_state is not None:
            write_safetensors(ema_state, os.path.join(staging, EMA_FILE), config=config)
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


def _intact(root: str, tag: str) -> str | None:
    """Why checkpoint ``tag`` cannot be resumed (None: it can): its state file parses and its model file's tensors
    match their digests."""
    try:
        read_state(root, tag)
    except (OSError, ValueError, TypeError) as exc:
        return f"{STATE_FILE}: {type(exc).__name__}: {exc}"
    try:
        read_safetensors(os.path.join(root, tag, MODEL_FILE), "checkpoint")
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def _pointer_problem(root: str) -> str:
    path = os.path.join(root, "last")
    tag = _read_pointer(root, "last")
    if not os.path.isfile(path):
        return f"{path} is missing"
    if tag is None:
        return f"{path} is empty"
    if tag not in _tags(root):
        return f"{path} names {tag[:60]!r}, which is not a checkpoint there"
    return f"{path} names {tag}, which has no {STATE_FILE}"


def _scan(root: str) -> tuple[str | None, list[str]]:
    """The newest intact tag of ``root`` and why each newer one was passed over."""
    passed = []
    for tag in reversed(_tags(root)):
        problem = _intact(root, tag)
        if problem is None:
            return tag, passed
        passed.append(f"{tag}: {problem}")
    return None, passed


def last_checkpoint(out_dir: str) -> str | None:
    """The checkpoint the ``last`` pointer of ``out_dir`` names (a path), if any."""
    root = checkpoint_root(out_dir)
    tag = _read_pointer(root, "last")
    return os.path.join(root, tag) if tag is not None and os.path.isdir(os.path.join(root, tag)) else None


def find_checkpoint(resume: str | None, out_dir: str, notes: list | None = None) -> tuple[str, str] | None:
    """Where to resume from: ``None`` (no resume), ``"auto"`` (the ``last`` pointer of ``out_dir``, or nothing if
    the run has none yet), or a path to a checkpoint tag directory or a checkpoints/ folder with a ``last`` pointer.
    Returns (checkpoints root, tag) or None.

    With ``"auto"`` and the pointer missing or naming no checkpoint, the newest intact tag (:func:`_intact`) is
    taken and why is appended to ``notes``; with tags but none intact, CheckpointError. Nothing is deleted."""
    if resume is None:
        return None
    if resume == "auto":
        root = checkpoint_root(out_dir)
        tag = _read_pointer(root, "last")
        if tag in _tags(root) and os.path.isfile(os.path.join(root, tag, STATE_FILE)):
            return root, tag                 # load_checkpoint verifies it
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
