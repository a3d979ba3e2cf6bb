"""Positional embeddings that follow the tokens (step 7 of the method)."""
from __future__ import annotations

import torch
from torch import Tensor

from .geometry import DartGeometry
from .partition import interval_means, overlap_matrix, rebin_rows


def resample_pos_embed(grid_pos_embed: Tensor, geometry: DartGeometry) -> Tensor:
    """Per-sample positional embeddings of the DART tokens.

    Args:
        grid_pos_embed: (1 or B, Gh * Gw, D) learnable embeddings of the score grid, row-major (no cls entry).
        geometry: partition of the batch (B samples, R bands, N tokens).

    Returns:
        (B, N, D): the grid re-binned onto the bands by row-overlap averages, then averaged over each token's
        raster interval by overlap length. Differentiable w.r.t. the embeddings and the geometry.
    """
    batch = geometry.batch_size
    grid_h, grid_w = geometry.grid_size
    if grid_pos_embed.dim() != 3 or grid_pos_embed.shape[1] != grid_h * grid_w:
        raise ValueError(f"grid_pos_embed must have shape (1 or B, {grid_h * grid_w}, D) for a {grid_h}x{grid_w} "
                         f"score grid, got {tuple(grid_pos_embed.shape)}")
    if grid_pos_embed.shape[0] not in (1, batch):
        raise ValueError(f"grid_pos_embed batch must be 1 or {batch}, got {grid_pos_embed.shape[0]}")
    dim = grid_pos_embed.shape[-1]
    # Differences of running sums cancel; float64 keeps the uniform case equal to the grid to the last fp32 bit.
    grid = grid_pos_embed.to(torch.float64).reshape(-1, grid_h, grid_w, dim)
    band_pe = rebin_rows(grid, geometry.band_bounds.to(torch.float64))            # (B, R, Gw, D)
    flow = band_pe.reshape(batch, geometry.num_rows * grid_w, dim)
    return interval_means(flow, geometry.token_edges.to(torch.float64)).to(grid_pos_embed.dtype)


def resample_pos_embed_reference(grid_pos_embed: Tensor, geometry: DartGeometry) -> Tensor:
    """Slow reference of :func:`resample_pos_embed` with explicit overlap matrices."""
    batch = geometry.batch_size
    grid_h, grid_w = geometry.grid_size
    dim = grid_pos_embed.shape[-1]
    grid = grid_pos_embed.double().reshape(-1, grid_h, grid_w, dim).expand(batch, -1, -1, -1)
    rows = overlap_matrix(geometry.band_bounds.double(), grid_h)                   # (B, R, Gh)
    band_pe = torch.einsum("bri,bicd->brcd", rows, grid).reshape(batch, -1, dim)
    tokens = overlap_matrix(geometry.token_edges.double(), geometry.num_rows * grid_w)   # (B, N, R Gw)
    return torch.einsum("bnt,btd->bnd", tokens, band_pe).to(grid_pos_embed.dtype)
