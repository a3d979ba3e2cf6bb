"""The ``"torch"`` backend: an exact chunked selective scan with a hand-written backward, in plain torch ops (any
device; the fallback where no kernel runs).

How it works (memory traffic, not arithmetic, decides on CPU): all tensors are moved to a time-major layout, and the
time axis is cut into chunks of ``T`` steps. Per chunk, the decays ``exp(dt*A)`` and the inputs ``dt*B*u`` are
materialised as (T, batch, dim, N) buffers that are reused from chunk to chunk (a few MB, cache sized), the
recurrence runs as one in-place ``addcmul_`` per step on contiguous (batch, dim, N) slices, and ``y`` comes from one
batched matmul per chunk. Only the state entering each chunk is saved for the backward, which walks the chunks in
reverse, recomputes the chunk's states from the saved one, runs the adjoint recurrence
``g_t = C_t * dy_t + exp(dt_{t+1} A) * g_{t+1}`` the same way, and reduces the gradients with batched matmuls.
Grouped B/C run group by group. The recurrence is evaluated exactly as written (no cumulative log-decays, no
division by decays), so it is as stable as the sequential reference for any length and any decay in [0, 1].

Custom ops ``dartmamba::selective_scan_torch_fwd`` / ``_bwd`` (fake implementations, autograd and FLOP formulas
registered here), so torch.compile and the FLOP counter see one op each.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import backends
from .._common import compute_dtype, register_flops
from .checks import check_args, empty, grads_like, scan_bwd_flops, scan_fwd_flops, with_state


_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default, so the backward matches the reference's autograd exactly


def _chunk_len(batch: int, dim: int, dstate: int) -> int:
    """Time steps per chunk: buffers of (T, batch, dim, N) stay around 4M elements (cache sized)."""
    per_step = max(1, batch * dim * dstate)
    return max(8, min(64, (1 << 22) // per_step))


def _to_time_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(batch, C, L) -> contiguous (L, batch, C) in ``dtype``, in one copy."""
    batch, channels, length = x.shape
    return x.new_empty((length, batch, channels), dtype=dtype).copy_(x.permute(2, 0, 1))


