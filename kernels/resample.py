"""Triton-fused DART patch resampling: image + partition -> (B, N, C, p, p) patches, forward and backward.

Same contract and numbers as :func:`dartmamba.tokenizer.resample.resample_torch` (which documents the two
sampling rules, ``"paper"`` and ``"center"``); this module only changes *how* they are computed.

Forward: ONE launch. Grid ``(cdiv(N, BLOCK_T), B)``; a program owns ``BLOCK_T`` consecutive tokens of one image
and computes a ``[BLOCK_T, BLOCK_P, BLOCK_P]`` tile (token, line a, column b) of sample points from the band
bounds and token edges alone: strip coordinate ``u`` per (token, b), its two column taps (paper mode: columns
``floor(u)`` and ``floor(u) + 1`` of the strip, each in its own band, the second one zero past the strip's end;
center mode: both taps in the band of ``u``), the row of line ``a`` of that band, and the four bilinear weights.
It then loops over the channels with four masked gathers and one contiguous store per channel; accumulation is
fp32 (fp64 for fp64 images), the store casts to the image dtype.

Backward: ONE launch over the same grid, recomputing the sample points (nothing but the inputs is saved).
 * Image gradient: every (sample, tap) adds ``grad * weight`` to its pixel with an atomic add (zero-weight taps
   are skipped). ``deterministic=True`` makes the atomics order-independent: each contribution is converted to a
   64-bit fixed-point integer (a power-of-two scale derived on the device from ``max|grad|`` so that no partial
   sum can overflow: ``|sum| <= max|grad| * N p^2`` per pixel), integer addition is associative, and the sum is
   converted back once. The result is bitwise reproducible; its resolution is ``max|grad| * 2^-(61 - log2(N
   p^2))``, far below fp32 rounding of any pixel gradient that is not ~1e-7 of the largest one. Non-finite
   incoming gradients make the whole deterministic gradient NaN.
 * Geometry gradients: the derivative of the bilinear weights w.r.t. the sample coordinates, chained exactly as
   autograd chains the torch path (floor / bin indices locally constant, clamped coordinates get zero gradient,
   taps past the strip end are zeros), reduced inside the program over channels and lines (token edges: no
   atomics at all, per-token partial sums written to a (B, N) buffer and combined in torch) and over tokens and
   columns per band (band bounds: one atomic per bound index a program touches, fixed-point in deterministic
   mode, so those are reproducible too).

Gradients reach ``images``, ``geometry.band_bounds`` and ``geometry.token_edges`` (through the pixel-unit
scaling, which stays in torch). Entry point: :func:`resample_triton`. The ops are ``torch.library`` custom ops
with a fake implementation and registered autograd, so ``torch.compile`` traces them without graph breaks.

Not fused, on purpose: the patch-embedding GEMM (K = C p^2 = 768, D = 192..768) stays a separate cuBLAS call.
 * Training: the GEMM's weight gradient needs the patches (grad W = grad_tokens^T @ patches), so they are written
   either way (or recomputed, i.e. a second gather pass in the backward): fusion saves nothing there.
 * Inference: fusion saves at most the patches' round trip, one write + one read of B N C p^2 values. At the paper
   shape (B 256, N 196, bf16) that is 2 x 77 MB = 154 MB (N 392: twice that; fp32 twice again), a small fraction
   of a DeiT-S step and of the tokenizer's budget (docs/benchmarks.md has the measured times). Reaching even that
   bound needs a gather-fed ``tl.dot`` as fast as cuBLAS's TMA/wgmma GEMM (~30 GFLOP here), with the 590 KB bf16
   weight streamed from L2 per token block.
``benchmarks/bench_resample.py`` measures the bound on the device (resample time, GEMM time, and a copy of the
patches tensor) and prints it with the kernel table: the decision is revisited if it shows more than a few percent
of a backbone step.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Importing this module needs
triton, not CUDA.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import check_device, clamp_passes, device_guard, is_interpreted, register_flops

__all__ = ["resample_triton", "SAMPLING_MODES", "interpreted", "supports"]

SAMPLING_MODES = ("paper", "center")
_IMAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _steps(offs, P: tl.constexpr, OFF: tl.constexpr, GEOM_F64: tl.constexpr):
    """(offs + OFF) / P in the geometry dtype, correctly rounded (as torch computes ``(arange + off) / p``)."""
    if GEOM_F64:
        s = (offs.to(tl.float64) + OFF) / P
    else:
        s = tl.math.div_rn(offs.to(tl.float32) + OFF, P * 1.0)
    return s


@triton.jit
def _clamp_grad_mask(v, hi, CLAMP_LO_INCL: tl.constexpr):
    """Where autograd of ``v.clamp(0, hi)`` passes the gradient (the upper end never matters here: there the two
    bilinear taps coincide, so the derivative is zero either way)."""
    if CLAMP_LO_INCL:
        m = (v >= 0.0) & (v < hi)
    else:
        m = (v > 0.0) & (v < hi)
    return m


@triton.jit
def _columns(e0, e1, step_b, W, R, PAPER: tl.constexpr, WORK_F64: tl.constexpr, CLAMP_LO_INCL: tl.constexpr):
    """Column taps of every (token, b): [T, B] tensors.

    Returns band / x / weight of tap 0 and tap 1, the in-strip masks, and ``dxdu``: the derivative of tap 1's
    weight w.r.t. the strip coordinate (tap 0's is minus that, masked by ``in0``).
    """
    u = e0 + (e1 - e0) * step_b                       # geometry dtype, as sample_points computes it
    if WORK_F64:
        u = u.to(tl.float64)
    else:
        u = u.to(tl.float32)
    if PAPER:
        col0 = tl.maximum(tl.floor(u), 0.0).to(tl.int32)
        tx = u - col0.to(u.dtype)
        col1 = col0 + 1
        in0 = col0 < W * R
        in1 = col1 < W * R
        band0 = tl.minimum(col0 // W, R - 1)
        band1 = tl.minimum(col1 // W, R - 1)
        x0 = tl.minimum(col0 - band0 * W, W - 1)
        x1 = tl.minimum(col1 - band1 * W, W - 1)
        wx0 = tl.where(in0, 1.0 - tx, 0.0)
        wx1 = tl.where(in1, tx, 0.0)
        dxdu = tl.where(in0 | in1, 1.0, 0.0).to(u.dtype)
    else:
        wf = W * 1.0
        q = tl.floor(u / wf)
        # exact floor(u / W) (torch's floor division), whatever the rounding of the division above
        q = tl.where(q * wf > u, q - 1.0, q)
        q = tl.where((q + 1.0) * wf <= u, q + 1.0, q)
        q = tl.minimum(tl.maximum(q, 0.0), R - 1.0)
        band0 = q.to(tl.int32)
        band1 = band0
        xc = u - q * wf - 0.5
        xcl = tl.minimum(tl.maximum(xc, 0.0), W - 1.0)
        x0 = tl.minimum(tl.floor(xcl).to(tl.int32), W - 1)
        x1 = tl.minimum(x0 + 1, W - 1)
        tx = xcl - x0.to(u.dtype)
        in0 = u == u
        in1 = in0
        wx0 = 1.0 - tx
        wx1 = tx
        dxdu = tl.where(_clamp_grad_mask(xc, W - 1.0, CLAMP_LO_INCL), 1.0, 0.0).to(u.dtype)
    band0 = tl.maximum(band0, 0)
    band1 = tl.maximum(band1, 0)
    x0 = tl.maximum(x0, 0)
    x1 = tl.maximum(x1, 0)
    return band0, x0, wx0, in0, band1, x1, wx1, in1, dxdu


@triton.jit
def _rows(bb, band, step_a, H, OFF: tl.constexpr, WORK_F64: tl.constexpr, CLAMP_LO_INCL: tl.constexpr):
    """Rows of line a in each column's band. ``band``: [T, 1, B]; ``step_a``: [1, A, 1]. Returns [T, A, B]
    row taps y0, y1, weight ty of y1, and the clamp mask of the gradient."""
    top = tl.load(bb + band)
    bot = tl.load(bb + band + 1)
    line = top + (bot - top) * step_a - OFF           # geometry dtype, as sample_points computes it
    if WORK_F64:
        y = line.to(tl.float64)
    else:
        y = line.to(tl.float32)
    ycl = tl.minimum(tl.maximum(y, 0.0), H - 1.0)
    y0 = tl.minimum(tl.maximum(tl.floor(ycl).to(tl.int32), 0), H - 1)
    y1 = tl.minimum(y0 + 1, H - 1)
    ty = ycl - y0.to(y.dtype)
    dmask = _clamp_grad_mask(y, H - 1.0, CLAMP_LO_INCL)
    return y0, y1, ty, dmask


@triton.jit
def _sample_tile(bb_ptr, te_ptr, N, H, W, R, P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                 PAPER: tl.constexpr, GEOM_F64: tl.constexpr, WORK_F64: tl.constexpr, CLAMP_LO_INCL: tl.constexpr):
    """The sample points of this program's tile: tokens ``offs_t`` of image ``program_id(1)``, lines a x columns b.

    Shared by the forward and backward kernels (the backward recomputes the points instead of saving them), so
    both sample exactly the same pixels. Returns, in order: ``offs_t`` [T], ``offs_p`` [B], ``tmask``, ``pmask``,
    ``step`` [B] (line / column fractions), ``omask`` [T, A, B] (valid outputs), ``m0`` / ``m1`` (valid outputs
    whose column tap 0 / 1 lies in the strip), pixel offsets ``o00 o01 o10 o11`` and bilinear weights
    ``w00 w01 w10 w11`` of the four taps (column tap, row tap), and for the geometry gradient: column weights
    ``wx0 wx1`` and in-strip masks ``in0 in1`` [T, B], row fractions ``ty0 ty1`` [T, A, B], tap bands
    ``band0 band1`` [T, B], row clamp masks ``dm0 dm1`` [T, A, B], ``dxdu`` [T, B] (see ``_columns``).
    """
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    OFF: tl.constexpr = 0.0 if PAPER else 0.5
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    tmask = offs_t < N
    pmask = offs_p < P
    step = _steps(offs_p, P, OFF, GEOM_F64)

    bb = bb_ptr + pid_b * (R + 1)
    te = te_ptr + pid_b * (N + 1)
    e0 = tl.load(te + offs_t, mask=tmask, other=0.0)[:, None]
    e1 = tl.load(te + offs_t + 1, mask=tmask, other=0.0)[:, None]
    band0, x0, wx0, in0, band1, x1, wx1, in1, dxdu = _columns(e0, e1, step[None, :], W, R, PAPER, WORK_F64,
                                                              CLAMP_LO_INCL)
    step_a = step[None, :, None]
    r00, r01, ty0, dm0 = _rows(bb, band0[:, None, :], step_a, H, OFF, WORK_F64, CLAMP_LO_INCL)
    if PAPER:
        r10, r11, ty1, dm1 = _rows(bb, band1[:, None, :], step_a, H, OFF, WORK_F64, CLAMP_LO_INCL)
    else:
        r10 = r00
        r11 = r01
        ty1 = ty0
        dm1 = dm0

    omask = tmask[:, None, None] & pmask[None, :, None] & pmask[None, None, :]
    m0 = omask & in0[:, None, :]
    m1 = omask & in1[:, None, :]
    w00 = wx0[:, None, :] * (1.0 - ty0)
    w01 = wx0[:, None, :] * ty0
    w10 = wx1[:, None, :] * (1.0 - ty1)
    w11 = wx1[:, None, :] * ty1
    o00 = r00 * W + x0[:, None, :]
    o01 = r01 * W + x0[:, None, :]
    o10 = r10 * W + x1[:, None, :]
    o11 = r11 * W + x1[:, None, :]
    return (offs_t, offs_p, tmask, pmask, step, omask, m0, m1, o00, o01, o10, o11, w00, w01, w10, w11,
            wx0, wx1, ty0, ty1, in0, in1, band0, band1, dm0, dm1, dxdu)


@triton.jit
def _resample_fwd_kernel(img_ptr, bb_ptr, te_ptr, out_ptr, N, H, W, R,
                         C: tl.constexpr, P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                         PAPER: tl.constexpr, GEOM_F64: tl.constexpr, WORK_F64: tl.constexpr,
                         CLAMP_LO_INCL: tl.constexpr):
    offs_t, offs_p, tmask, pmask, step, omask, m0, m1, o00, o01, o10, o11, w00, w01, w10, w11, \
        wx0, wx1, ty0, ty1, in0, in1, band0, band1, dm0, dm1, dxdu = _sample_tile(
            bb_ptr, te_ptr, N, H, W, R, P, BLOCK_T, BLOCK_P, PAPER, GEOM_F64, WORK_F64, CLAMP_LO_INCL)
    pid_b = tl.program_id(1)

    hw = H * W
    img_b = img_ptr + pid_b.to(tl.int64) * C * hw
    out_b = out_ptr + pid_b.to(tl.int64) * N * (C * P * P)
    o_out = offs_t[:, None, None] * (C * P * P) + offs_p[None, :, None] * P + offs_p[None, None, :]
    for c in tl.static_range(C):
        img_c = img_b + c * hw
        v00 = tl.load(img_c + o00, mask=m0, other=0.0)
        v01 = tl.load(img_c + o01, mask=m0, other=0.0)
        v10 = tl.load(img_c + o10, mask=m1, other=0.0)
        v11 = tl.load(img_c + o11, mask=m1, other=0.0)
        if WORK_F64:
            acc = v00.to(tl.float64) * w00
            acc = acc + v01.to(tl.float64) * w01
            acc = acc + v10.to(tl.float64) * w10
            acc = acc + v11.to(tl.float64) * w11
        else:
            acc = v00.to(tl.float32) * w00
            acc = acc + v01.to(tl.float32) * w01
            acc = acc + v10.to(tl.float32) * w10
            acc = acc + v11.to(tl.float32) * w11
        tl.store(out_b + o_out + c * (P * P), acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _scatter(ptr, offs, val, scale, mask, FIXED: tl.constexpr):
    if FIXED:
        tl.atomic_add(ptr + offs, tl.floor(val * scale + 0.5).to(tl.int64), mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr + offs, val, mask=mask, sem="relaxed")


@triton.jit
def _resample_bwd_kernel(go_ptr, img_ptr, bb_ptr, te_ptr, gimg_ptr, gbb_ptr, glo_ptr, ghi_ptr, scale_ptr,
                         N, H, W, R,
                         C: tl.constexpr, P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                         PAPER: tl.constexpr, GEOM_F64: tl.constexpr, WORK_F64: tl.constexpr,
                         CLAMP_LO_INCL: tl.constexpr, NEED_IMG: tl.constexpr, NEED_GEOM: tl.constexpr,
                         FIXED: tl.constexpr):
    offs_t, offs_p, tmask, pmask, step, omask, m0, m1, o00, o01, o10, o11, w00, w01, w10, w11, \
        wx0, wx1, ty0, ty1, in0, in1, band0, band1, dm0, dm1, dxdu = _sample_tile(
            bb_ptr, te_ptr, N, H, W, R, P, BLOCK_T, BLOCK_P, PAPER, GEOM_F64, WORK_F64, CLAMP_LO_INCL)
    pid_b = tl.program_id(1)
    step_a = step[None, :, None]
    wx0e = wx0[:, None, :]
    wx1e = wx1[:, None, :]
    if FIXED:
        scale_img = tl.load(scale_ptr)
        scale_geom = tl.load(scale_ptr + 1)
    else:
        scale_img = 1.0
        scale_geom = 1.0

    hw = H * W
    img_b = img_ptr + pid_b.to(tl.int64) * C * hw
    gimg_b = gimg_ptr + pid_b.to(tl.int64) * C * hw
    go_b = go_ptr + pid_b.to(tl.int64) * N * (C * P * P)
    o_out = offs_t[:, None, None] * (C * P * P) + offs_p[None, :, None] * P + offs_p[None, None, :]

    # d loss / d (tap-0 weight), d (tap-1 weight), d ty (per column tap), accumulated over channels
    dwx0 = tl.zeros([BLOCK_T, BLOCK_P, BLOCK_P], dtype=w00.dtype)
    dwx1 = tl.zeros([BLOCK_T, BLOCK_P, BLOCK_P], dtype=w00.dtype)
    dty0 = tl.zeros([BLOCK_T, BLOCK_P, BLOCK_P], dtype=w00.dtype)
    dty1 = tl.zeros([BLOCK_T, BLOCK_P, BLOCK_P], dtype=w00.dtype)
    for c in tl.static_range(C):
        g = tl.load(go_b + o_out + c * (P * P), mask=omask, other=0.0).to(w00.dtype)
        if NEED_IMG:
            gimg_c = gimg_b + c * hw
            _scatter(gimg_c, o00, g * w00, scale_img, m0 & (w00 != 0.0), FIXED)
            _scatter(gimg_c, o01, g * w01, scale_img, m0 & (w01 != 0.0), FIXED)
            _scatter(gimg_c, o10, g * w10, scale_img, m1 & (w10 != 0.0), FIXED)
            _scatter(gimg_c, o11, g * w11, scale_img, m1 & (w11 != 0.0), FIXED)
        if NEED_GEOM:
            img_c = img_b + c * hw
            v00 = tl.load(img_c + o00, mask=m0, other=0.0).to(w00.dtype)
            v01 = tl.load(img_c + o01, mask=m0, other=0.0).to(w00.dtype)
            v10 = tl.load(img_c + o10, mask=m1, other=0.0).to(w00.dtype)
            v11 = tl.load(img_c + o11, mask=m1, other=0.0).to(w00.dtype)
            dwx0 += g * (v00 * (1.0 - ty0) + v01 * ty0)
            dwx1 += g * (v10 * (1.0 - ty1) + v11 * ty1)
            dty0 += g * (v01 - v00)
            dty1 += g * (v11 - v10)

    if NEED_GEOM:
        # token edges: strip u = e0 + (e1 - e0) * step_b; tap-0 weight (1 - tx) * in0, tap-1 weight tx * in1
        du = dxdu * tl.sum(tl.where(in1[:, None, :], dwx1, 0.0) - tl.where(in0[:, None, :], dwx0, 0.0), axis=1)
        du_step = du * step[None, :]
        s_all = tl.sum(du, axis=1)
        s_step = tl.sum(du_step, axis=1)
        glo = glo_ptr + pid_b * N
        ghi = ghi_ptr + pid_b * N
        tl.store(glo + offs_t, s_all - s_step, mask=tmask)
        tl.store(ghi + offs_t, s_step, mask=tmask)

        # band bounds: line(a) = top + (bot - top) * step_a - OFF of the tap's band
        dy0 = tl.where(dm0, dty0 * wx0e, 0.0)
        dy1 = tl.where(dm1, dty1 * wx1e, 0.0)
        top0 = tl.sum(dy0 * (1.0 - step_a), axis=1)   # [T, B] -> bound index band0
        bot0 = tl.sum(dy0 * step_a, axis=1)           # [T, B] -> bound index band0 + 1
        top1 = tl.sum(dy1 * (1.0 - step_a), axis=1)
        bot1 = tl.sum(dy1 * step_a, axis=1)
        valid = tmask[:, None] & pmask[None, :]
        valid0 = valid & in0
        valid1 = valid & in1
        big = R + 1
        r_lo = tl.min(tl.min(tl.where(valid0, band0, big), axis=1), axis=0)
        r_hi = tl.max(tl.max(tl.where(valid1, band1, tl.where(valid0, band0, -1)), axis=1), axis=0)
        gbb = gbb_ptr + pid_b * (R + 1)
        r = r_lo
        while r <= r_hi + 1:  # (a while loop: range() over tensor bounds breaks triton 3.6's interpreter)
            part = tl.where(valid0 & (band0 == r), top0, 0.0) + tl.where(valid0 & (band0 + 1 == r), bot0, 0.0)
            part += tl.where(valid1 & (band1 == r), top1, 0.0) + tl.where(valid1 & (band1 + 1 == r), bot1, 0.0)
            total = tl.sum(tl.sum(part, axis=1), axis=0)
            if FIXED:
                tl.atomic_add(gbb + r, tl.floor(total * scale_geom + 0.5).to(tl.int64), sem="relaxed")
            else:
                tl.atomic_add(gbb + r, total, sem="relaxed")
            r += 1


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------
def interpreted() -> bool:
    """Whether the kernels were defined under ``TRITON_INTERPRET=1`` (then they run on CPU tensors)."""
    return is_interpreted(_resample_fwd_kernel)


def _clamp_lo_incl() -> bool:
    """autograd's convention for ``x.clamp(lo, hi)`` at ``x == lo`` (the kernel follows the torch path's)."""
    return clamp_passes(0.0, 0.0, 1.0)


def _blocks(num_tokens: int, patch_size: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_P, num_warps). On a GPU a forward program holds ~512 sample points (x C channels, 4 per
    thread: 56 registers on sm_90) and a backward program ~256 (2 per thread: ~80 registers, more live values);
    the interpreter pays per program, so it gets big tiles."""
    block_p = triton.next_power_of_2(patch_size)
    target = 8192 if interpreted() else (256 if backward else 512)
    block_t = max(1, min(triton.next_power_of_2(num_tokens), target // (block_p * block_p)))
    per_warp = 32 * (2 if backward else 4)
    warps = max(1, min(8, (block_t * block_p * block_p) // per_warp))
    return block_t, block_p, warps


def _launch_opts() -> dict:
    # No FMA contraction: sample coordinates are rounded exactly like torch's separate ops, so floors agree.
    return {"enable_fp_fusion": False}


def _forward_into(out: Tensor, images: Tensor, bounds: Tensor, edges: Tensor, patch_size: int, paper: bool):
    batch, chans, height, width = images.shape
    num_rows, num_tokens = bounds.shape[1] - 1, edges.shape[1] - 1
    block_t, block_p, warps = _blocks(num_tokens, patch_size)
    grid = (triton.cdiv(num_tokens, block_t), batch)
    # The interpreter rounds fp32 -> bf16 by truncation (compiled Triton: round to nearest even, like torch).
    target = out.new_empty(out.shape, dtype=torch.float32) if interpreted() and out.dtype == torch.bfloat16 else out
    with device_guard(images):
        _resample_fwd_kernel[grid](
            images, bounds, edges, target, num_tokens, height, width, num_rows,
            C=chans, P=patch_size, BLOCK_T=block_t, BLOCK_P=block_p, PAPER=paper,
            GEOM_F64=bounds.dtype == torch.float64, WORK_F64=images.dtype == torch.float64,
            CLAMP_LO_INCL=_clamp_lo_incl(), num_warps=warps, **_launch_opts())
    if target is not out:
        out.copy_(target)
    return out


def _fixed_point_scale(bound: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scale, 1/scale): exact powers of two with ``bound * scale < 2^61``, built on the device (no host sync)."""
    exponent = torch.frexp(bound.to(torch.float64)).exponent.to(torch.int64).clamp(-60, 180)  # bound < 2^exponent

    def power_of_two(k: Tensor) -> Tensor:  # 2^k from the float64 bit pattern
        return ((k + 1023) << 52).view(torch.float64).to(work)

    return power_of_two(61 - exponent), power_of_two(exponent - 61)


def _backward(grad: Tensor, images: Tensor, bounds: Tensor, edges: Tensor, patch_size: int, paper: bool,
              deterministic: bool, need_image: bool, need_geometry: bool) -> tuple[Tensor, Tensor, Tensor]:
    batch, chans, height, width = images.shape
    num_rows, num_tokens = bounds.shape[1] - 1, edges.shape[1] - 1
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    grad = grad.contiguous()
    empty = images.new_empty(0)
    if not (need_image or need_geometry):
        return empty, bounds.new_empty(0), edges.new_empty(0)
    acc_dtype = torch.int64 if deterministic else work
    gimg = torch.zeros((batch, chans, height, width) if need_image else (1,), dtype=acc_dtype, device=grad.device)
    gbb = torch.zeros((batch, num_rows + 1) if need_geometry else (1,), dtype=acc_dtype, device=grad.device)
    glo = torch.empty((batch, num_tokens) if need_geometry else (1,), dtype=work, device=grad.device)
    ghi = torch.empty_like(glo)
    if deterministic:
        gmax = grad.abs().amax().to(torch.float64)
        samples = num_tokens * patch_size * patch_size
        scale_img, inv_img = _fixed_point_scale(gmax * samples, work)
        vmax = images.abs().amax().to(torch.float64) if need_geometry else torch.ones_like(gmax)
        scale_geo, inv_geo = _fixed_point_scale(gmax * (2.0 * vmax) * (chans * samples), work)
        scales = torch.stack([scale_img, scale_geo])
    else:
        scales = torch.ones(2, dtype=work, device=grad.device)
    block_t, block_p, warps = _blocks(num_tokens, patch_size, backward=True)
    grid = (triton.cdiv(num_tokens, block_t), batch)
    with device_guard(images):
        _resample_bwd_kernel[grid](
            grad, images, bounds, edges, gimg, gbb, glo, ghi, scales, num_tokens, height, width, num_rows,
            C=chans, P=patch_size, BLOCK_T=block_t, BLOCK_P=block_p, PAPER=paper,
            GEOM_F64=bounds.dtype == torch.float64, WORK_F64=work == torch.float64,
            CLAMP_LO_INCL=_clamp_lo_incl(), NEED_IMG=need_image, NEED_GEOM=need_geometry, FIXED=deterministic,
            num_warps=warps, **_launch_opts())
    if need_image:
        if deterministic:
            # + 0 * max|grad|: NaN everywhere when the incoming gradient is not finite (the integers are garbage)
            gimg = gimg.to(work) * inv_img + gmax.to(work) * 0.0
        gimg = gimg.to(images.dtype)
    else:
        gimg = empty
    if need_geometry:
        if deterministic:
            gbb = gbb.to(work) * inv_geo + (gmax * vmax).to(work) * 0.0
        gbb = gbb.to(bounds.dtype)
        gte = edges.new_zeros(batch, num_tokens + 1)
        gte[:, :-1] += glo.to(edges.dtype)
        gte[:, 1:] += ghi.to(edges.dtype)
    else:
        gbb, gte = bounds.new_empty(0), edges.new_empty(0)
    return gimg, gbb, gte


# torch.library custom ops: opaque to torch.compile (no graph break), with registered autograd.
@torch.library.custom_op("dartmamba::resample_patches_triton", mutates_args=())
def _resample_op(images: Tensor, band_bounds_px: Tensor, token_edges_px: Tensor, patch_size: int, paper: bool,
                 deterministic: bool) -> Tensor:
    batch, chans = images.shape[:2]
    out = images.new_empty(batch, token_edges_px.shape[1] - 1, chans, patch_size, patch_size)
    return _forward_into(out, images, band_bounds_px, token_edges_px, patch_size, paper)


@_resample_op.register_fake
def _(images, band_bounds_px, token_edges_px, patch_size, paper, deterministic):
    batch, chans = images.shape[:2]
    return images.new_empty(batch, token_edges_px.shape[1] - 1, chans, patch_size, patch_size)


@torch.library.custom_op("dartmamba::resample_patches_triton_backward", mutates_args=())
def _resample_backward_op(grad: Tensor, images: Tensor, band_bounds_px: Tensor, token_edges_px: Tensor,
                          patch_size: int, paper: bool, deterministic: bool, need_image: bool,
                          need_geometry: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad, images, band_bounds_px, token_edges_px, patch_size, paper, deterministic, need_image,
                     need_geometry)


@_resample_backward_op.register_fake
def _(grad, images, band_bounds_px, token_edges_px, patch_size, paper, deterministic, need_image, need_geometry):
    gimg = torch.empty_like(images) if need_image else images.new_empty(0)
    gbb = torch.empty_like(band_bounds_px) if need_geometry else band_bounds_px.new_empty(0)
    gte = torch.empty_like(token_edges_px) if need_geometry else token_edges_px.new_empty(0)
    return gimg, gbb, gte


def _resample_macs(batch: int, num_tokens: int, chans: int, patch_size: int) -> int:
    return 4 * batch * num_tokens * chans * patch_size * patch_size      # 4 bilinear taps per output element


def _forward_flops(images, band_bounds_px, token_edges_px, patch_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * _resample_macs(images[0], token_edges_px[1] - 1, images[1], patch_size)


def _backward_flops(grad, images, band_bounds_px, token_edges_px, patch_size, paper, deterministic, need_image,
                    need_geometry, *args, out_shape=None, **kwargs) -> int:
    """Image gradient: 4 scatter multiply-adds per output element; geometry gradient: the 4 taps' differences
    weighted by the incoming gradient (another 4)."""
    per = _resample_macs(grad[0], grad[1], grad[2], patch_size)
    return 2 * per * (int(bool(need_image)) + int(bool(need_geometry)))


register_flops(torch.ops.dartmamba.resample_patches_triton, _forward_flops, part="resample")
register_flops(torch.ops.dartmamba.resample_patches_triton_backward, _backward_flops, part="resample")


def _setup_context(ctx, inputs, output):
    images, bounds, edges, patch_size, paper, deterministic = inputs
    ctx.save_for_backward(images, bounds, edges)
    ctx.patch_size, ctx.paper, ctx.deterministic = patch_size, paper, deterministic


def _autograd_backward(ctx, grad):
    images, bounds, edges = ctx.saved_tensors
    need_image = ctx.needs_input_grad[0]
    need_geometry = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    gimg, gbb, gte = _resample_backward_op(grad, images, bounds, edges, ctx.patch_size, ctx.paper,
                                           ctx.deterministic, need_image, need_geometry)
    return (gimg if need_image else None, gbb if ctx.needs_input_grad[1] else None,
            gte if ctx.needs_input_grad[2] else None, None, None, None)


_resample_op.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("dartmamba::resample_patches_triton_out", mutates_args=("out",))
def _resample_out_op(images: Tensor, band_bounds_px: Tensor, token_edges_px: Tensor, patch_size: int, paper: bool,
                     out: Tensor) -> None:
    _forward_into(out, images, band_bounds_px, token_edges_px, patch_size, paper)


@_resample_out_op.register_fake
def _(images, band_bounds_px, token_edges_px, patch_size, paper, out):
    return None


register_flops(torch.ops.dartmamba.resample_patches_triton_out, _forward_flops, part="resample")


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------
def supports(images: Tensor, geometry, patch_size: int) -> str | None:
    """None when the kernel takes these inputs, else why not (read from metadata only: dtype and sizes)."""
    if images.dtype not in _IMAGE_DTYPES:
        return f"images dtype must be one of {_IMAGE_DTYPES}, got {images.dtype}"
    if images.dim() == 4:
        chans, height, width = images.shape[1:]
        if chans * height * width >= 2**31 or geometry.num_tokens * chans * patch_size**2 >= 2**31:
            return "per-image sizes of 2^31 elements or more are not supported (32-bit offsets)"
    return None


def _check(images: Tensor, geometry, patch_size: int, sampling: str) -> None:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if images.dtype not in _IMAGE_DTYPES:
        raise TypeError(f"images dtype must be one of {_IMAGE_DTYPES}, got {images.dtype}")
    reason = supports(images, geometry, patch_size)
    if reason is not None:
        raise ValueError(reason)
    if geometry.batch_size != images.shape[0]:
        raise ValueError(f"geometry has batch {geometry.batch_size}, images {images.shape[0]}")
    if tuple(geometry.img_size) != tuple(images.shape[-2:]):
        raise ValueError(f"geometry is for images of size {tuple(geometry.img_size)}, got {tuple(images.shape[-2:])}")
    for name in ("band_bounds", "token_edges"):
        tensor = getattr(geometry, name)
        if tensor.device != images.device:
            raise ValueError(f"geometry.{name} is on {tensor.device}, images on {images.device}")
        if not tensor.is_floating_point():
            raise TypeError(f"geometry.{name} must be floating point, got {tensor.dtype}")
    check_device(images, "resample_triton", "dartmamba_kernels.resample", interpreted())


def resample_triton(images: Tensor, geometry, patch_size: int, sampling: str = "paper", deterministic: bool = False,
                    *, out: Tensor | None = None) -> Tensor:
    """Patches (B, N, C, p, p) of every DART token, fused in one Triton kernel.

    Same values as :func:`dartmamba.tokenizer.resample.resample_torch` (fp32 accumulation, fp64 for fp64 images;
    output in the image dtype) and the same gradients w.r.t. ``images``, ``geometry.band_bounds`` and
    ``geometry.token_edges``.

    Args:
        images: (B, C, H, W) float32 / bfloat16 / float16 / float64, CUDA (or CPU under ``TRITON_INTERPRET=1``).
        geometry: :class:`~dartmamba.tokenizer.DartGeometry` for images of size (H, W) (float32 or float64;
            half-precision geometry is computed in float32).
        patch_size: p.
        sampling: ``"paper"`` or ``"center"``.
        deterministic: make the backward bitwise reproducible (fixed-point atomics, see the module docstring).
        out: optional preallocated contiguous (B, N, C, p, p) tensor of the image dtype, fully overwritten. Like
            torch's ``out=`` variants it does not support autograd: gradients must not be required.

    Returns:
        (B, N, C, p, p) patches (``out`` itself when given).
    """
    _check(images, geometry, patch_size, sampling)
    paper = sampling == "paper"
    images = images.contiguous()
    bounds, edges = geometry.band_bounds_px, geometry.token_edges_px
    if bounds.dtype not in (torch.float32, torch.float64):
        bounds = bounds.float()
    if edges.dtype != bounds.dtype:
        edges = edges.to(bounds.dtype)
    bounds, edges = bounds.contiguous(), edges.contiguous()
    if out is None:
        return _resample_op(images, bounds, edges, patch_size, paper, deterministic)

    if torch.is_grad_enabled() and (images.requires_grad or bounds.requires_grad or edges.requires_grad):
        raise RuntimeError("resample_triton(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad")
    shape = (images.shape[0], geometry.num_tokens, images.shape[1], patch_size, patch_size)
    if tuple(out.shape) != shape or out.dtype != images.dtype or out.device != images.device:
        raise ValueError(f"out must be a {images.dtype} tensor of shape {shape} on {images.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    _resample_out_op(images, bounds, edges, patch_size, paper, out)
    return out
