"""From DART tokens back to a regular map (dense features for detection / segmentation heads)."""
from __future__ import annotations

import torch
from torch import Tensor

from .geometry import DartGeometry


def _overlap(lo: Tensor, hi: Tensor, cell_lo: Tensor, cell_hi: Tensor) -> Tensor:
    """Length of [lo, hi) & [cell_lo, cell_hi), broadcast."""
    return (torch.minimum(hi, cell_hi) - torch.maximum(lo, cell_lo)).clamp_min(0)


def token_cell_areas(geometry: DartGeometry, map_size: tuple[int, int]) -> Tensor:
    """Area (in pixels^2) of every token inside every cell of a regular ``map_size`` grid over the image.

    Args:
        geometry: partition of B images into N tokens (R bands).
        map_size: (h, w) cells of the output map.

    Returns:
        (B, N, h, w). Tokens partition the image, so the areas of all tokens in a cell add up to the cell's area.
    """
    height, width = geometry.img_size
    map_h, map_w = map_size
    dtype = torch.float64 if geometry.token_edges.dtype == torch.float64 else torch.float32
    device = geometry.token_edges.device
    bands = geometry.band_bounds_px.to(dtype)                                         # (B, R + 1)
    edges = geometry.token_edges_px.to(dtype)                                         # (B, N + 1), strip pixels
    rows = torch.arange(map_h + 1, device=device, dtype=dtype) * (height / map_h)
    cols = torch.arange(map_w + 1, device=device, dtype=dtype) * (width / map_w)
    band_index = torch.arange(geometry.num_rows, device=device, dtype=dtype)
    # y: band r vs map row i -> (B, R, h)
    y_overlap = _overlap(bands[:, :-1, None], bands[:, 1:, None], rows[:-1], rows[1:])
    # x: token k vs map column j of band r, in strip coordinates -> (B, R, N, w)
    strip_lo = band_index[:, None] * width + cols[:-1]                                 # (R, w)
    strip_hi = band_index[:, None] * width + cols[1:]
    x_overlap = _overlap(edges[:, None, :-1, None], edges[:, None, 1:, None], strip_lo[None, :, None],
                         strip_hi[None, :, None])
    return torch.einsum("bri,brkj->bkij", y_overlap, x_overlap)


def tokens_to_map(tokens: Tensor, geometry: DartGeometry, map_size: tuple[int, int] | None = None) -> Tensor:
    """Scatter token features onto a regular map: each cell is the area-weighted mean of the tokens covering it.

    Args:
        tokens: (B, N, D) features of the N DART tokens (no prefix/class token).
        geometry: their partition.
        map_size: (h, w), default the score grid (Gh, Gw).

    Returns:
        (B, D, h, w). With uniform scores and N = Gh * Gw on the score grid, this is the fixed-grid feature map.
    """
    if tokens.dim() != 3 or tokens.shape[:2] != (geometry.batch_size, geometry.num_tokens):
        raise ValueError(f"tokens must have shape (B={geometry.batch_size}, N={geometry.num_tokens}, D), "
                         f"got {tuple(tokens.shape)}")
    map_size = tuple(geometry.grid_size if map_size is None else map_size)
    areas = token_cell_areas(geometry, map_size)
    weights = areas / areas.sum(dim=1, keepdim=True)
    return torch.einsum("bkij,bkd->bdij", weights.to(tokens.dtype), tokens)
