"""Checkpoint maps, in one place: official checkpoints, fixed-grid -> DART weight transfer, our own files.

Our files carry a digest of every tensor (:mod:`dartmamba.files`). :func:`load_model` and our readers verify them
from the file. Files of our models also hold the digest table as one extra tensor, ``__dartmamba_digests__``, which
every loader hands to the model with the weights: timm's ``load_checkpoint`` (behind ``timm.create_model(...,
checkpoint_path=...)``), ``load_pretrained`` with ``pretrained_cfg_overlay=dict(file=...)``, and
``safetensors.torch.load_file`` + ``load_state_dict``. The model's ``pretrained_filter_fn``
(:func:`checkpoint_filter_fn`) or, for loaders without one, its ``load_state_dict`` pre-hook (registered by
:func:`record_config`) verifies the tensors against it and removes it, so a load is verified once and strict loading
sees no extra key. Files that hold their digests only in the header metadata (written before the digest tensor) are
verified by :func:`load_model` and our readers, not by timm's loaders. Nothing of timm is replaced or inspected.
"""
from __future__ import annotations

import json
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from ._common import effective_model_args
from ..files import (CONFIG_KEY, read_safetensors_header, read_state_dict, unwrap_state_dict,
                     verify_and_strip_digests, write_safetensors)


class TransferReport(NamedTuple):
    """What a weight transfer loaded and what it did not."""

    loaded: list[str]
    missing: list[str]        # model tensors the checkpoint did not provide (e.g. the DART scorer)
    unexpected: list[str]     # checkpoint tensors the model has no place for
    resized: list[str]        # tensors resampled to a new shape (positional embeddings, inflated patch weights)
    skipped: list[str] = []   # checkpoint tensors left out on purpose (an image classifier inflated into video)

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: {self.missing[:8]}"
                f"{'...' if len(self.missing) > 8 else ''}; unexpected {len(self.unexpected)}: {self.unexpected[:8]}"
                f"{'...' if len(self.unexpected) > 8 else ''}; resized: {self.resized}")


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm ``pretrained_filter_fn`` for our models (``pretrained=True``, ``pretrained_cfg_overlay=dict(file=...)``):
    unwrap the file's state dict (hustvl/Vim and DART files keep it under ``"model"``); when it carries our digest
    tensor, verify the tensors against it and drop it, before anything is adapted; let the tokenizer rename an
    official checkpoint's tensors and adopt the settings it was trained with; resize ``pos_embed`` to the model's
    grid. Our own files pass through otherwise unchanged. The caller's dict is not modified."""
    state = dict(unwrap_state_dict(state_dict))
    verify_and_strip_digests(state, f"the state dict loaded into {type(model).__name__}")
    tokenizer = _tokenizer(model)
    if tokenizer is not None:
        converted = tokenizer.convert_official_state_dict(state, "patch_embed.", "pretrained weights")
        if set(converted) != set(state):              # an official layout: adopt its settings too
            tokenizer.adopt_official_settings(list(converted), "patch_embed.")
        state = converted
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state = dict(state)
        state["pos_embed"] = _resize_pos_embed(state["pos_embed"], own["pos_embed"], _cls_pos_index(model),
                                               _cls_pos_index(model))
    return state


