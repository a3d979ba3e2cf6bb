"""DART resampling: every token's region of the image -> one fixed p x p patch (step 6 of the method).

Two sampling rules:

``"paper"`` (official DART). Band r = [y_r, y_{r+1}) is read at p lines ``y_r + (y_{r+1} - y_r) a / p``
(top-aligned) over every image column, with bilinear interpolation on pixel *indices* (``align_corners=True``)
and border clamping; the bands are laid side by side into a strip (C, p, W R). Token k = [u_k, u_{k+1}) of the
strip is read at p columns ``u_k + (u_{k+1} - u_k) b / p``, bilinear, zero beyond the strip's end. A token
that straddles two bands interpolates across the seam between the last column of one band and the first of the
next, as the official code does.

``"center"`` (ours). Sample points sit at the centres of the p x p sub-cells of each token's region (continuous
coordinates, ``align_corners=False`` semantics, border clamping), and each point is read from the band its own
column falls in, so no sample mixes the right edge of one band with the left edge of the next.

Backends (registry op ``"resample"``, dispatched in :func:`resample_patches`): ``"torch"`` (gathers, below) on any
device and ``"triton"`` (``dartmamba_kernels``, CUDA). :func:`resample_reference` is the slow literal version the others are
tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from .geometry import DartGeometry

SAMPLING_MODES = ("paper", "center")


def resample_macs(batch: int, num_tokens: int, chans: int, patch_size: int) -> int:
    """Multiply-adds of bilinear resampling to (B, N, C, p, p): 4 taps per output element (the FLOP counter's
    count of the gather path, which no op shows)."""
    return 4 * batch * num_tokens * chans * patch_size * patch_size


def _check_sampling(sampling: str) -> None:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")


# ----------------------------------------------------------------------------------------------------------------
# Slow, literal reference
# ----------------------------------------------------------------------------------------------------------------
def _normalise_corners(coord: Tensor, size: int) -> Tensor:
    """Pixel-index coordinate -> grid_sample coordinate for align_corners=True."""
    if size == 1:
        return torch.zeros_like(coord)
    return coord * (2.0 / (size - 1)) - 1.0


def resample_reference(images: Tensor, geometry: DartGeometry, patch_size: int, sampling: str = "paper") -> Tensor:
    """Literal implementation with ``F.grid_sample`` (a Python loop over bands in paper mode).

    Args:
        images: (B, C, H, W).
        geometry: partition of the batch.
        patch_size: p.
        sampling: ``"paper"`` or ``"center"``.

    Returns:
        (B, N, C, p, p) patches in the dtype of ``images``.
    """
    _check_sampling(sampling)
    batch, chans, height, width = images.shape
    num_rows, num_tokens, p = geometry.num_rows, geometry.num_tokens, patch_size
    dtype = images.dtype if images.dtype == torch.float64 else torch.float32
    work = images.to(dtype)
    steps = torch.arange(p, device=images.device, dtype=dtype) / p
    bands = geometry.band_bounds_px.to(dtype)
    edges = geometry.token_edges_px.to(dtype)

    if sampling == "paper":
        columns = _normalise_corners(torch.arange(width, device=images.device, dtype=dtype), width)
        band_images = []
        for r in range(num_rows):
            top, bottom = bands[:, r:r + 1], bands[:, r + 1:r + 2]
            lines = _normalise_corners(top + (bottom - top) * steps, height)            # (B, p)
            grid = torch.stack(torch.broadcast_tensors(columns.view(1, 1, width), lines.view(batch, p, 1)), -1)
            band_images.append(F.grid_sample(work, grid, mode="bilinear", padding_mode="border",
                                             align_corners=True))                      # (B, C, p, W)
        strip = torch.cat(band_images, dim=-1)                                         # (B, C, p, W R)
        start, end = edges[:, :-1, None], edges[:, 1:, None]
        cols = _normalise_corners(start + (end - start) * steps, width * num_rows)      # (B, N, p)
        rows = _normalise_corners(torch.arange(p, device=images.device, dtype=dtype), p)
        grid = torch.stack(torch.broadcast_tensors(cols.reshape(batch, 1, num_tokens * p),
                                                   rows.view(1, p, 1)), -1)            # (B, p, N p, 2)
        out = F.grid_sample(strip, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    else:
        centres = (torch.arange(p, device=images.device, dtype=dtype) + 0.5) / p
        start, end = edges[:, :-1, None], edges[:, 1:, None]
        strip_pos = start + (end - start) * centres                                    # (B, N, p) continuous
        band = torch.div(strip_pos, width, rounding_mode="floor").clamp(0, num_rows - 1)
        x = strip_pos - band * width                                                   # continuous, in band
        band = band.long()
        top = torch.gather(bands, 1, band.view(batch, -1)).view_as(x)
        bottom = torch.gather(bands, 1, band.view(batch, -1) + 1).view_as(x)
        y = top[:, :, None, :] + (bottom - top)[:, :, None, :] * centres.view(1, 1, p, 1)   # (B, N, p_a, p_b)
        x = x[:, :, None, :].expand_as(y)
        grid = torch.stack([x * (2.0 / width) - 1.0, y * (2.0 / height) - 1.0], -1)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(batch, p, num_tokens * p, 2)
        out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.view(batch, chans, p, num_tokens, p).permute(0, 3, 1, 2, 4)
    return out.to(images.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Vectorised torch backend (any device, autograd for image and geometry)
# ----------------------------------------------------------------------------------------------------------------
def sample_points(geometry: DartGeometry, patch_size: int, sampling: str = "paper"):
    """Where every output pixel reads from, as pixel-index coordinates.

    Returns a dict of tensors for output pixel (token k, row a, column b):
        ``lines``  (B, R, p)   image row of line a of band r (before clamping),
        ``strip``  (B, N, p)   paper: strip column of sample b; center: continuous strip position,
    in the dtype of the geometry. Shared by the torch backend and the kernel wrappers.
    """
    _check_sampling(sampling)
    p = patch_size
    dtype = geometry.band_bounds.dtype
    device = geometry.band_bounds.device
    offset = 0.5 if sampling == "center" else 0.0
    steps = (torch.arange(p, device=device, dtype=dtype) + offset) / p
    bands = geometry.band_bounds_px
    edges = geometry.token_edges_px
    lines = bands[:, :-1, None] + (bands[:, 1:, None] - bands[:, :-1, None]) * steps - offset
    strip = edges[:, :-1, None] + (edges[:, 1:, None] - edges[:, :-1, None]) * steps
    return {"lines": lines, "strip": strip}


def _split_index(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Clamped bilinear split of a pixel-index coordinate: (i0, i1, t) with value = (1-t) v[i0] + t v[i1]."""
    coord = coord.clamp(0, size - 1)
    i0 = coord.detach().floor().long().clamp_(0, size - 1)
    i1 = (i0 + 1).clamp_(max=size - 1)
    return i0, i1, coord - i0.to(coord.dtype)


