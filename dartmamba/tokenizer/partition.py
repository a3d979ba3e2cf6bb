"""DART partition: score map -> horizontal bands -> token edges along the raster "flow".

Everything here is a pure, batched function of tensors: no Python loop over samples, bands or tokens, and no
host synchronisation (value checks are optional and skipped while tracing / capturing).

Units. Band boundaries live on ``[0, Gh]`` (score-grid rows). Token edges live on ``[0, Gw * R]``: the ``R``
bands laid side by side, each ``Gw`` score-grid columns long, read in raster order.

Backends (registry op ``"partition"``, dispatched in :func:`partition_scores`): ``"triton"``
(``dartmamba_kernels.geometry``: the whole partition of a batch in one fused launch, CUDA) and ``"torch"`` (the
functions below, any device: the reference the kernel is tested against).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .geometry import DartGeometry
from .validation import as_pair, check_positive_int, check_scores

# The official code adds 1e-8 to the bin mass in the quantile denominator; we divide by the bin mass taken from
# the same cumulative sum the bin was found in (consistent even for bins that are tiny in fp32), clamped at this.
_TINY_MASS = 1e-12


def default_num_rows(num_tokens: int) -> int:
    """R = round(sqrt(N)): 196 -> 14, 121 -> 11, 144 -> 12, 288 -> 17, 392 -> 20."""
    check_positive_int(num_tokens, "num_tokens")
    return max(1, int(round(num_tokens ** 0.5)))


def inverse_cdf_quantiles(masses: Tensor, num_parts: int) -> Tensor:
    """Boundaries that cut a piecewise-constant density into ``num_parts`` parts of equal mass.

    Args:
        masses: (B, L) non-negative bin masses of unit-width bins on ``[0, L)`` (need not sum to 1).
        num_parts: K >= 1.

    Returns:
        (B, K + 1) boundaries ``[0, q_1, ..., q_{K-1}, L]``; ``q_k`` is the level-``k/K`` quantile of the
        piecewise-linear CDF: ``j`` = first bin with ``cdf_j >= k/K``, ``q = j + (k/K - cdf_{j-1}) / mass_j``.
        Differentiable w.r.t. ``masses``; the bin index is locally constant. The fraction is clamped to [0, 1]
        against rounding, but its gradient is the formula's everywhere (as the official code, which has no
        clamp): where a quantile lands exactly on a bin end (tied or uniform masses, where it is exactly 1) it
        is the one-sided derivative of bin ``j``, not the clamp's zero.
    """
    check_positive_int(num_parts, "num_parts", " (the number of equal-mass parts K)")
    if not isinstance(masses, Tensor) or masses.dim() != 2 or masses.shape[1] < 1:
        raise ValueError(f"masses must be a tensor of shape (B, L) with L >= 1, got "
                         f"{tuple(masses.shape) if isinstance(masses, Tensor) else type(masses).__name__}")
    batch, length = masses.shape
    cdf = torch.cumsum(masses, dim=-1)
    cdf = cdf / cdf[:, -1:]
    levels = torch.arange(1, num_parts, device=masses.device, dtype=masses.dtype) / num_parts
    levels = levels.expand(batch, num_parts - 1).contiguous()
    bins = torch.searchsorted(cdf.detach(), levels.detach(), right=False).clamp_(max=length - 1)
    cdf_before = torch.cat([cdf.new_zeros(batch, 1), cdf], dim=-1)  # cdf_before[:, j] = cdf_{j-1}
    below = torch.gather(cdf_before, 1, bins)
    above = torch.gather(cdf_before, 1, bins + 1)
    fraction = _clamp_value_only((levels - below) / (above - below).clamp_min(_TINY_MASS), 0.0, 1.0)
    interior = bins.to(masses.dtype) + fraction
    zeros = masses.new_zeros(batch, 1)
    ends = masses.new_full((batch, 1), float(length))
    return torch.cat([zeros, interior, ends], dim=-1)


def _clamp_value_only(x: Tensor, low: float, high: float) -> Tensor:
    """``x.clamp(low, high)`` in value (bit for bit), with the identity's gradient (no zero at or past the bounds)."""
    return x.detach().clamp(low, high) + (x - x.detach())