def _verify_loaded_digests(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """``load_state_dict`` pre-hook of our models: when the state dict carries our digest tensor (timm's
    ``load_checkpoint``, ``load_file`` + ``load_state_dict``), verify the tensors against it and remove it before
    torch copies them and looks for unexpected keys. Runs for any ``strict``; under a prefix too (the model inside
    another one)."""
    verify_and_strip_digests(state_dict, f"the state dict loaded into {type(module).__name__}", prefix)


def _cls_pos_index(model: nn.Module) -> int:
    """Index of the class token's embedding in ``pos_embed``: 0 for ViT/DeiT, the grid middle for Vim."""
    return getattr(model, "cls_pos_index", 0)


def transfer_fixed_grid_weights(model: nn.Module, state_dict: dict, source_cls_pos_index: int | None = None,
                                strict_shapes: bool = True) -> TransferReport:
    """Initialise a DART model from a fixed-grid model's weights (timm DeiT/ViT or hustvl/Vim).

    Blocks, norms, head, patch projection, class token and positional embedding are copied by name; the grid part of
    ``pos_embed`` is resampled (timm's bicubic ``resample_abs_pos_embed``) when the grids differ. The DART scorer is
    reported as missing. ``source_cls_pos_index`` defaults to the target's convention (0 for DeiT, middle for Vim).
    """
    state_dict = dict(unwrap_state_dict(state_dict))
    verify_and_strip_digests(state_dict, "the state dict to transfer")
    own = model.state_dict()
    loaded, unexpected, resized, to_load = [], [], [], {}
    for key, value in state_dict.items():
        if key not in own:
            unexpected.append(key)
            continue
        if key == "pos_embed" and value.shape != own[key].shape:
            value = _resize_pos_embed(value, own[key], _cls_pos_index(model) if source_cls_pos_index is None
                                      else source_cls_pos_index, _cls_pos_index(model))
            resized.append(key)
        if key == "temporal_pos_embedding" and value.shape != own[key].shape and value.shape[-1] == own[key].shape[-1]:
            value = resize_temporal_pos_embed(value, own[key].shape[1])
            resized.append(key)
        if value.shape != own[key].shape:
            if strict_shapes:
                raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(own[key].shape)}")
            unexpected.append(key)
            continue
        to_load[key] = value
        loaded.append(key)
    model.load_state_dict(to_load, strict=False)
    missing = [key for key in own if key not in to_load]
    return TransferReport(loaded, missing, unexpected, resized)


def resize_grid_pos_embed(source: torch.Tensor, old_grid: tuple[int, int], source_cls: int, new_grid: tuple[int, int],
                          target_cls: int) -> torch.Tensor:
    """(1, 1 + Gh Gw, D) with the class entry at ``source_cls`` -> (1, 1 + Gh' Gw', D) with it at ``target_cls``: the
    grid part resampled bicubically (timm's ``resample_abs_pos_embed``), the class entry kept."""
    cls = source[:, source_cls:source_cls + 1]
    grid = torch.cat([source[:, :source_cls], source[:, source_cls + 1:]], dim=1)
    grid = resample_abs_pos_embed(grid, list(new_grid), list(old_grid), num_prefix_tokens=0)
    return torch.cat([grid[:, :target_cls], cls, grid[:, target_cls:]], dim=1)


def _resize_pos_embed(source: torch.Tensor, target: torch.Tensor, source_cls: int, target_cls: int) -> torch.Tensor:
    grid_cells = source.shape[1] - 1
    old = int(round(grid_cells ** 0.5))
    new = int(round((target.shape[1] - 1) ** 0.5))
    if old * old != grid_cells or new * new != target.shape[1] - 1:
        raise ValueError(f"cannot resize pos_embed {tuple(source.shape)} -> {tuple(target.shape)}: grids not square")
    return resize_grid_pos_embed(source, (old, old), source_cls, (new, new), target_cls)


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints (hustvl/Vim, DART) from local files
# ---------------------------------------------------------------------------------------------------------------
def _tokenizer(model: nn.Module):
    """The model's tokenizer when it implements :class:`dartmamba.tokenizer.Tokenizer` (a timm model's plain
    ``PatchEmbed`` does not), else None."""
    from ..tokenizer import Tokenizer

    embed = getattr(model, "patch_embed", None)
    return embed if isinstance(embed, Tokenizer) else None


def load_official_checkpoint(model: nn.Module, path: str) -> TransferReport:
    """Load a hustvl/Vim, official DART (``darvit_*`` / ``darvim_*``), OpenGVLab/VideoMamba video or the authors'
    DART-video (``DVisionMamba``) checkpoint from a local file.

    The model's tokenizer renames its tensors (DART: the scorer under ``patch_embed.spn.spn.spn.``), ``pos_embed``
    is resized when the grid differs, and the tokenizer then adopts the settings the checkpoint was trained with
    (DART: batch-global score standardisation, torchvision's BatchNorm eps 1e-3 in the trunk). Shape mismatches are
    a ``ValueError`` naming the file and the first bad key; missing/unexpected keys are reported (an official DART
    checkpoint fills every tensor).
    """
    state = read_state_dict(path)
    tokenizer = _tokenizer(model)
    if tokenizer is not None:
        state = tokenizer.convert_official_state_dict(state, "patch_embed.", f"checkpoint {path}")
    try:
        report = transfer_fixed_grid_weights(model, state, source_cls_pos_index=_cls_pos_index(model))
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from exc
    if not report.loaded:
        raise ValueError(f"checkpoint {path}: none of its {len(state)} tensors matches a tensor of the model (first "
                         f"unexpected: {report.unexpected[:3]}); it is not a checkpoint of this architecture")
    if tokenizer is not None:
        tokenizer.adopt_official_settings(report.loaded, "patch_embed.")
    return report


