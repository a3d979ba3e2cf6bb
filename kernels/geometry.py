"""Triton-fused DART geometry: scores -> band bounds -> token edges (the partition), and the positional-embedding
resampling, for a whole batch in one launch each, with static shapes and no host synchronisation.

Same contract and numbers as the torch references in :mod:`dartmamba.tokenizer.partition`
(:func:`~dartmamba.tokenizer.partition.partition_scores`, computed in float64 and returned in float32 for float32
scores) and :mod:`dartmamba.tokenizer.posembed` (:func:`~dartmamba.tokenizer.posembed.resample_pos_embed`); this
module only changes *how* they are computed.

Partition, forward: ONE launch, grid ``(B,)``, one program per sample, everything in float64 registers:

 1. load the (Gh, Gw) score tile, pdf = scores / sum, row masses m = row sums of the pdf;
 2. row quantiles: cdf = cumsum(m) / its last entry; for the R - 1 levels k / R the bin j = first row with
    cdf_j >= k / R (a count of ``cdf < level`` over a [levels, rows] tile: the cdf is non-decreasing) and
    q = j + clamp((level - cdf_{j-1}) / max(cdf_j - cdf_{j-1}, 1e-12), 0, 1) -> band bounds [0, q.., Gh];
 3. re-binning: a loop over the R bands evaluates the row integral F_c(y) = sum_i pdf[i, c] clamp(y - i, 0, 1)
    (= table[floor y] + frac * pdf[floor y], the reference's running-sum form) at each bound and writes the
    band's mean density per column, (F_c(b_{r+1}) - F_c(b_r)) / (b_{r+1} - b_r), into the flow (B, R * Gw);
 4. flow quantiles: the flow is reloaded as one vector, its normalised cdf written to a scratch row, and each
    block of the N - 1 levels k / N finds its bin by a vectorised binary search over that row (cache hits);
    token edges = j + fraction as in 2. Float64 throughout makes constant scores land exactly on the integer
    grid after the cast to float32, as in the reference (``test_uniform_scores_*`` rely on it).

The bins (row and flow), the float64 band bounds and the flow are written as by-products for the backward.

Partition, backward: torch ops (tiny (B, <= R Gw) tensors; ``torch.compile`` fuses them), the exact derivative of
the reference's formula with the saved bins held constant (as autograd holds ``searchsorted`` constant there):
level -> (cdf_{j-1}, cdf_j) through the fraction (its [0, 1] clamp passes the gradient, as in the reference: at a
bin end the one-sided derivative of the official formula; the step's clamp_min follows the installed torch's
convention), cdf -> masses through the normalisation and a reverse cumsum, flow -> pdf and band bounds
through the running-sum interpolation, band bounds -> row masses the same way, pdf -> scores.

Positional embeddings, forward (inference): ONE launch, grid ``(cdiv(N, BLOCK_T), B, cdiv(D, BLOCK_D))``. Each
token's embedding is the overlap-weighted mean over the raster cells it covers of the band means, each band mean
the overlap-weighted mean over the grid rows it covers: a convex combination of grid embeddings, read straight
from the (L2-resident) grid table with two nested loops over the cells and rows the block's tokens touch. No
(B, R Gw, D) intermediate, no running sums (so no cancellation: float32 accumulation suffices, float64 for
float64 embeddings), and constant scores give the grid embeddings bit for bit. Not differentiable: with gradients
required the dispatcher runs the torch path.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Importing this module needs
triton, not CUDA. Written for triton 3.6 - 3.9 (no block pointers, while loops instead of ranges over tensors).
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, clamp_passes, device_guard, is_interpreted, register_flops

__all__ = ["partition_triton", "resample_pos_embed_triton", "interpreted", "supports_partition"]

_TINY_MASS = 1e-12                             # the reference's clamp of a bin's cdf step (partition.py)
_TINY_WIDTH = torch.finfo(torch.float64).tiny  # the reference's clamp of an interval width (interval_means)
_MAX_TILE = 1 << 14                            # largest register tile a program holds (elements)


# ----------------------------------------------------------------------------------------------------------------
# Device code: partition
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fraction(level, below, above):
    # the clamp as a float64 constant: a bare 1e-12 would be a float32 literal (9.99999996e-13)
    den = tl.maximum(above - below, tl.full([], 1e-12, tl.float64))
    frac = (level - below) / den
    return tl.minimum(tl.maximum(frac, 0.0), 1.0)


@triton.jit
def _partition_fwd_kernel(scores_ptr, bb_ptr, te_ptr, bb64_ptr, flow_ptr, cdf_ptr, rbin_ptr, tbin_ptr,
                          GH: tl.constexpr, GW: tl.constexpr, R: tl.constexpr, N: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, LOG_L: tl.constexpr):
    L: tl.constexpr = R * GW
    pid = tl.program_id(0).to(tl.int64)
    oh = tl.arange(0, BLOCK_H)
    ow = tl.arange(0, BLOCK_W)
    hmask = oh < GH
    wmask = ow < GW

    # 1. pdf and row masses
    s = tl.load(scores_ptr + pid * (GH * GW) + oh[:, None] * GW + ow[None, :],
                mask=hmask[:, None] & wmask[None, :], other=0.0).to(tl.float64)
    total = tl.sum(tl.sum(s, axis=1), axis=0)
    pdf = s / total
    rows = tl.sum(pdf, axis=1)                                  # [BLOCK_H], zero past GH

    # 2. row quantiles at levels r / R for every bound index r (the two ends are overwritten below)
    cdf = tl.cumsum(rows, axis=0)
    cdf = cdf / tl.max(cdf, axis=0)                             # non-decreasing: the max is the last entry
    orr = tl.arange(0, BLOCK_R)
    level = orr.to(tl.float64) / R
    below_level = (cdf[None, :] < level[:, None]) & hmask[None, :]
    j = tl.minimum(tl.sum(below_level.to(tl.int32), axis=1), GH - 1)          # searchsorted(cdf, level, left)
    above = tl.sum(tl.where(oh[None, :] == j[:, None], cdf[None, :], 0.0), axis=1)
    below = tl.sum(tl.where(oh[None, :] == j[:, None] - 1, cdf[None, :], 0.0), axis=1)
    bounds = j.to(tl.float64) + _fraction(level, below, above)
    bounds = tl.where(orr == 0, 0.0, tl.where(orr == R, GH * 1.0, bounds))
    rmask = orr <= R
    tl.store(bb64_ptr + pid * (R + 1) + orr, bounds, mask=rmask)
    tl.store(bb_ptr + pid * (R + 1) + orr, bounds.to(bb_ptr.dtype.element_ty), mask=rmask)
    inner = (orr >= 1) & (orr < R)
    tl.store(rbin_ptr + pid * (R - 1) + orr - 1, j, mask=inner)

    # 3. band means per column -> the flow (B, R * GW)
    yi = oh.to(tl.float64)[:, None]
    y_lo = tl.sum(tl.where(orr == 0, bounds, 0.0), axis=0)
    f_lo = tl.zeros([BLOCK_W], dtype=tl.float64)               # F(0) = 0
    for r in range(R):
        y_hi = tl.sum(tl.where(orr == r + 1, bounds, 0.0), axis=0)
        f_hi = tl.sum(pdf * tl.minimum(tl.maximum(y_hi - yi, 0.0), 1.0), axis=0)
        width = tl.maximum(y_hi - y_lo, tl.full([], 2.2250738585072014e-308, tl.float64))   # float64 tiny
        tl.store(flow_ptr + pid * L + r * GW + ow, (f_hi - f_lo) / width, mask=wmask)
        y_lo = y_hi
        f_lo = f_hi
    tl.debug_barrier()

    # 4. flow quantiles at levels k / N, k = 1 .. N - 1
    ol = tl.arange(0, BLOCK_L)
    flow = tl.load(flow_ptr + pid * L + ol, mask=ol < L, other=0.0)
    fcdf = tl.cumsum(flow, axis=0)
    fcdf = fcdf / tl.max(fcdf, axis=0)
    cdf_row = cdf_ptr + pid * L
    tl.store(cdf_row + ol, fcdf, mask=ol < L)
    tl.debug_barrier()
    te_row = te_ptr + pid * (N + 1)
    ends = tl.arange(0, 2)
    tl.store(te_row + ends * N, (ends * L).to(tl.float64).to(te_ptr.dtype.element_ty))
    ok = tl.arange(0, BLOCK_K)
    for k0 in range(0, N - 1, BLOCK_K):
        k = k0 + ok
        kmask = k < N - 1
        lev = (k + 1).to(tl.float64) / N
        lo = tl.zeros([BLOCK_K], dtype=tl.int32)
        hi = tl.zeros([BLOCK_K], dtype=tl.int32) + L
        for _ in tl.static_range(LOG_L):                       # first index with cdf >= level (L if none)
            active = lo < hi
            mid = (lo + hi) // 2
            c = tl.load(cdf_row + mid, mask=active & kmask, other=0.0)
            right = c < lev
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (c >= lev), mid, hi)
        jt = tl.minimum(lo, L - 1)
        above_t = tl.load(cdf_row + jt, mask=kmask, other=1.0)
        below_t = tl.load(cdf_row + jt - 1, mask=kmask & (jt > 0), other=0.0)
        edge = jt.to(tl.float64) + _fraction(lev, below_t, above_t)
        tl.store(te_row + k + 1, edge.to(te_ptr.dtype.element_ty), mask=kmask)
        tl.store(tbin_ptr + pid * (N - 1) + k, jt, mask=kmask)


# ----------------------------------------------------------------------------------------------------------------
# Device code: positional embeddings (inference)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _cells_touched(lo, hi, n, mask):
    """The unit cells [k, k + 1) of a line of ``n`` that each interval [lo, hi) touches: first, end (clamped to the
    line, at least one cell), and the most cells any unmasked interval touches (the loop count)."""
    first = tl.minimum(tl.maximum(tl.floor(lo), 0.0), n - 1.0).to(tl.int32)
    end = tl.minimum(tl.maximum(tl.ceil(hi), 1.0), n * 1.0).to(tl.int32)
    end = tl.maximum(end, first + 1)
    return first, end, tl.max(tl.where(mask, end - first, 0), axis=0)


@triton.jit
def _cell_overlap(k, end, lo, hi, mask):
    """Cell k of each interval [lo, hi) (``end`` from :func:`_cells_touched`): k, whether the interval touches it,
    and the length of [lo, hi) & [k, k + 1) (0 where it does not), in the intervals' dtype."""
    live = mask & (k < end)
    kf = k.to(lo.dtype)
    overlap = tl.maximum(tl.minimum(hi, kf + 1.0) - tl.maximum(lo, kf), 0.0)
    return k, live, tl.where(live, overlap, 0.0)


