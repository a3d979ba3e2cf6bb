"""Device code of the Triton causal conv1d (see :mod:`dartmamba.ops.conv1d.triton`). Imported at first use only.

A program owns a ``[BLOCK_D, BLOCK_L]`` tile (channels x steps) of one batch row; every tensor is addressed through
its strides, so channel-last inputs (a (B, L, D) projection viewed as (B, D, L)) are read in place.
"""
import triton
import triton.language as tl


@triton.jit
def _pre(x_base, w_ptr, offs_d, mask_d, pos, bias, sx_l, L, DIM, KW: tl.constexpr):
    """bias + sum_k w[:, k] x[:, pos - (KW - 1) + k] for a [D, L] tile of positions (zeros before 0)."""
    acc = tl.zeros([offs_d.shape[0], pos.shape[0]], dtype=tl.float32) + bias[:, None]
    for k in tl.static_range(KW):
        src = pos - (KW - 1) + k
        m = mask_d[:, None] & ((src >= 0) & (src < L))[None, :]
        xv = tl.load(x_base[:, None] + src[None, :] * sx_l, mask=m, other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + offs_d * KW + k, mask=mask_d, other=0.0)
        acc += wk[:, None] * xv
    return acc


@triton.jit
def _program_tile(b_ptr, DIM, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """The program's tile (grid: L tiles, channel blocks, batch): its L tile index, batch row, positions [L],
    channels [D] and their mask, and the bias of those channels (zeros without one)."""
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0)
    return pid_l, pid_b, offs_l, offs_d, mask_d, bias


@triton.jit
def conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, DIM, sx_b, sx_d, sx_l, so_b, so_d, so_l,
                    KW: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_l, pid_b, offs_l, offs_d, mask_d, bias = _program_tile(b_ptr, DIM, HAS_BIAS, BLOCK_D, BLOCK_L)
    acc = _pre(x_ptr + pid_b * sx_b + offs_d * sx_d, w_ptr, offs_d, mask_d, offs_l, bias, sx_l, L, DIM, KW)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = mask_d[:, None] & (offs_l < L)[None, :]
    tl.store(out_ptr + pid_b * so_b + offs_d[:, None] * so_d + offs_l[None, :] * so_l,
             acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, L, DIM,
                    sx_b, sx_d, sx_l, sg_b, sg_d, sg_l, sdx_b, sdx_d, sdx_l,
                    KW: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx[t] = sum_k w[k] g[t + KW - 1 - k] with g = dout * act'(pre) recomputed at the KW shifted positions;
    dweight and dbias partial sums per program, float32 (batch * n_tiles, dim, KW) and (batch * n_tiles, dim)."""
    pid_l, pid_b, offs_l, offs_d, mask_d, bias = _program_tile(b_ptr, DIM, HAS_BIAS, BLOCK_D, BLOCK_L)
    x_base = x_ptr + pid_b * sx_b + offs_d * sx_d
    g_base = dout_ptr + pid_b * sg_b + offs_d * sg_d
    dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    part = (pid_b * tl.num_programs(0) + pid_l) * DIM + offs_d
    for j in tl.static_range(KW):
        pos = offs_l + j                                             # g at t + j feeds dx[t] through w[KW-1-j]
        m = mask_d[:, None] & (pos < L)[None, :]
        g = tl.load(g_base[:, None] + pos[None, :] * sg_l, mask=m, other=0.0).to(tl.float32)
        if SILU:
            pre = _pre(x_base, w_ptr, offs_d, mask_d, pos, bias, sx_l, L, DIM, KW)
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        wk = tl.load(w_ptr + offs_d * KW + (KW - 1 - j), mask=mask_d, other=0.0)
        dx += wk[:, None] * g
        if j == 0:                                                   # this tile's own g: dweight, dbias
            for k in tl.static_range(KW):
                src = offs_l - (KW - 1) + k
                ms = mask_d[:, None] & ((src >= 0) & (src < L))[None, :]
                xv = tl.load(x_base[:, None] + src[None, :] * sx_l, mask=ms, other=0.0).to(tl.float32)
                tl.store(dw_ptr + part * KW + k, tl.sum(g * xv, axis=1), mask=mask_d)
            tl.store(db_ptr + part, tl.sum(g, axis=1), mask=mask_d)
    m = mask_d[:, None] & (offs_l < L)[None, :]
    tl.store(dx_ptr + pid_b * sdx_b + offs_d[:, None] * sdx_d + offs_l[None, :] * sdx_l,
             dx.to(dx_ptr.dtype.element_ty), mask=m)
