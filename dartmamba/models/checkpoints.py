"""Checkpoint maps, in one place: unwrapping files, fixed-grid -> DART weight transfer."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed


class TransferReport(NamedTuple):
    """What a weight transfer loaded and what it did not."""

    loaded: list[str]
    missing: list[str]        # model tensors the checkpoint did not provide (e.g. the DART scorer)
    unexpected: list[str]     # checkpoint tensors the model has no place for
    resized: list[str]        # tensors resampled to a new shape (positional embeddings)

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: {self.missing[:8]}"
                f"{'...' if len(self.missing) > 8 else ''}; unexpected {len(self.unexpected)}: {self.unexpected[:8]}"
                f"{'...' if len(self.unexpected) > 8 else ''}; resized: {self.resized}")


def unwrap_state_dict(state_dict: dict) -> dict:
    """``{"model": ...}`` (hustvl/Vim, DeiT), ``{"state_dict": ...}``, ``{"module": ...}`` -> the tensors."""
    for key in ("model", "state_dict", "module", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], dict):
            return state_dict[key]
    return state_dict


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm ``pretrained_filter_fn`` for our models: unwrap the file's state dict."""
    return unwrap_state_dict(state_dict)


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
    state_dict = unwrap_state_dict(state_dict)
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


def _resize_pos_embed(source: torch.Tensor, target: torch.Tensor, source_cls: int, target_cls: int) -> torch.Tensor:
    cls = source[:, source_cls:source_cls + 1]
    grid = torch.cat([source[:, :source_cls], source[:, source_cls + 1:]], dim=1)
    old = int(round(grid.shape[1] ** 0.5))
    new = int(round((target.shape[1] - 1) ** 0.5))
    if old * old != grid.shape[1] or new * new != target.shape[1] - 1:
        raise ValueError(f"cannot resize pos_embed {tuple(source.shape)} -> {tuple(target.shape)}: grids not square")
    grid = resample_abs_pos_embed(grid, (new, new), (old, old), num_prefix_tokens=0)
    return torch.cat([grid[:, :target_cls], cls, grid[:, target_cls:]], dim=1)
