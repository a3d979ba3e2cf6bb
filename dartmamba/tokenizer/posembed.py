"""Positional embeddings that follow the tokens (step 7 of the method).

Backends (op ``"posembed"``, chosen once, in :func:`resample_pos_embed`): ``"triton"``
(``dartmamba_kernels.geometry``: one launch, inference only, CUDA) and ``"torch"`` (running sums in float64, any
device, differentiable). Whenever a gradient is needed (training), the torch path runs whatever the setting.
:func:`resample_pos_embed_reference` is the slow literal version both are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .geometry import DartGeometry
from .partition import geometry_kernels_unavailable, interval_means, overlap_matrix, rebin_rows


backends.register_backend("posembed", "triton", ("cuda",), geometry_kernels_unavailable)
backends.register_backend("posembed", "torch", ("cuda", "cpu", "mps", "xpu"))


def resample_pos_embed(grid_pos_embed: Tensor, geometry: DartGeometry, backend: str | None = None) -> Tensor:
    """Per-sample positional embeddings of the DART tokens.

    Args:
        grid_pos_embed: (1 or B, Gh * Gw, D) learnable embeddings of the score grid, row-major (no cls entry).
        geometry: partition of the batch (B samples, R bands, N tokens).
        backend: ``None``/``"auto"`` (the Triton kernel for CUDA tensors when no gradient is needed, torch
            otherwise), ``"triton"`` or ``"torch"``; the global setting is
            ``dartmamba.backends.set_backend("posembed", ...)``. The Triton kernel has no backward: when the
            embeddings or the geometry require a gradient (and grad mode is on) the torch path runs.

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
    name = backends.choose("posembed", grid_pos_embed.device, backend)
    needs_grad = torch.is_grad_enabled() and (grid_pos_embed.requires_grad or geometry.band_bounds.requires_grad
                                              or geometry.token_edges.requires_grad)
    if name == "triton" and not needs_grad:
        from dartmamba_kernels.geometry import resample_pos_embed_triton
        return resample_pos_embed_triton(grid_pos_embed, geometry)
    return resample_pos_embed_torch(grid_pos_embed, geometry)


def resample_pos_embed_torch(grid_pos_embed: Tensor, geometry: DartGeometry) -> Tensor:
    """The torch backend of :func:`resample_pos_embed` (no argument checks)."""
    batch = geometry.batch_size
    grid_h, grid_w = geometry.grid_size
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