def resample_torch(images: Tensor, geometry: DartGeometry, patch_size: int, sampling: str = "paper") -> Tensor:
    """Gather-based resampling; same contract as :func:`resample_reference`, no Python loop over bands."""
    _check_sampling(sampling)
    batch, chans, height, width = images.shape
    num_rows, num_tokens, p = geometry.num_rows, geometry.num_tokens, patch_size
    points = sample_points(geometry, p, sampling)
    lines, strip = points["lines"], points["strip"]
    wdtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    lines, strip = lines.to(wdtype), strip.to(wdtype)

    if sampling == "paper":
        col0 = strip.detach().floor().long()                      # (B, N, p_b); strip >= 0
        tx = strip - col0.to(wdtype)
        col_parts = []
        for col, weight in ((col0, 1.0 - tx), (col0 + 1, tx)):
            inside = col < width * num_rows                        # zero padding beyond the strip
            band = torch.div(col, width, rounding_mode="floor").clamp_(max=num_rows - 1)
            x = (col - band * width).clamp_(max=width - 1)
            col_parts.append((band, x, weight * inside.to(wdtype)))
    else:
        band = torch.div(strip.detach(), width, rounding_mode="floor").long().clamp_(0, num_rows - 1)
        x0, x1, tx = _split_index(strip - band.to(wdtype) * width - 0.5, width)
        col_parts = [(band, x0, 1.0 - tx), (band, x1, tx)]

    flat = images.reshape(batch, chans, height * width)
    out = None
    for band, x, wx in col_parts:
        # rows of line a in this column's band: (B, N, p_a, p_b)
        band_lines = torch.gather(lines, 1, band.reshape(batch, -1, 1).expand(-1, -1, p))
        band_lines = band_lines.view(batch, num_tokens, p, p).transpose(2, 3)
        y0, y1, ty = _split_index(band_lines, height)
        x = x[:, :, None, :]
        wx = wx[:, :, None, :]
        for y, wy in ((y0, 1.0 - ty), (y1, ty)):
            index = (y * width + x).reshape(batch, 1, -1).expand(-1, chans, -1)
            values = torch.gather(flat, 2, index).view(batch, chans, num_tokens, p, p).to(wdtype)
            term = values * (wx * wy)[:, None]
            out = term if out is None else out + term
    return out.permute(0, 2, 1, 3, 4).to(images.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def _resample_triton(images: Tensor, geometry: DartGeometry, patch_size: int, sampling: str = "paper") -> Tensor:
    """The ``"triton"`` backend: forward and backward fused in one launch each (``dartmamba_kernels.resample``)."""
    from dartmamba_kernels.resample import resample_triton

    return resample_triton(images, geometry, patch_size, sampling)


def _resample_triton_supports(images: Tensor, geometry: DartGeometry, patch_size: int,
                              sampling: str = "paper") -> str | None:
    from dartmamba_kernels.resample import supports

    return supports(images, geometry, patch_size)


backends.register("resample", "triton", _resample_triton, devices=("cuda",),
                  available=backends.module_check("dartmamba_kernels.resample", "the Triton resampling kernel"),
                  supports=_resample_triton_supports)
backends.register("resample", "torch", resample_torch, devices=backends.ANY_DEVICE)


def resample_patches(images: Tensor, geometry: DartGeometry, patch_size: int, sampling: str = "paper",
                     backend: str | None = None) -> Tensor:
    """Patches (B, N, C, p, p) of every token, through the backend registry (op ``"resample"``).

    ``backend``: ``None``/``"auto"`` (Triton for CUDA tensors when available and it takes the inputs, torch
    otherwise), ``"triton"`` or ``"torch"``; the global setting is ``dartmamba.backends.set_backend("resample", ...)``.
    """
    _check_sampling(sampling)
    return backends.dispatch("resample", images.device, images, geometry, patch_size, sampling, backend=backend)