# ---------------------------------------------------------------------------------------------------------------
# VideoMamba: official video checkpoints, the authors' DART-video layout, image checkpoints inflated into video
# ---------------------------------------------------------------------------------------------------------------
# OpenGVLab/VideoMamba (``videomamba_{t,s,m}16_<data>_f<T>_res224.pth``) names every tensor as our VideoMamba does:
# ``cls_token``, ``pos_embed`` (1, 1 + h * w, D), ``temporal_pos_embedding`` (1, T, D), ``patch_embed.proj`` (Conv3d
# (D, 3, 1, p, p)), ``layers.i.norm.weight``, ``layers.i.mixer.*`` (hustvl/Vim's bimamba names), ``norm_f.weight``,
# ``head``: the key map is the identity and :func:`load_official_checkpoint` loads them (``temporal_pos_embedding``
# resampled along time for another clip length, ``pos_embed`` for another grid). The authors' DART video model
# (ykx3/DART ``video/videomamba.py``, ``DVisionMamba``) has the same top level and, under ``patch_embed.``, the
# scorer ``score_backbone.features.*`` (torchvision MobileNetV3-small ``features[:11]``) and ``score_head1`` /
# ``score_head2``, which the video DART tokenizer's ``convert_official_state_dict`` renames.
def resize_temporal_pos_embed(temporal: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, T0, D) -> (1, T, D), linear along time (``align_corners=False``), in float32 then back."""
    resized = torch.nn.functional.interpolate(temporal.float().transpose(1, 2), size=num_frames, mode="linear",
                                              align_corners=False)
    return resized.transpose(1, 2).to(temporal.dtype)


def inflate_patch_weight(weight: torch.Tensor, frames: int, center: bool = True) -> torch.Tensor:
    """A Conv2d patch kernel (D, C, p, p) -> a Conv3d one (D, C, kt, p, p), as VideoMamba inflates: all of it in the
    middle frame (``center``; zeros elsewhere) or spread evenly (each frame ``weight / kt``). kt = 1: a new axis."""
    if weight.dim() != 4:
        raise ValueError(f"a Conv2d patch weight must be (D, C, p, p), got {tuple(weight.shape)}")
    if center:
        inflated = weight.new_zeros(*weight.shape[:2], frames, *weight.shape[2:])
        inflated[:, :, frames // 2] = weight
        return inflated
    return weight.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames


def inflate_image_checkpoint(model: nn.Module, state_dict: dict, source_cls_pos_index: int | str = "first",
                             center: bool = True, keep_head: bool = False) -> TransferReport:
    """Initialise a video model (VideoMamba, fixed grid or DART) from an image checkpoint, as VideoMamba does.

    Args:
        model: a :class:`~dartmamba.models.VideoMamba`.
        state_dict: a VideoMamba image model's (``videomamba_{t,s,m,b}16_in1k_res224.pth``: class token first) or a
            hustvl/Vim / dartmamba ``vim_*`` one (class token in the middle); any file wrapper is removed.
        source_cls_pos_index: where the checkpoint's class-token embedding sits in its ``pos_embed``: ``"first"``
            (VideoMamba image models), ``"middle"`` (Vim: index (L - 1) // 2) or an index.
        center: inflate the Conv2d patch kernel into the middle frame of the Conv3d (VideoMamba's default) or spread
            it over the tubelet.
        keep_head: keep the image classifier when its shape fits (VideoMamba always drops it).

    The spatial ``pos_embed`` is kept (resampled when the grids differ, the class entry moved to the front),
    ``temporal_pos_embedding`` stays at its initial zeros (reported missing, as is the DART scorer). Returns a
    :class:`TransferReport`; the image head is in ``skipped``.
    """
    state = dict(unwrap_state_dict(state_dict))
    verify_and_strip_digests(state, "the image checkpoint to inflate")
    own = model.state_dict()
    skipped = [k for k in list(state) if k.startswith("head.") and not (keep_head and k in own
                                                                        and state[k].shape == own[k].shape)]
    for key in skipped:
        del state[key]
    resized = []
    weight_key = "patch_embed.proj.weight"
    if weight_key in state and weight_key in own and state[weight_key].dim() == 4 and own[weight_key].dim() == 5:
        state[weight_key] = inflate_patch_weight(state[weight_key], own[weight_key].shape[2], center)
        resized.append(weight_key)
    if isinstance(source_cls_pos_index, str):
        if source_cls_pos_index not in ("first", "middle"):
            raise ValueError(f"source_cls_pos_index must be 'first', 'middle' or an int, got {source_cls_pos_index!r}")
        length = state["pos_embed"].shape[1] if "pos_embed" in state else 1
        source_cls_pos_index = 0 if source_cls_pos_index == "first" else (length - 1) // 2
    if "pos_embed" in state and source_cls_pos_index != _cls_pos_index(model):
        pos = state["pos_embed"]
        cls = pos[:, source_cls_pos_index:source_cls_pos_index + 1]
        grid = torch.cat([pos[:, :source_cls_pos_index], pos[:, source_cls_pos_index + 1:]], dim=1)
        state["pos_embed"] = torch.cat([cls, grid], dim=1)     # now in the video model's order: class entry first
    report = transfer_fixed_grid_weights(model, state, source_cls_pos_index=_cls_pos_index(model))
    return report._replace(resized=resized + report.resized, skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# Our own checkpoints: safetensors with the model config inside
# ---------------------------------------------------------------------------------------------------------------
_NOT_ARCHITECTURE = {"pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "features_only",
                     "out_indices", "checkpoint_path", "cache_dir", "pretrained_strict", "feature_cfg", "feature_cls",
                     "device", "dtype"}


def record_config(model: nn.Module, name: str, kwargs: dict) -> nn.Module:
    """Remember how a model was created (timm name + architecture kwargs) so :func:`save_model` can store it, and
    register the ``load_state_dict`` pre-hook that verifies and removes the digest tensor of our files."""
    config = {"model": name, "kwargs": {k: v for k, v in kwargs.items() if k not in _NOT_ARCHITECTURE}}
    setattr(model, CONFIG_KEY, config)
    model.register_load_state_dict_pre_hook(_verify_loaded_digests)
    return model


def save_model(model: nn.Module, path: str, extra_metadata: dict | None = None) -> None:
    """Write ``model``'s state dict to ``path`` (.safetensors) with its config (timm name + kwargs) inside, atomically:
    a killed process leaves the previous file intact, never a half-written one.

    The kwargs are the model's as it computes now (:func:`dartmamba.models._common.effective_model_args`: a
    release's scorer settings adopted at load, a new head), so :func:`load_model` rebuilds the same function."""
    config = getattr(model, CONFIG_KEY, None)
    if config is None:
        raise ValueError("model has no dartmamba_config (create it with timm.create_model(<a dartmamba model>))")
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"path must end with .safetensors, got {path!r}")
    config = {**config, "kwargs": effective_model_args(model, config["kwargs"])}
    write_safetensors(model.state_dict(), path, config=config, metadata=extra_metadata)


def read_model_config(path: str) -> dict:
    """The model config (timm name + kwargs) :func:`save_model` stored in ``path``; FileNotFoundError naming a
    missing file, ValueError for one that is not ours."""
    metadata, _ = read_safetensors_header(path)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"checkpoint {path} has no {CONFIG_KEY!r} metadata (not written by dartmamba.save_model)")
    return json.loads(metadata[CONFIG_KEY])


def load_model(path: str, **overrides) -> nn.Module:
    """One line from a file to a model: ``model = dartmamba.load_model("run/model_best.safetensors")``.

    The file's digests are verified (:class:`dartmamba.files.CorruptCheckpointError` names the first tensor that
    differs); a missing file is a FileNotFoundError naming it."""
    import timm

    config = read_model_config(path)
    kwargs = {**config["kwargs"], **overrides}
    # built on the meta device (no init, no pretrained scorer trunk fetched), then filled from the file, strictly
    model = timm.create_model(config["model"], device="meta", **kwargs).to_empty(device="cpu")
    state = read_state_dict(path)
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ValueError(f"checkpoint {path} lacks tensor {key!r}")
        if state[key].shape != value.shape:
            raise ValueError(f"checkpoint {path}: {key!r} has shape {tuple(state[key].shape)}, the model expects "
                             f"{tuple(value.shape)}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors the model does not: first {unexpected[0]!r}")
    model.load_state_dict(state, strict=True)
    return model
