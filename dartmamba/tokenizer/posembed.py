"""Positional embeddings that follow the tokens (step 7 of the method).

Backends (registry op ``"posembed"``, dispatched in :func:`resample_pos_embed`): ``"triton"``
(``dartmamba_kernels.geometry``: one launch, inference only, CUDA) and ``"torch"`` (running sums in float64, any
device, differentiable). The Triton kernel has no backward, so it does not take inputs that need a gradient:
``"auto"`` runs the torch path then, and forcing ``"triton"`` is an error.
:func:`resample_pos_embed_reference` is the slow literal version both are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .geometry import DartGeometry
from .partition import geometry_kernels_unavailable, interval_means, overlap_matrix, rebin_rows


def posembed_macs(batch: int, num_rows: int, grid_w: int, num_tokens: int, dim: int) -> int:
    """Multiply-adds of re-binning the grid positional embeddings onto the bands, then onto the tokens
    (running-integral form): per channel, (R + 1) interpolated integrals per grid column and R * Gw divisions, then
    (N + 1) interpolated integrals and N divisions."""
    return batch * dim * ((2 * num_rows + 1) * grid_w + 2 * num_tokens + 1)


def resample_pos_embed(grid_pos_embed: Tensor, geometry: DartGeometry, backend: str | None = None) -> Tensor:
    """Per-sample positional embeddings of the DART tokens.

    Args:
        grid_pos_embed: (1 or B, Gh * Gw, D) learnable embeddings of the score grid, row-major (no cls entry).
        geometry: partition of the batch (B samples, R bands, N tokens).
        backend: ``None``/``"auto"`` (the Triton kernel for CUDA tensors when no gradient is needed, torch
            otherwise), ``"triton"`` (inference only) or ``"torch"``; the global setting is
            ``dartmamba.backends.set_backend("posembed", ...)``.

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
    return backends.dispatch("posembed", grid_pos_embed.device, grid_pos_embed, geometry, backend=backend)


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


def _resample_pos_embed_triton(grid_pos_embed: Tensor, geometry: DartGeometry) -> Tensor:
    """The ``"triton"`` backend: one launch, inference only (``dartmamba_kernels.geometry``)."""
    from dartmamba_kernels.geometry import resample_pos_embed_triton

    return resample_pos_embed_triton(grid_pos_embed, geometry)


def _triton_supports(grid_pos_embed: Tensor, geometry: DartGeometry) -> str | None:
    if torch.is_grad_enabled() and (grid_pos_embed.requires_grad or geometry.band_bounds.requires_grad
                                    or geometry.token_edges.requires_grad):
        return "the kernel is inference-only (no backward) and a gradient is required"
    return None


backends.register("posembed", "triton", _resample_pos_embed_triton, devices=("cuda",),
                  available=geometry_kernels_unavailable, supports=_triton_supports)
backends.register("posembed", "torch", resample_pos_embed_torch, devices=backends.ANY_DEVICE)


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