def cumulative_along(values: Tensor, dim: int) -> Tensor:
    """Integral table of unit-width bins: out[..., 0, ...] = 0, out[..., i, ...] = sum of the first i bins.

    Shape: (..., L, ...) -> (..., L + 1, ...) along ``dim``.
    """
    zero_shape = list(values.shape)
    zero_shape[dim] = 1
    return torch.cat([values.new_zeros(zero_shape), torch.cumsum(values, dim=dim)], dim=dim)


def integrate_at(values: Tensor, table: Tensor, positions: Tensor) -> Tensor:
    """Integral of a piecewise-constant function from 0 to each position.

    Args:
        values: (B or 1, L, *F) bin values (unit-width bins on [0, L)); batch 1 broadcasts over positions.
        table: (B or 1, L + 1, *F) its ``cumulative_along(values, 1)``.
        positions: (B, M) points in [0, L].

    Returns:
        (B, M, *F) ``table[floor(x)] + (x - floor(x)) * values[floor(x)]``; the derivative w.r.t. ``x`` is the
        value of the bin that contains it.
    """
    length = values.shape[1]
    index = positions.detach().floor().clamp_(0, length - 1).long()
    frac = (positions - index.to(positions.dtype)).to(values.dtype)
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None] if values.shape[0] > 1 else 0
    frac = frac.view(*frac.shape, *([1] * (values.dim() - 2)))
    return table[rows, index] + frac * values[rows, index]


def interval_means(values: Tensor, boundaries: Tensor) -> Tensor:
    """Overlap-length weighted mean of unit-width bins over each interval [b_k, b_{k+1}).

    Args:
        values: (B or 1, L, *F).
        boundaries: (B, K + 1), increasing, within [0, L].

    Returns:
        (B, K, *F): ``(F(b_{k+1}) - F(b_k)) / (b_{k+1} - b_k)`` with F the running integral.
    """
    table = cumulative_along(values, 1)
    integral = integrate_at(values, table, boundaries)
    widths = (boundaries[:, 1:] - boundaries[:, :-1]).clamp_min(torch.finfo(boundaries.dtype).tiny)
    widths = widths.to(values.dtype).view(*widths.shape, *([1] * (values.dim() - 2)))
    return (integral[:, 1:] - integral[:, :-1]) / widths


def rebin_rows(grid: Tensor, band_bounds: Tensor) -> Tensor:
    """Re-bin a grid onto bands by overlap averages along rows (step 4 of the method).

    Args:
        grid: (B or 1, Gh, Gw, *F) per-cell values (a pdf, or positional embeddings with F = (D,)).
        band_bounds: (B, R + 1) on [0, Gh].

    Returns:
        (B, R, Gw, *F): band r, column c = mean over rows of ``grid[:, :, c]`` weighted by overlap with band r.
    """
    return interval_means(grid, band_bounds)


geometry_kernels_unavailable = backends.module_check("dartmamba_kernels.geometry", "the Triton geometry kernels")


def _partition_triton(scores: Tensor, num_tokens: int, num_rows: int) -> tuple[Tensor, Tensor]:
    """The ``"triton"`` backend: the whole partition of a batch in one fused launch (``dartmamba_kernels``)."""
    from dartmamba_kernels.geometry import partition_triton

    return partition_triton(scores, num_tokens, num_rows)


def _partition_triton_supports(scores: Tensor, num_tokens: int, num_rows: int) -> str | None:
    from dartmamba_kernels.geometry import supports_partition

    return supports_partition((scores.shape[1], scores.shape[2]), num_tokens, num_rows)


