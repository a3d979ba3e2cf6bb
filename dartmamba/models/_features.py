"""Shared pieces of ``forward_intermediates`` for our model families (timm conventions)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..tokenizer import DartTokens, tokens_to_map


def split_prefix(tokens: Tensor, prefix_index: int) -> tuple[Tensor, Tensor]:
    """(B, 1 + M, D) with the class token at ``prefix_index`` -> (spatial (B, M, D), prefix (B, 1, D))."""
    prefix = tokens[:, prefix_index:prefix_index + 1]
    spatial = torch.cat([tokens[:, :prefix_index], tokens[:, prefix_index + 1:]], dim=1)
    return spatial, prefix


def to_feature_map(spatial: Tensor, dart: DartTokens | None, feature_grid: tuple[int, int]) -> Tensor:
    """Spatial tokens (B, M, D) -> (B, D, h, w): a reshape for a fixed grid, an area-weighted scatter for DART."""
    if dart is None:
        return spatial.transpose(1, 2).reshape(spatial.shape[0], spatial.shape[2], *feature_grid).contiguous()
    return tokens_to_map(spatial, dart.geometry, feature_grid)


def package_intermediates(final: Tensor | None, intermediates: list[Tensor], prefix_index: int,
                          dart: DartTokens | None, feature_grid: tuple[int, int], output_fmt: str,
                          intermediates_only: bool, return_prefix_tokens: bool, output_dict: bool):
    """Everything after the block loop of a timm-style ``forward_intermediates``.

    ``output_fmt``: ``"NCHW"`` (feature maps; DART tokens scattered onto ``feature_grid``) or ``"NLC"`` (tokens in
    DART order). With ``output_dict`` the DART output (tokens, geometry, scores) is returned under ``"dart"``.
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    split = [split_prefix(t, prefix_index) for t in intermediates]
    prefixes = [prefix for _, prefix in split]
    spatial = [s for s, _ in split]
    if output_fmt == "NCHW":
        spatial = [to_feature_map(s, dart, feature_grid) for s in spatial]
    if output_dict:
        result = {"image_intermediates": spatial}
        if return_prefix_tokens:
            result["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            result["image_features"] = final
        if dart is not None:
            result["dart"] = dart
        return result
    if return_prefix_tokens:
        spatial = list(zip(spatial, prefixes))
    return spatial if intermediates_only else (final, spatial)