@triton.jit
def _pos_embed_fwd_kernel(pe_ptr, bb_ptr, te_ptr, out_ptr, N, D, pe_batch_stride,
                          GH: tl.constexpr, GW: tl.constexpr, R: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, WORK_F64: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    L: tl.constexpr = R * GW
    ot = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    od = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = ot < N
    dmask = od < D
    if WORK_F64:
        wdt = tl.float64
    else:
        wdt = tl.float32
    te = te_ptr + pid_b * (N + 1)
    bb = bb_ptr + pid_b * (R + 1)
    e0 = tl.load(te + ot, mask=tmask, other=0.0).to(wdt)
    e1 = tl.load(te + ot + 1, mask=tmask, other=1.0).to(wdt)
    width = e1 - e0
    # raster cells [t, t + 1) with t from floor(e0) to ceil(e1) - 1 (clamped to the strip)
    t_first, t_end, span = _cells_touched(e0, e1, L, tmask)
    pe_b = pe_ptr + pid_b * pe_batch_stride
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=wdt)
    dt = span * 0
    while dt < span:
        t, live, cell = _cell_overlap(t_first + dt, t_end, e0, e1, tmask)
        band = t // GW
        col = t - band * GW
        y0 = tl.load(bb + band, mask=live, other=0.0).to(wdt)
        y1 = tl.load(bb + band + 1, mask=live, other=1.0).to(wdt)
        height = y1 - y0
        i_first, i_end, rspan = _cells_touched(y0, y1, GH, live)
        band_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=wdt)
        di = rspan * 0
        while di < rspan:
            i, rlive, w = _cell_overlap(i_first + di, i_end, y0, y1, live)
            v = tl.load(pe_b + (i * GW + col)[:, None] * D + od[None, :],
                        mask=rlive[:, None] & dmask[None, :], other=0.0).to(wdt)
            band_acc += w[:, None] * v
            di += 1
        acc += (cell / height)[:, None] * band_acc
        dt += 1
    out = acc / width[:, None]
    o = out_ptr + pid_b * N * D + ot[:, None] * D + od[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def interpreted() -> bool:
    """Whether the kernels were defined under ``TRITON_INTERPRET=1`` (then they run on CPU tensors)."""
    return is_interpreted(_partition_fwd_kernel)


def _check_device(t: Tensor, what: str) -> None:
    check_device(t, what, "dartmamba_kernels.geometry", interpreted())


def _partition_blocks(grid_h: int, grid_w: int, num_tokens: int, num_rows: int) -> dict:
    length = num_rows * grid_w
    block_k = 64 if interpreted() else 128
    block_k = max(1, min(block_k, triton.next_power_of_2(max(1, num_tokens - 1))))
    return dict(BLOCK_H=triton.next_power_of_2(grid_h), BLOCK_W=triton.next_power_of_2(grid_w),
                BLOCK_R=triton.next_power_of_2(num_rows + 1), BLOCK_L=triton.next_power_of_2(length),
                BLOCK_K=block_k, LOG_L=max(1, math.ceil(math.log2(length + 1))))


def supports_partition(grid_size: tuple[int, int], num_tokens: int, num_rows: int) -> str | None:
    """None when the fused partition handles this configuration, else why not (register tiles too large)."""
    grid_h, grid_w = grid_size
    blocks = _partition_blocks(grid_h, grid_w, num_tokens, num_rows)
    if blocks["BLOCK_H"] * blocks["BLOCK_W"] > _MAX_TILE:
        return f"score grid {grid_h}x{grid_w} larger than the kernel's {_MAX_TILE}-element tile"
    if blocks["BLOCK_R"] * blocks["BLOCK_H"] > _MAX_TILE:
        return f"{num_rows} bands x {grid_h} rows larger than the kernel's {_MAX_TILE}-element tile"
    if blocks["BLOCK_L"] > 4 * _MAX_TILE:
        return f"flow of {num_rows * grid_w} cells longer than the kernel's {4 * _MAX_TILE}"
    return None


def _partition_forward(scores: Tensor, num_tokens: int, num_rows: int):
    batch, grid_h, grid_w = scores.shape
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    length = num_rows * grid_w
    dev = scores.device
    band_bounds = torch.empty(batch, num_rows + 1, device=dev, dtype=out_dtype)
    token_edges = torch.empty(batch, num_tokens + 1, device=dev, dtype=out_dtype)
    bounds64 = torch.empty(batch, num_rows + 1, device=dev, dtype=torch.float64)
    flow = torch.empty(batch, length, device=dev, dtype=torch.float64)
    cdf = torch.empty(batch, length, device=dev, dtype=torch.float64)
    row_bins = torch.empty(batch, num_rows - 1, device=dev, dtype=torch.int32)
    token_bins = torch.empty(batch, num_tokens - 1, device=dev, dtype=torch.int32)
    blocks = _partition_blocks(grid_h, grid_w, num_tokens, num_rows)
    warps = 4 if blocks["BLOCK_L"] <= 1024 else 8
    # R = 1 / N = 1 leave no interior bins: the kernel then gets a 1-element dummy instead of an empty tensor
    dummy = torch.empty(1, device=dev, dtype=torch.int32) if row_bins.numel() == 0 or token_bins.numel() == 0 else None
    rbin_arg = row_bins if row_bins.numel() else dummy
    tbin_arg = token_bins if token_bins.numel() else dummy
    with device_guard(scores):
        _partition_fwd_kernel[(batch,)](scores, band_bounds, token_edges, bounds64, flow, cdf, rbin_arg, tbin_arg,
                                        GH=grid_h, GW=grid_w, R=num_rows, N=num_tokens, num_warps=warps, **blocks)
    return band_bounds, token_edges, bounds64, flow, row_bins, token_bins


# --- clamp_min convention of the installed torch (it changed between releases); the backward mirrors it ----------
def _pass_above(x: Tensor, lo: float) -> Tensor:
    return (x >= lo if clamp_passes(1.0, 1.0, None) else x > lo).to(x.dtype)


def _quantile_backward(grad: Tensor, masses: Tensor, bins: Tensor, num_parts: int) -> Tensor:
    """d/d masses of the interior quantiles of :func:`~dartmamba.tokenizer.partition.inverse_cdf_quantiles`.

    grad (B, K - 1), masses (B, L) float64, bins (B, K - 1) the bins the forward found -> (B, L) float64.
    """
    cum = torch.cumsum(masses, dim=1)
    total = cum[:, -1:]
    cdf = cum / total
    cdf_before = torch.nn.functional.pad(cdf, (1, 0))          # cdf_before[:, j] = cdf_{j-1}
    bins = bins.long()
    below = torch.gather(cdf_before, 1, bins)
    above = torch.gather(cdf_before, 1, bins + 1)
    levels = torch.arange(1, num_parts, device=masses.device, dtype=torch.float64) / num_parts
    step = above - below
    den = step.clamp_min(_TINY_MASS)
    raw = (levels - below) / den
    g_raw = grad                       # the fraction's clamp to [0, 1] is value-only (see inverse_cdf_quantiles)
    g_step = -g_raw * raw / den * _pass_above(step, _TINY_MASS)
    g_below = -g_raw / den - g_step
    g_cdf = torch.zeros_like(cdf_before).scatter_add_(1, bins, g_below).scatter_add_(1, bins + 1, g_step)[:, 1:]
    g_cum = g_cdf / total
    g_total = -(g_cdf * cdf).sum(dim=1, keepdim=True) / total
    g_cum = torch.cat([g_cum[:, :-1], g_cum[:, -1:] + g_total], dim=1)
    return g_cum.flip(1).cumsum(1).flip(1)


def _partition_backward(grad_bounds: Tensor | None, grad_edges: Tensor | None, scores: Tensor, bounds64: Tensor,
                        flow: Tensor, row_bins: Tensor, token_bins: Tensor, num_tokens: int, num_rows: int) -> Tensor:
    """Exact gradient of the reference partition w.r.t. the scores, the bins held constant. All float64."""
    batch, grid_h, grid_w = scores.shape
    s = scores.to(torch.float64)
    total = s.sum(dim=(1, 2), keepdim=True)
    pdf = s / total
    g_pdf = torch.zeros_like(pdf)
    g_bounds = torch.zeros_like(bounds64) if grad_bounds is None else grad_bounds.to(torch.float64).clone()

    if grad_edges is not None and num_tokens > 1:
        g_flow = _quantile_backward(grad_edges[:, 1:-1].to(torch.float64), flow, token_bins, num_tokens)
        g_band = g_flow.view(batch, num_rows, grid_w)
        band = flow.view(batch, num_rows, grid_w)
        width_raw = bounds64[:, 1:] - bounds64[:, :-1]
        width = width_raw.clamp_min(_TINY_WIDTH)
        g_diff = g_band / width[..., None]                                    # d/d (F(b_{r+1}) - F(b_r))
        g_width = -(g_band * band).sum(-1) / width * _pass_above(width_raw, _TINY_WIDTH)
        g_f = torch.nn.functional.pad(g_diff, (0, 0, 1, 0)) - torch.nn.functional.pad(g_diff, (0, 0, 0, 1))
        index = bounds64.floor().clamp(0, grid_h - 1)
        frac = bounds64 - index
        index = index.long()
        rows = torch.arange(grid_h, device=scores.device)
        pdf_at = torch.gather(pdf, 1, index[..., None].expand(-1, -1, grid_w))         # (B, R + 1, Gw)
        g_bounds = g_bounds + (g_f * pdf_at).sum(-1)
        g_bounds[:, 1:] += g_width
        g_bounds[:, :-1] -= g_width
        below = (rows < index[..., None]).to(torch.float64)
        cum_weight = below + frac[..., None] * (rows == index[..., None]).to(torch.float64)  # (B, R + 1, Gh)
        g_pdf = g_pdf + torch.einsum("bkc,bki->bic", g_f, cum_weight)

    if num_rows > 1:
        g_rows = _quantile_backward(g_bounds[:, 1:-1], pdf.sum(dim=2), row_bins, num_rows)
        g_pdf = g_pdf + g_rows[:, :, None]
    g_scores = (g_pdf - (g_pdf * pdf).sum(dim=(1, 2), keepdim=True)) / total
    return g_scores.to(scores.dtype)


# torch.library custom ops: opaque to torch.compile (no graph break), with registered autograd.
@torch.library.custom_op("dartmamba::partition_triton", mutates_args=())
def _partition_op(scores: Tensor, num_tokens: int, num_rows: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _partition_forward(scores.contiguous(), num_tokens, num_rows)


@_partition_op.register_fake
def _(scores, num_tokens, num_rows):
    batch, _, grid_w = scores.shape
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    new = scores.new_empty
    return (new(batch, num_rows + 1, dtype=out_dtype), new(batch, num_tokens + 1, dtype=out_dtype),
            new(batch, num_rows + 1, dtype=torch.float64), new(batch, num_rows * grid_w, dtype=torch.float64),
            new(batch, num_rows - 1, dtype=torch.int32), new(batch, num_tokens - 1, dtype=torch.int32))


def _zero_flops(*args, out_shape=None, **kwargs) -> int:
    return 0


# the partition is a few hundred operations per score cell, which the FLOP convention leaves out (as fvcore does)
register_flops(torch.ops.dartmamba.partition_triton, _zero_flops)


def _partition_setup_context(ctx, inputs, output):
    scores, num_tokens, num_rows = inputs
    _, _, bounds64, flow, row_bins, token_bins = output
    ctx.save_for_backward(scores, bounds64, flow, row_bins, token_bins)
    ctx.num_tokens, ctx.num_rows = num_tokens, num_rows
    ctx.mark_non_differentiable(bounds64, flow, row_bins, token_bins)


def _partition_autograd_backward(ctx, grad_bounds, grad_edges, *_):
    scores, bounds64, flow, row_bins, token_bins = ctx.saved_tensors
    g = _partition_backward(grad_bounds, grad_edges, scores, bounds64, flow, row_bins, token_bins, ctx.num_tokens,
                            ctx.num_rows)
    return g, None, None


_partition_op.register_autograd(_partition_autograd_backward, setup_context=_partition_setup_context)


def partition_triton(scores: Tensor, num_tokens: int, num_rows: int) -> tuple[Tensor, Tensor]:
    """Band bounds (B, R + 1) and token edges (B, N + 1) of a batch of score maps, fused in one Triton kernel.

    Same values as :func:`dartmamba.tokenizer.partition.partition_scores` (float64 inside; float32 out, float64 for
    float64 scores) and the same gradient w.r.t. ``scores``. No value checks (the caller validates).

    Args:
        scores: (B, Gh, Gw) positive scores, float32 / bfloat16 / float16 / float64, CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        num_tokens: N >= 1.
        num_rows: R in [1, N].
    """
    if scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point (B, Gh, Gw) tensor, got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    _check_device(scores, "partition_triton")
    reason = supports_partition((scores.shape[1], scores.shape[2]), num_tokens, num_rows)
    if reason is not None:
        raise ValueError(f"partition_triton: {reason}; use the torch backend")
    band_bounds, token_edges, *_ = _partition_op(scores, num_tokens, num_rows)
    return band_bounds, token_edges


# ----------------------------------------------------------------------------------------------------------------
# Positional embeddings
# ----------------------------------------------------------------------------------------------------------------
def _pos_embed_blocks(num_tokens: int, dim: int, work_f64: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps). 4 tile elements per thread: ~100 registers on sm_90 (ptxas, no spills); 8 per
    thread cost 170-255. Untuned beyond that (no GPU timings yet). The interpreter pays per program: big tiles."""
    block_d = min(triton.next_power_of_2(dim), 32 if work_f64 else 64)
    block_t = 16 if not interpreted() else min(64, triton.next_power_of_2(num_tokens))
    return block_t, block_d, max(1, min(8, block_t * block_d // 128))


@torch.library.custom_op("dartmamba::resample_pos_embed_triton", mutates_args=())
def _pos_embed_op(grid_pos_embed: Tensor, band_bounds: Tensor, token_edges: Tensor, grid_h: int, grid_w: int
                  ) -> Tensor:
    batch, num_tokens = token_edges.shape[0], token_edges.shape[1] - 1
    num_rows = band_bounds.shape[1] - 1
    dim = grid_pos_embed.shape[-1]
    pe = grid_pos_embed.contiguous()
    out = pe.new_empty(batch, num_tokens, dim)
    work_f64 = pe.dtype == torch.float64
    block_t, block_d, warps = _pos_embed_blocks(num_tokens, dim, work_f64)
    grid = (triton.cdiv(num_tokens, block_t), batch, triton.cdiv(dim, block_d))
    # The interpreter rounds fp32 -> bf16 by truncation (compiled Triton: round to nearest even, like torch).
    target = out.new_empty(out.shape, dtype=torch.float32) if interpreted() and out.dtype == torch.bfloat16 else out
    with device_guard(pe):
        _pos_embed_fwd_kernel[grid](pe, band_bounds.contiguous(), token_edges.contiguous(), target, num_tokens, dim,
                                    0 if pe.shape[0] == 1 else grid_h * grid_w * dim,
                                    GH=grid_h, GW=grid_w, R=num_rows, BLOCK_T=block_t, BLOCK_D=block_d,
                                    WORK_F64=work_f64, num_warps=warps)
    if target is not out:
        out.copy_(target)
    return out


@_pos_embed_op.register_fake
def _(grid_pos_embed, band_bounds, token_edges, grid_h, grid_w):
    return grid_pos_embed.new_empty(token_edges.shape[0], token_edges.shape[1] - 1, grid_pos_embed.shape[-1])


def _pos_embed_flops(grid_pos_embed, band_bounds, token_edges, grid_h, grid_w, *args, out_shape=None, **kwargs) -> int:
    """The re-binning in running-integral form, as the torch path counts it: per channel, (R + 1) interpolated
    integrals per grid column and R * Gw divisions, then (N + 1) integrals and N divisions (2 FLOPs each)."""
    batch, num_rows, num_tokens = token_edges[0], band_bounds[1] - 1, token_edges[1] - 1
    return 2 * batch * grid_pos_embed[-1] * ((2 * num_rows + 1) * grid_w + 2 * num_tokens + 1)


register_flops(torch.ops.dartmamba.resample_pos_embed_triton, _pos_embed_flops, part="posembed")


def resample_pos_embed_triton(grid_pos_embed: Tensor, geometry) -> Tensor:
    """Per-sample positional embeddings (B, N, D) of the DART tokens, one Triton launch, inference only.

    Same values as :func:`dartmamba.tokenizer.posembed.resample_pos_embed` (float32 accumulation, float64 for float64
    embeddings; output in the embedding dtype). Raises if a gradient would be needed: the dispatcher
    (:func:`~dartmamba.tokenizer.posembed.resample_pos_embed`) runs the torch path then.

    Args:
        grid_pos_embed: (1 or B, Gh * Gw, D) float32 / bfloat16 / float16 / float64.
        geometry: :class:`~dartmamba.tokenizer.DartGeometry` of the batch.
    """
    grid_h, grid_w = geometry.grid_size
    bounds, edges = geometry.band_bounds, geometry.token_edges
    _check_device(grid_pos_embed, "resample_pos_embed_triton")
    if torch.is_grad_enabled() and (grid_pos_embed.requires_grad or bounds.requires_grad or edges.requires_grad):
        raise RuntimeError("resample_pos_embed_triton is inference-only (no autograd); use the torch backend when "
                           "gradients are needed")
    if grid_pos_embed.dim() != 3 or grid_pos_embed.shape[1] != grid_h * grid_w:
        raise ValueError(f"grid_pos_embed must have shape (1 or B, {grid_h * grid_w}, D), got "
                         f"{tuple(grid_pos_embed.shape)}")
    if grid_pos_embed.shape[0] not in (1, geometry.batch_size):
        raise ValueError(f"grid_pos_embed batch must be 1 or {geometry.batch_size}, got {grid_pos_embed.shape[0]}")
    if bounds.dtype not in (torch.float32, torch.float64):
        bounds = bounds.float()
    if edges.dtype != bounds.dtype:
        edges = edges.to(bounds.dtype)
    return _pos_embed_op(grid_pos_embed, bounds, edges, grid_h, grid_w)