def partition_scores(
    scores: Tensor,
    num_tokens: int,
    num_rows: int | None = None,
    *,
    validate: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Score map -> band boundaries and token edges (steps 2-5 of the method), through the backend registry.

    Args:
        scores: (B, Gh, Gw) strictly positive, finite scores.
        num_tokens: N >= 1.
        num_rows: R, default ``round(sqrt(N))``; 1 <= R <= N.
        validate: check the score values (one host sync; skipped automatically while compiling or capturing).
            Unchecked, a sample with a non-finite or non-positive score is cut as if its scores were constant
            (:func:`uniform_where_invalid`), never into an invalid partition.
        backend: ``None``/``"auto"`` (the fused Triton kernel for CUDA tensors when available and the shape fits
            its tiles, torch otherwise), ``"triton"`` or ``"torch"``; the global setting is
            ``dartmamba.backends.set_backend("partition", ...)``.

    Returns:
        band_bounds (B, R + 1) on [0, Gh] and token_edges (B, N + 1) on [0, Gw * R], both strictly increasing;
        computed in float64, returned in float32 (float64 for float64 scores). Differentiable w.r.t. ``scores``
        with either backend (same values and gradients).
    """
    num_rows = default_num_rows(num_tokens) if num_rows is None else num_rows
    check_scores(scores, num_tokens, num_rows, check_values=validate)
    return backends.dispatch("partition", scores.device, uniform_where_invalid(scores), num_tokens, num_rows,
                             backend=backend)


def uniform_where_invalid(scores: Tensor) -> Tensor:
    """(B, Gh, Gw) -> the same, with constant scores for every sample that has a non-finite or non-positive one (its
    partition is then the regular one). No host sync: what unvalidated paths (compiled, captured, ``validate=False``)
    get instead of an error; the other samples' scores pass through bit for bit, with their gradients."""
    valid = (torch.isfinite(scores) & (scores > 0)).flatten(1).all(dim=1).view(-1, 1, 1)
    return torch.where(valid, scores, torch.ones_like(scores))


def partition_scores_torch(scores: Tensor, num_tokens: int, num_rows: int) -> tuple[Tensor, Tensor]:
    """The torch backend (and reference) of :func:`partition_scores`; no argument checks."""
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    # The geometry is tiny (B x G^2); float64 makes constant scores land exactly on the integer grid after the
    # cast back, so the uniform case reproduces plain patchification bit for bit.
    scores = scores.to(torch.float64)
    batch, grid_h, grid_w = scores.shape
    pdf = scores / scores.sum(dim=(1, 2), keepdim=True)
    band_bounds = inverse_cdf_quantiles(pdf.sum(dim=2), num_rows)
    band_pdf = rebin_rows(pdf, band_bounds)  # (B, R, Gw): average density of each band, per column
    flow = band_pdf.reshape(batch, num_rows * grid_w)
    token_edges = inverse_cdf_quantiles(flow, num_tokens)
    return band_bounds.to(out_dtype), token_edges.to(out_dtype)


backends.register("partition", "triton", _partition_triton, devices=("cuda",), available=geometry_kernels_unavailable,
                  supports=_partition_triton_supports)
backends.register("partition", "torch", partition_scores_torch, devices=backends.ANY_DEVICE)


def partition(
    scores: Tensor,
    num_tokens: int,
    num_rows: int | None = None,
    *,
    img_size: tuple[int, int] | int | None = None,
    validate: bool = True,
    backend: str | None = None,
) -> DartGeometry:
    """Like :func:`partition_scores`, packed as a :class:`DartGeometry`.

    ``img_size`` (H, W) in pixels defaults to the score grid itself (one pixel per score cell).
    """
    if img_size is not None:
        img_size = as_pair(img_size, "img_size")
    band_bounds, token_edges = partition_scores(scores, num_tokens, num_rows, validate=validate, backend=backend)
    grid_size = (scores.shape[1], scores.shape[2])
    return DartGeometry(band_bounds=band_bounds, token_edges=token_edges, grid_size=grid_size,
                        img_size=grid_size if img_size is None else img_size)


def uniform_geometry(batch: int, grid_size: int | tuple[int, int], num_tokens: int, num_rows: int | None = None, *,
                     img_size: int | tuple[int, int] | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> DartGeometry:
    """The geometry of constant scores (a regular grid when N = R * Gw and R = Gh)."""
    check_positive_int(batch, "batch")
    grid_h, grid_w = as_pair(grid_size, "grid_size")
    default_num_rows(num_tokens)                       # checks num_tokens before any tensor is made
    scores = torch.ones(batch, grid_h, grid_w, device=device, dtype=dtype)
    return partition(scores, num_tokens, num_rows, img_size=img_size, validate=False)


def overlap_matrix(boundaries: Tensor, length: int) -> Tensor:
    """Reference for :func:`interval_means`: explicit (B, K, L) overlap-length weights, rows summing to 1.

    ``W[b, k, i] = |[b_k, b_{k+1}) & [i, i + 1)| / (b_{k+1} - b_k)``.
    """
    check_positive_int(length, "length", " (the number of unit bins L)")
    cells = torch.arange(length, device=boundaries.device, dtype=boundaries.dtype)
    lo, hi = boundaries[:, :-1, None], boundaries[:, 1:, None]
    overlap = (torch.minimum(hi, cells + 1) - torch.maximum(lo, cells)).clamp_min(0)
    return overlap / (hi - lo)