def _from_time_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Contiguous (L, batch, C) -> contiguous (batch, C, L) in ``dtype``, in one copy."""
    length, batch, channels = x.shape
    return x.new_empty((batch, channels, length), dtype=dtype).copy_(x.permute(1, 2, 0))


class _TimeMajor:
    """Inputs in the compute dtype and a contiguous time-major layout, shared by the forward and backward."""

    def __init__(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Optional[Tensor],
                 delta_softplus: bool, cdt: torch.dtype):
        pre = _to_time_major(delta, cdt)                                 # (L, batch, dim)
        if delta_bias is not None:
            pre.add_(delta_bias.to(cdt))
        self.pre = pre                                                   # delta + bias, before softplus
        self.dt = F.softplus(pre) if delta_softplus else pre             # (L, batch, dim)
        self.u = _to_time_major(u, cdt)                                  # (L, batch, dim)
        self.du = self.dt * self.u                                       # (L, batch, dim)
        self.A = A.to(cdt).contiguous()                                  # (dim, N)
        self.B = _to_time_major(B, cdt)                                  # (L, batch, N)
        self.C = _to_time_major(C, cdt)                                  # (L, batch, N)


def _recompute_states(tm: _TimeMajor, t0: int, t1: int, h0: Tensor, decay: Tensor, states: Tensor) -> None:
    """Fill ``decay`` = exp(dt*A) and ``states`` = h_t for t in [t0, t1), starting from ``h0`` = h_{t0-1}.

    decay, states: (t1 - t0, batch, dim, N) buffers, overwritten.
    """
    torch.mul(tm.dt[t0:t1, :, :, None], tm.A, out=decay)
    decay.exp_()
    torch.mul(tm.du[t0:t1, :, :, None], tm.B[t0:t1, :, None, :], out=states)
    states[0].addcmul_(decay[0], h0)
    for i in range(1, t1 - t0):
        states[i].addcmul_(decay[i], states[i - 1])


def _scan_torch_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                      chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ungrouped B, C. Returns out (batch, dim, L) in u.dtype, the states entering each chunk (n_chunks, batch,
    dim, N) and the last state (batch, dim, N), both in the compute dtype."""
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    n_chunks = -(-length // chunk)
    tm = _TimeMajor(u, delta, A, B, C, delta_bias, delta_softplus, cdt)
    chunk_states = u.new_zeros((n_chunks, batch, dim, dstate), dtype=cdt)
    y = u.new_empty((length, batch, dim), dtype=cdt)                    # time-major
    width = min(chunk, length)
    decay_buf = u.new_empty((width, batch, dim, dstate), dtype=cdt)
    state_buf = u.new_empty((width, batch, dim, dstate), dtype=cdt)
    for c in range(n_chunks):
        t0, t1 = c * chunk, min(length, (c + 1) * chunk)
        n = t1 - t0
        states = state_buf[:n]
        _recompute_states(tm, t0, t1, chunk_states[c], decay_buf[:n], states)
        torch.bmm(states.view(n * batch, dim, dstate), tm.C[t0:t1].view(n * batch, dstate, 1),
                  out=y[t0:t1].view(n * batch, dim, 1))
        if c + 1 < n_chunks:
            chunk_states[c + 1].copy_(states[n - 1])
        else:
            last_state = states[n - 1].clone()
    if n_chunks == 0:
        last_state = u.new_zeros((batch, dim, dstate), dtype=cdt)
    if D is not None:
        y.addcmul_(tm.u, D.to(cdt))
    if z is not None:
        y.mul_(F.silu(_to_time_major(z, cdt)))
    return _from_time_major(y, u.dtype), chunk_states, last_state


def _scan_torch_backward(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], chunk_states: Tensor,
                       dlast: Optional[Tensor], delta_softplus: bool, chunk: int) -> tuple[Tensor, ...]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype and shape; ``dlast``
    (batch, dim, N) is the gradient of the last state (None: zero). Ungrouped B, C.

    Absent optional inputs (D, z, delta_bias) get a 0-element placeholder.
    """
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    n_chunks = chunk_states.shape[0]
    tm = _TimeMajor(u, delta, A, B, C, delta_bias, delta_softplus, cdt)
    gy = _to_time_major(dout, cdt)                                       # dL/dout, time-major (L, batch, dim)
    if z is not None:
        z_tm = _to_time_major(z, cdt)
        g_pre = gy * F.silu(z_tm)                                        # dL/d(y + D*u)
        y_scan = torch.empty_like(gy)                                    # C.h, recomputed chunk by chunk
    else:
        g_pre = gy
    g_u = torch.empty_like(tm.u)                                         # through du = dt*u, then split
    g_dt = torch.empty_like(tm.dt)
    g_B = torch.empty_like(tm.B)
    g_C = torch.empty_like(tm.C)
    g_A = torch.zeros_like(tm.A)
    width = min(chunk, length)
    decay_buf = u.new_empty((width, batch, dim, dstate), dtype=cdt)
    state_buf = u.new_empty((width, batch, dim, dstate), dtype=cdt)
    adj_buf = u.new_empty((width, batch, dim, dstate), dtype=cdt)
    # exp(dt_{t1} A) * g_{t1} from the next chunk; into the last step: the last state's gradient
    carry = None if dlast is None else dlast.to(cdt)
    for c in range(n_chunks - 1, -1, -1):
        t0, t1 = c * chunk, min(length, (c + 1) * chunk)
        n, nb = t1 - t0, (t1 - t0) * batch
        decay, states, adj = decay_buf[:n], state_buf[:n], adj_buf[:n]
        h0 = chunk_states[c]
        _recompute_states(tm, t0, t1, h0, decay, states)
        if z is not None:
            torch.bmm(states.view(nb, dim, dstate), tm.C[t0:t1].view(nb, dstate, 1),
                      out=y_scan[t0:t1].view(nb, dim, 1))
        # adjoint recurrence g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
        torch.mul(g_pre[t0:t1, :, :, None], tm.C[t0:t1, :, None, :], out=adj)
        if carry is not None:
            adj[n - 1].add_(carry)
        for i in range(n - 2, -1, -1):
            adj[i].addcmul_(decay[i + 1], adj[i + 1])
        carry = decay[0] * adj[0]
        # dC_t = sum_d dy_t h_t ; d(du)_t = sum_n g_t B_t ; dB_t = sum_d g_t du_t
        torch.bmm(g_pre[t0:t1].view(nb, 1, dim), states.view(nb, dim, dstate), out=g_C[t0:t1].view(nb, 1, dstate))
        torch.bmm(adj.view(nb, dim, dstate), tm.B[t0:t1].view(nb, dstate, 1), out=g_u[t0:t1].view(nb, dim, 1))
        torch.bmm(tm.du[t0:t1].view(nb, 1, dim), adj.view(nb, dim, dstate), out=g_B[t0:t1].view(nb, 1, dstate))
        # dL/d(dt_t A) = g_t * exp(dt_t A) * h_{t-1}   (adj is reused in place)
        adj.mul_(decay)
        adj[0].mul_(h0)
        if n > 1:
            adj[1:].mul_(states[:-1])
        torch.mul(adj, tm.A, out=decay)
        torch.sum(decay, dim=-1, out=g_dt[t0:t1])
        torch.mul(adj, tm.dt[t0:t1, :, :, None], out=decay)
        g_A += decay.sum(dim=(0, 1))
    # du = dt*u: split its gradient
    g_dt.addcmul_(g_u, tm.u)
    g_u.mul_(tm.dt)
    if D is not None:
        Dc = D.to(cdt)
        g_u.addcmul_(g_pre, Dc)
        g_D = (g_pre * tm.u).sum(dim=(0, 1)).to(D.dtype)
    else:
        g_D = empty(u)
    if z is not None:
        y_pre = y_scan if D is None else y_scan.addcmul_(tm.u, Dc)
        g_z = _from_time_major(torch.ops.aten.silu_backward(y_pre.mul_(gy), z_tm), z.dtype)
    else:
        g_z = empty(u)
    if delta_softplus:
        g_dt = torch.ops.aten.softplus_backward(g_dt, tm.pre, 1.0, _SOFTPLUS_THRESHOLD)
    g_bias = g_dt.sum(dim=(0, 1)).to(delta_bias.dtype) if delta_bias is not None else empty(u)
    return (_from_time_major(g_u, u.dtype), _from_time_major(g_dt, delta.dtype), g_A.to(A.dtype),
            _from_time_major(g_B, B.dtype), _from_time_major(g_C, C.dtype), g_D, g_z, g_bias)


@torch.library.custom_op("dartmamba::selective_scan_torch_fwd", mutates_args=())
def _scan_torch_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                     chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out, chunk_states, last_state); ungrouped B, C."""
    return _scan_torch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)


@_scan_torch_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    n_chunks = (length + chunk - 1) // chunk
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            u.new_empty((n_chunks, batch, dim, A.shape[1]), dtype=cdt),
            u.new_empty((batch, dim, A.shape[1]), dtype=cdt))


@torch.library.custom_op("dartmamba::selective_scan_torch_bwd", mutates_args=())
def _scan_torch_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], chunk_states: Tensor, dlast: Optional[Tensor],
                     delta_softplus: bool, chunk: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _scan_torch_backward(dout, u, delta, A, B, C, D, z, delta_bias, chunk_states, dlast, delta_softplus, chunk)


register_flops(torch.ops.dartmamba.selective_scan_torch_fwd, scan_fwd_flops, part="scan")
register_flops(torch.ops.dartmamba.selective_scan_torch_bwd, scan_bwd_flops, part="scan")


@_scan_torch_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, chunk_states, dlast, delta_softplus, chunk):
    return grads_like(u, delta, A, B, C, D, z, delta_bias)


def _scan_torch_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    ctx.delta_softplus = delta_softplus
    ctx.chunk = chunk


def _scan_torch_autograd(ctx, grad_out, grad_states, grad_last):
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_torch_bwd_op(grad_out, u, delta, A, B, C, D, z, delta_bias,
                                                             chunk_states, grad_last, ctx.delta_softplus, ctx.chunk)
    has_D, has_z, has_bias = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None, None)


_scan_torch_fwd_op.register_autograd(_scan_torch_autograd, setup_context=_scan_torch_setup_context)


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False, return_last_state: bool = False):
    """Exact chunked selective scan with a hand-written backward (the ``"torch"`` backend; any device).

    Same arguments, shapes and result as :func:`selective_scan_reference`: u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, N, L) or (batch, G, N, L); D, delta_bias (dim,). Returns (batch, dim, L) in ``u.dtype`` (and the
    last state (batch, dim, N) with ``return_last_state``); math in float32 (float64 when any input is float64).
    Gradients flow to every tensor argument, and from the last state. Memory saved for the backward: the inputs and
    one (batch, dim, N) state per chunk of time steps. Grouped B, C run one group at a time.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    if B.dim() == 4:
        per_group = u.shape[1] // B.shape[1]
        parts = [selective_scan_torch(*_group_args(g, per_group, u, delta, A, B, C, D, z, delta_bias),
                                    delta_softplus=delta_softplus, return_last_state=True)
                 for g in range(B.shape[1])]
        out, last = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
        return with_state(out, last, return_last_state)
    chunk = _chunk_len(u.shape[0], u.shape[1], A.shape[1])
    out, _, last = _scan_torch_fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk)
    return with_state(out, last, return_last_state)


def _group_args(g: int, per_group: int, u, delta, A, B, C, D, z, delta_bias) -> list:
    """The arguments of group ``g`` alone: its channels, and its (batch, N, L) slice of B and C."""
    sl = slice(g * per_group, (g + 1) * per_group)
    return [u[:, sl], delta[:, sl], A[sl], B[:, g], C[:, g], None if D is None else D[sl],
            None if z is None else z[:, sl], None if delta_bias is None else delta_bias[sl]]


selective_scan_torch = backends.register("scan", "torch", selective_scan_torch, devices=backends.ANY_DEVICE)
