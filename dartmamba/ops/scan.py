"""Selective scan (Mamba-1 SSM recurrence), with one dispatch point over four backends.

For every batch ``b``, channel ``d`` and state index ``n`` the scan runs the linear recurrence::

    dt_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t  = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B[b, g, n, t] * u_t,      h_{-1} = 0
    y_t  = sum_n C[b, g, n, t] * h_t[n]  +  D[d] * u_t
    out  = y * silu(z)                               (gate optional)

Shapes follow mamba-ssm's ``selective_scan_fn`` (input-dependent B and C, ungrouped or grouped): u, delta, z:
(batch, dim, L); A: (dim, N), real; B, C: (batch, N, L), or (batch, G, N, L) with channel ``d`` in group
``g = d // (dim / G)`` (the one-pass bidirectional mixer stacks both directions as G = 2); D, delta_bias: (dim,).
``return_last_state=True`` also returns the state after the last step, h_{L-1}: (batch, dim, N), as mamba-ssm does.
``reverse=True`` runs the recurrence right to left (h_L = 0, t = L - 1 first): the scan of every sequence input
flipped along L, with the output flipped back (the last state is then the one after t = 0), which is what the
backward branch of a bidirectional mixer needs. The C++ kernel does this in place; the other backends flip.
``delta_proj`` (dim, R) makes ``delta`` a low-rank factor (batch, R, L) of the step sizes ``delta_proj @ delta``
(Mamba's ``dt_proj``): the C++ kernel forms them step by step where no gradient is needed; the other backends, and
every call that needs a gradient, multiply them out first.

Backends (registry op ``"scan"``, see :mod:`dartmamba.backends`; env ``DARTMAMBA_SCAN_BACKEND``), in preference
order:

- ``"cuda"``: mamba-ssm's fused CUDA kernel (``selective_scan_cuda.fwd/bwd``), wrapped as the custom op
  ``dartmamba::selective_scan_cuda_fwd`` / ``_bwd`` so ``torch.compile`` traces it without a graph break.
  CUDA tensors only; imported lazily, never at module import. (The custom ops are registered for every device so
  their plumbing can be tested on CPU against a stand-in extension; mamba-ssm itself only takes CUDA tensors.)
  As in mamba-ssm, the returned last state carries no gradient.
- ``"cpp"``: :func:`selective_scan_cpp`, a C++ kernel for CPU tensors (``csrc/selective_scan_cpu.cpp``, custom
  ops ``dartmamba::selective_scan_cpp_fwd`` / ``_bwd``), built with torch's extension tooling at first use and
  cached (see :mod:`dartmamba.ops._jit`). Where it cannot be built (no compiler, no ninja) CPU tensors fall back to
  ``"cpu"`` with one RuntimeWarning.
- ``"cpu"``: :func:`selective_scan_cpu`, an exact chunked scan with a hand-written backward (custom ops
  ``dartmamba::selective_scan_cpu_fwd`` / ``_bwd``). Written with plain torch ops, so it runs on any device; it
  is the fallback on CUDA when mamba-ssm is missing, and on CPU when the C++ kernel cannot be built.
- ``"reference"``: :func:`selective_scan_reference`, a sequential loop under plain autograd.

How the C++ kernel works: the vector lanes run over adjacent channels of one group, so B_t and C_t are broadcast
scalars and the recurrence, the output and the adjoint are vertical vector arithmetic with the state in registers;
the decays exp(dt A) are inline 2^(dt A log2 e) (in float with AVX-512: a 16-entry table in a register and a degree-3
polynomial, within 1.06 ulp), the backward keeps each channel block's decays and states and runs the adjoint
recurrence backwards; ``reverse`` reverses the rows in cache. See the source's header.

How the chunked torch scan works (memory traffic, not arithmetic, decides on CPU): all tensors are moved to a
time-major layout, and the time axis is cut into chunks of ``T`` steps. Per chunk, the decays ``exp(dt*A)`` and the
inputs ``dt*B*u`` are materialised as (T, batch, dim, N) buffers that are reused from chunk to chunk (a few MB,
cache sized), the recurrence runs as one in-place ``addcmul_`` per step on contiguous (batch, dim, N) slices, and
``y`` comes from one batched matmul per chunk. Only the state entering each chunk is saved for the backward, which
walks the chunks in reverse, recomputes the chunk's states from the saved one, runs the adjoint recurrence
``g_t = C_t * dy_t + exp(dt_{t+1} A) * g_{t+1}`` the same way, and reduces the gradients with batched matmuls.
Grouped B/C run group by group.

Both fast scans evaluate the recurrence exactly as written (no cumulative log-decays, no division by decays), so
they are as stable as the sequential reference for any sequence length and any decay in [0, 1].
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ._common import compute_dtype, plain_eager, register_flops
from ._jit import cpu_kernels_unavailable

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_cpu",
    "selective_scan_cpp",
    "selective_scan_mamba_cuda",
    "scan_forward_macs",
    "scan_backward_macs",
]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks and dtypes
# ----------------------------------------------------------------------------------------------------------------
def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_args(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                z: Optional[Tensor], delta_bias: Optional[Tensor], delta_proj: Optional[Tensor] = None) -> None:
    """Raise ValueError naming the first argument whose shape or dtype does not fit."""
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "delta_proj": delta_proj}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise ValueError(f"selective_scan: {name} must be real; complex A/B/C are not supported")
        if not t.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, dim, L), got {_shape(u)}")
    batch, dim, length = u.shape
    if delta_proj is not None:
        if delta_proj.dim() != 2 or delta_proj.shape[0] != dim:
            raise ValueError(f"selective_scan: delta_proj must have shape (dim, R) with dim = {dim}, "
                             f"got {_shape(delta_proj)}")
        rank = delta_proj.shape[1]
        if tuple(delta.shape) != (batch, rank, length):
            raise ValueError(f"selective_scan: with delta_proj of shape {_shape(delta_proj)}, delta must be its "
                             f"(batch, R, L) = {(batch, rank, length)} factor, got {_shape(delta)}")
    elif delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape (batch, dim, L) = {_shape(u)}, "
                         f"got {_shape(delta)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must have shape (dim, N) with dim = {dim}, got {_shape(A)}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        grouped = t.dim() == 4 and t.shape[1] >= 1 and dim % t.shape[1] == 0
        if not (tuple(t.shape) == (batch, dstate, length) or
                (grouped and tuple(t.shape) == (batch, t.shape[1], dstate, length))):
            raise ValueError(f"selective_scan: {name} must have shape (batch, N, L) = {(batch, dstate, length)} or "
                             f"(batch, G, N, L) = {(batch, 'G', dstate, length)} with G dividing dim = {dim} "
                             f"(input-dependent), got {_shape(t)}")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ValueError(f"selective_scan: B and C must have the same layout (both (batch, N, L) or both "
                         f"(batch, G, N, L) with one G), got B {_shape(B)} and C {_shape(C)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must have shape (dim,) = {(dim,)}, got {_shape(t)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape (batch, dim, L) = {_shape(u)}, got {_shape(z)}")


def scan_forward_macs(batch: int, dim: int, length: int, dstate: int, has_D: bool = True, has_z: bool = True) -> int:
    """Multiply-adds of one selective-scan forward (u, delta, z: (batch, dim, L); A: (dim, N)).

    Per (batch, dim, step, state): ``dt*A``, ``(dt*u)*B``, ``exp(dt*A)*h + drive``, ``C*h`` (accumulated) = 4.
    Per (batch, dim, step): ``dt*u``, and ``+ D*u`` and ``* silu(z)`` when present. exp/softplus/silu: not counted.
    """
    return batch * dim * length * (4 * dstate + 1 + int(has_D) + int(has_z))


def scan_backward_macs(batch: int, dim: int, length: int, dstate: int, has_D: bool = True,
                       has_z: bool = True) -> int:
    """Multiply-adds of an exact selective-scan backward (the state recomputed from chunk checkpoints).

    Per (batch, dim, step, state): recompute ``dt*A``, ``(dt*u)*B`` and the state (3), the output ``C*h`` again
    when gated (1), the adjoint ``C*g`` and ``exp(dt*A)*g_next`` (2), ``dC``, ``d(dt*u)``, ``dB`` (3) and the
    decay chain ``g*exp(dt*A)*h_prev`` times ``A`` and times ``dt`` (4). Per (batch, dim, step): the split of
    ``d(dt*u)`` (2), ``dD`` and ``du`` from the skip (2), the gate's gradient (2).
    """
    per_state = 12 + int(has_z)
    return batch * dim * length * (dstate * per_state + 2 + 2 * int(has_D) + 2 * int(has_z))


def _present(shape) -> bool:
    return shape is not None and all(s > 0 for s in shape)


def _scan_fwd_flops(u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    """FLOP formula of the scan's forward custom ops (input shapes in; 2 FLOPs per multiply-add)."""
    batch, dim, length = u
    return 2 * scan_forward_macs(batch, dim, length, A[1], _present(D), _present(z))


def _scan_bwd_flops(dout, u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    """FLOP formula of the scan's backward custom ops."""
    batch, dim, length = u
    return 2 * scan_backward_macs(batch, dim, length, A[1], _present(D), _present(z))


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------
def _grouped(t: Tensor) -> Tensor:
    """B or C as (batch, G, N, L) (a view)."""
    return t if t.dim() == 4 else t.unsqueeze(1)


def _with_state(out: Tensor, last_state: Tensor, return_last_state: bool):
    return (out, last_state) if return_last_state else out


def _flipping_for_reverse(fn):
    """A backend without its own right-to-left mode: ``reverse=True`` flips u, delta, B, C and z along L, scans,
    and flips the output back."""
    @functools.wraps(fn)
    def run(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
            z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
            return_last_state: bool = False, *, reverse: bool = False):
        if not reverse:
            return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        u, delta, B, C, z = (None if t is None else t.flip(-1) for t in (u, delta, B, C, z))
        result = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        if return_last_state:
            return result[0].flip(-1), result[1]
        return result.flip(-1)
    return run


def _full_delta(delta_proj: Tensor, delta: Tensor) -> Tensor:
    """delta_proj (dim, R) @ delta (batch, R, L) -> (batch, dim, L), laid out channel-last (a GEMM over the factor's
    rows, which are contiguous when it is a slice of a (batch * L, R + ...) projection)."""
    dtype = torch.promote_types(delta_proj.dtype, delta.dtype)
    return torch.matmul(delta.transpose(1, 2).to(dtype), delta_proj.t().to(dtype)).transpose(1, 2)


def _expanding_low_rank_delta(fn):
    """A backend that takes delta in full: with ``delta_proj`` (dim, R), the (batch, R, L) ``delta`` becomes
    ``delta_proj @ delta`` first (under autograd)."""
    @functools.wraps(fn)
    def run(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
            z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
            return_last_state: bool = False, *, reverse: bool = False, delta_proj: Optional[Tensor] = None):
        if delta_proj is not None:
            _check_args(u, delta, A, B, C, D, z, delta_bias, delta_proj)
            delta = _full_delta(delta_proj, delta)
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse=reverse)
    return run


@_expanding_low_rank_delta
@_flipping_for_reverse
def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                             z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = False, return_last_state: bool = False):
    """Sequential selective scan under plain autograd: the definition the fast backends are tested against.

    Args:
        u: (batch, dim, L) input.
        delta: (batch, dim, L) step sizes (before ``delta_bias`` and softplus).
        A: (dim, N) real state matrix (diagonal per channel), usually negative.
        B: (batch, N, L) input projection, or (batch, G, N, L): channel d uses group d // (dim / G).
        C: output projection, laid out as B.
        D: optional (dim,) skip connection.
        z: optional (batch, dim, L) gate; the output is multiplied by ``silu(z)``.
        delta_bias: optional (dim,) added to ``delta``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last step.

    Returns:
        out (batch, dim, L) in ``u.dtype``; with ``return_last_state``, (out, last_state (batch, dim, N)) in the
        compute dtype. Internal math is float32 (float64 when any input is float64).
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    batch, dim, length = u.shape
    groups, dstate = _grouped(B).shape[1], A.shape[1]
    per_group = dim // groups
    uf = u.to(cdt)
    # channels as (group, channel in group): B_t and C_t broadcast over a group's channels
    dtg, ug = dt.view(batch, groups, per_group, length), uf.view(batch, groups, per_group, length)
    Af = A.to(cdt).view(groups, per_group, dstate)
    Bf, Cf = _grouped(B).to(cdt), _grouped(C).to(cdt)                          # (batch, G, N, L)
    h = uf.new_zeros(batch, groups, per_group, dstate)
    ys = []
    for t in range(length):
        decay = torch.exp(dtg[..., t, None] * Af)                                 # (batch, G, dim/G, N)
        drive = (dtg[..., t] * ug[..., t])[..., None] * Bf[:, :, None, :, t]      # (batch, G, dim/G, N)
        h = decay * h + drive
        ys.append((h * Cf[:, :, None, :, t]).sum(-1))                            # (batch, G, dim/G)
    y = torch.stack(ys, dim=-1).view(batch, dim, length) if ys else uf.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + uf * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return _with_state(y.to(u.dtype), h.reshape(batch, dim, dstate), return_last_state)


# ----------------------------------------------------------------------------------------------------------------
# Fast exact scan (any device; the CPU backend)
# ----------------------------------------------------------------------------------------------------------------
_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default, so the backward matches the reference's autograd exactly


def _chunk_len(batch: int, dim: int, dstate: int) -> int:
    """Time steps per chunk: buffers of (T, batch, dim, N) stay around 4M elements (measured on 2 cores)."""
    per_step = max(1, batch * dim * dstate)
    return max(8, min(64, (1 << 22) // per_step))


def _empty(t: Tensor) -> Tensor:
    """A 0-element placeholder for an absent optional output (custom-op outputs cannot be None)."""
    return t.new_empty(0)


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


def _scan_cpu_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
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


def _scan_cpu_backward(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
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
        g_D = _empty(u)
    if z is not None:
        y_pre = y_scan if D is None else y_scan.addcmul_(tm.u, Dc)
        g_z = _from_time_major(torch.ops.aten.silu_backward(y_pre.mul_(gy), z_tm), z.dtype)
    else:
        g_z = _empty(u)
    if delta_softplus:
        g_dt = torch.ops.aten.softplus_backward(g_dt, tm.pre, 1.0, _SOFTPLUS_THRESHOLD)
    g_bias = g_dt.sum(dim=(0, 1)).to(delta_bias.dtype) if delta_bias is not None else _empty(u)
    return (_from_time_major(g_u, u.dtype), _from_time_major(g_dt, delta.dtype), g_A.to(A.dtype),
            _from_time_major(g_B, B.dtype), _from_time_major(g_C, C.dtype), g_D, g_z, g_bias)


@torch.library.custom_op("dartmamba::selective_scan_cpu_fwd", mutates_args=())
def _scan_cpu_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                     chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out, chunk_states, last_state); ungrouped B, C."""
    return _scan_cpu_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)


@_scan_cpu_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    n_chunks = (length + chunk - 1) // chunk
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            u.new_empty((n_chunks, batch, dim, A.shape[1]), dtype=cdt),
            u.new_empty((batch, dim, A.shape[1]), dtype=cdt))


@torch.library.custom_op("dartmamba::selective_scan_cpu_bwd", mutates_args=())
def _scan_cpu_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], chunk_states: Tensor, dlast: Optional[Tensor],
                     delta_softplus: bool, chunk: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _scan_cpu_backward(dout, u, delta, A, B, C, D, z, delta_bias, chunk_states, dlast, delta_softplus, chunk)


register_flops(torch.ops.dartmamba.selective_scan_cpu_fwd, _scan_fwd_flops, part="scan")
register_flops(torch.ops.dartmamba.selective_scan_cpu_bwd, _scan_bwd_flops, part="scan")


def _grad_like(t: Optional[Tensor], ref: Tensor) -> Tensor:
    if t is None:
        return _empty(ref)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _grads_like(u, delta, A, B, C, D, z, delta_bias) -> tuple[Tensor, ...]:
    """The backward ops' fake outputs: a contiguous gradient per input, 0-element for absent ones."""
    return tuple(_grad_like(t, u) for t in (u, delta, A, B, C, D, z, delta_bias))


def _grads_as_inputs(grads, u, delta, A, B, C, D, z, delta_bias) -> tuple[Tensor, ...]:
    """A kernel's (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in each input's dtype and B, C's layout (the kernels
    take them grouped); absent inputs get a 0-element placeholder."""
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.view(B.shape).to(B.dtype),
            dC.view(C.shape).to(C.dtype), dD.to(D.dtype) if D is not None else _empty(u),
            dz.to(z.dtype) if z is not None else _empty(u),
            dbias.to(delta_bias.dtype) if delta_bias is not None else _empty(u))


@_scan_cpu_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, chunk_states, dlast, delta_softplus, chunk):
    return _grads_like(u, delta, A, B, C, D, z, delta_bias)


def _scan_cpu_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    ctx.delta_softplus = delta_softplus
    ctx.chunk = chunk


def _scan_cpu_autograd(ctx, grad_out, grad_states, grad_last):
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_cpu_bwd_op(grad_out, u, delta, A, B, C, D, z, delta_bias,
                                                             chunk_states, grad_last, ctx.delta_softplus, ctx.chunk)
    has_D, has_z, has_bias = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None, None)


_scan_cpu_fwd_op.register_autograd(_scan_cpu_autograd, setup_context=_scan_cpu_setup_context)


@_expanding_low_rank_delta
@_flipping_for_reverse
def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False, return_last_state: bool = False):
    """Exact chunked selective scan with a hand-written backward (the ``"cpu"`` backend; runs on any device).

    Same arguments, shapes and result as :func:`selective_scan_reference`: u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, N, L) or (batch, G, N, L); D, delta_bias (dim,). Returns (batch, dim, L) in ``u.dtype`` (and the
    last state (batch, dim, N) with ``return_last_state``); math in float32 (float64 when any input is float64).
    Gradients flow to every tensor argument, and from the last state. Memory saved for the backward: the inputs and
    one (batch, dim, N) state per chunk of time steps. Grouped B, C run one group at a time.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    if B.dim() == 4:
        per_group = u.shape[1] // B.shape[1]
        parts = [selective_scan_cpu(*_group_args(g, per_group, u, delta, A, B, C, D, z, delta_bias),
                                    delta_softplus=delta_softplus, return_last_state=True)
                 for g in range(B.shape[1])]
        out, last = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
        return _with_state(out, last, return_last_state)
    chunk = _chunk_len(u.shape[0], u.shape[1], A.shape[1])
    out, _, last = _scan_cpu_fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk)
    return _with_state(out, last, return_last_state)


def _group_args(g: int, per_group: int, u, delta, A, B, C, D, z, delta_bias) -> list:
    """The arguments of group ``g`` alone: its channels, and its (batch, N, L) slice of B and C."""
    sl = slice(g * per_group, (g + 1) * per_group)
    return [u[:, sl], delta[:, sl], A[sl], B[:, g], C[:, g], None if D is None else D[sl],
            None if z is None else z[:, sl], None if delta_bias is None else delta_bias[sl]]


# ----------------------------------------------------------------------------------------------------------------
# C++ kernel for CPU tensors (built at first use)
# ----------------------------------------------------------------------------------------------------------------
_LOADED: dict = {}              # mamba-ssm's extension, imported on first use
_CPP_MAX_DSTATE = 256          # the kernel keeps the state in a fixed-size register array
_CPP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cpp_extension():
    """The C++ kernels' op namespace (built on first use, then loaded from torch's extension cache)."""
    from ._jit import cpu_kernels

    return cpu_kernels()


# the availability check shared by every "cpp" backend (the kernels are one library)
_cpp_unavailable = cpu_kernels_unavailable


def _cpp_unsupported(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False, *, reverse=False, delta_proj=None) -> Optional[str]:
    """Why the C++ kernel cannot take these inputs (None when it can)."""
    if A.shape[1] > _CPP_MAX_DSTATE:
        return f"its kernel supports N <= {_CPP_MAX_DSTATE}, got A of shape {_shape(A)}"
    bad = [t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj)
           if t is not None and t.dtype not in _CPP_DTYPES]
    if bad:
        return f"its kernel computes float16/bfloat16/float32/float64 inputs, got {bad[0]}"
    return None


def _cpp_inputs(u, delta, A, B, C, D, z, delta_bias, delta_proj=None) -> list[Tensor]:
    """All in the compute dtype (``delta_proj`` counts too); B, C grouped (views); A, D, delta_bias contiguous;
    absent ones 0-element."""
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, delta_proj)

    def cast(t):
        return u.new_empty(0, dtype=cdt) if t is None else t if t.dtype == cdt else t.to(cdt)

    return [cast(u), cast(delta), cast(A).contiguous(), _grouped(cast(B)), _grouped(cast(C)), cast(D).contiguous(),
            cast(z), cast(delta_bias).contiguous()]


@torch.library.custom_op("dartmamba::selective_scan_cpp_fwd", mutates_args=())
def _scan_cpp_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                     reverse: bool) -> tuple[Tensor, Tensor]:
    """-> (out (batch, dim, L) in u.dtype, last_state (batch, dim, N) in the compute dtype)."""
    return _cpp_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def _cpp_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool,
                 delta_proj: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The kernel's forward: (out in u.dtype, last state in the compute dtype). With ``delta_proj`` (dim, R),
    ``delta`` is the (batch, R, L) factor and the kernel forms ``delta_proj @ delta`` step by step (no gradient)."""
    args = _cpp_inputs(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    proj = args[0].new_empty(0) if delta_proj is None else delta_proj.to(args[0].dtype).contiguous()
    out, last = _cpp_extension().scan_fwd(*args, delta_softplus, reverse, proj)
    return out.to(u.dtype), last


def _cpp_backward(dout, u, delta, A, B, C, D, z, delta_bias, dlast, delta_softplus: bool,
                  reverse: bool) -> tuple[Tensor, ...]:
    """The kernel's backward: a gradient per input in its dtype and layout (0-element for absent inputs); ``dlast``
    None when the last state gets no gradient."""
    args = _cpp_inputs(u, delta, A, B, C, D, z, delta_bias)
    cdt = args[0].dtype
    dlast = u.new_empty(0, dtype=cdt) if dlast is None else dlast.to(cdt).contiguous()
    grads = _cpp_extension().scan_bwd(dout.to(cdt), *args, dlast, delta_softplus, reverse)
    return _grads_as_inputs(grads, u, delta, A, B, C, D, z, delta_bias)


@_scan_cpp_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    return (torch.empty_like(u),                      # laid out as u, as the kernel allocates it
            u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=cdt))


@torch.library.custom_op("dartmamba::selective_scan_cpp_bwd", mutates_args=())
def _scan_cpp_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], delta_bias: Optional[Tensor], dlast: Optional[Tensor], delta_softplus: bool,
                     reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _cpp_backward(dout, u, delta, A, B, C, D, z, delta_bias, dlast, delta_softplus, reverse)


@_scan_cpp_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, dlast, delta_softplus, reverse):
    return _grads_like(u, delta, A, B, C, D, z, delta_bias)


register_flops(torch.ops.dartmamba.selective_scan_cpp_fwd, _scan_fwd_flops, part="scan")
register_flops(torch.ops.dartmamba.selective_scan_cpp_bwd, _scan_bwd_flops, part="scan")


def _scan_cpp_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    ctx.delta_softplus, ctx.reverse = delta_softplus, reverse


def _scan_cpp_grads(ctx, grad_out, grad_last, backward) -> tuple:
    """The autograd gradients of both paths below from ``backward`` (the custom op or the direct kernel call):
    None for absent inputs and for ``delta_softplus`` and ``reverse``."""
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = backward(grad_out, u, delta, A, B, C, D, z, delta_bias, grad_last,
                                                     ctx.delta_softplus, ctx.reverse)
    has_D, has_z, has_bias = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None, None)


def _scan_cpp_autograd(ctx, grad_out, grad_last):
    return _scan_cpp_grads(ctx, grad_out, grad_last, _scan_cpp_bwd_op)


_scan_cpp_fwd_op.register_autograd(_scan_cpp_autograd, setup_context=_scan_cpp_setup_context)


class _ScanCppEager(torch.autograd.Function):
    """The same kernels as the custom ops above, called directly: what eager calls take. The custom ops' Python
    dispatch costs ~0.25 ms per forward+backward pair plus ~0.3-0.6 ms at Vim-Ti's shape (argument defaults, the
    zero gradient autograd materialises for an unused last state), about 10 % of the kernels' time there. Traced
    and transformed calls (torch.compile, torch.export, fake tensors, the FLOP counter, any dispatch mode) take the
    custom ops; both paths give the same bits (tested)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):   # ctx-style: no signature bind
        output = _cpp_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
        _scan_cpp_setup_context(ctx, (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse), output)
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_last):
        if grad_out is None:
            grad_out = torch.zeros_like(ctx.saved_tensors[0])
        return _scan_cpp_grads(ctx, grad_out, grad_last, _cpp_backward)


def selective_scan_cpp(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False, *, reverse: bool = False,
                       delta_proj: Optional[Tensor] = None):
    """The C++ CPU kernel (the ``"cpp"`` backend), as a custom op torch.compile can trace; ``reverse`` (right to
    left) without flipping copies; a low-rank ``delta`` (``delta_proj``, see :func:`selective_scan`) formed step by
    step in the kernel where no gradient is needed.

    Same arguments, shapes and result as :func:`selective_scan_reference` (grouped B, C included); any strides (the
    output is laid out as ``u``, e.g. channel-last for a channel-last ``u``). CPU tensors; math in float32 (float64 when any input is float64); gradients flow to every tensor argument and
    from the last state. Nothing is saved for the backward but the inputs (the backward recomputes the states).
    Built at first use (a C++ compiler and ninja are needed; see :mod:`dartmamba.ops._jit`); raises
    :class:`~dartmamba.backends.BackendUnavailableError` when the build fails.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    reason = _cpp_unavailable() or _cpp_unsupported(u, delta, A, B, C, D, z, delta_bias, delta_proj=delta_proj)
    if reason is not None:
        raise backends.BackendUnavailableError(f"scan backend 'cpp' is not available: {reason}")
    return _scan_cpp_checked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse=reverse,
                             delta_proj=delta_proj)


def _scan_cpp_checked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, reverse=False, delta_proj=None):
    """:func:`selective_scan_cpp` after its checks (what the dispatcher calls: it has checked the arguments and that
    the kernel can take them). Plain eager calls that need no gradient call the kernel directly (a low-rank delta
    included), plain eager calls that do take the direct autograd.Function, everything else the custom op; all
    three give the same bits (the last two get a low-rank delta multiplied out first)."""
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*tensors, delta_proj))
    if plain_eager(*tensors, delta_proj) and not needs_grad:
        out, last = _cpp_forward(*tensors, bool(delta_softplus), bool(reverse), delta_proj)
        return _with_state(out, last, return_last_state)
    if delta_proj is not None:
        delta = _full_delta(delta_proj, delta)
        tensors = (u, delta, A, B, C, D, z, delta_bias)
    if not plain_eager(*tensors):
        out, last = _scan_cpp_fwd_op(*tensors, bool(delta_softplus), bool(reverse))
    else:
        out, last = _ScanCppEager.apply(*tensors, bool(delta_softplus), bool(reverse))
    return _with_state(out, last, return_last_state)


# ----------------------------------------------------------------------------------------------------------------
# mamba-ssm CUDA kernel
# ----------------------------------------------------------------------------------------------------------------
# mamba-ssm's kernel keeps one checkpoint of the state every 2048 steps: x is (batch, dim, n_chunks, 2N) float32.
_MAMBA_CHUNK = 2048


def _mamba_extension():
    """mamba-ssm's compiled extension module ``selective_scan_cuda`` (imported on first use)."""
    if "ext" not in _LOADED:
        import selective_scan_cuda  # noqa: PLC0415  (only importable where mamba-ssm is built)
        _LOADED["ext"] = selective_scan_cuda
    return _LOADED["ext"]


_mamba_unavailable = backends.cuda_extension_check(
    _mamba_extension, "mamba-ssm's CUDA extension selective_scan_cuda", "mamba-ssm")


def _call_mamba(fn, *args):
    """Call a pybind entry point; newer mamba-ssm builds take one extra optional trailing argument."""
    try:
        return fn(*args)
    except TypeError as exc:
        if "incompatible function arguments" not in str(exc):
            raise
        return fn(*args, None)


def _mamba_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Cast and lay out the inputs as the kernel requires: delta, B, C, z in u's dtype (half, bfloat16 or float32),
    A, D, delta_bias in float32, unit stride along L; B and C as (batch, G, N, L) (G = 1 when ungrouped)."""
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        u = u.float()
    itype = u.dtype

    def lay(t, dtype):
        t = t.to(dtype)
        return t if t.stride(-1) == 1 else t.contiguous()

    return (lay(u, itype), lay(delta, itype), A.float().contiguous(), _grouped(lay(B, itype)),
            _grouped(lay(C, itype)), None if D is None else D.float().contiguous(),
            None if z is None else lay(z, itype), None if delta_bias is None else delta_bias.float().contiguous())


@torch.library.custom_op("dartmamba::selective_scan_cuda_fwd", mutates_args=())
def _scan_cuda_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor],
                      delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, x, out_before_gate): x is the kernel's state checkpoints (batch, dim, n_chunks, 2N) fp32;
    out_before_gate is the ungated output when z is given (the backward needs it), else a 0-element tensor."""
    ext = _mamba_extension()
    args = _mamba_inputs(u, delta, A, B, C, D, z, delta_bias)
    out, x, *rest = _call_mamba(ext.fwd, *args, delta_softplus)
    if z is not None:
        return rest[0].to(u.dtype), x, out
    return out.to(u.dtype), x, _empty(u)


@_scan_cuda_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    itype = u.dtype if u.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    n_chunks = (length + _MAMBA_CHUNK - 1) // _MAMBA_CHUNK
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    x = u.new_empty((batch, dim, n_chunks, 2 * A.shape[1]), dtype=torch.float32)
    pre = u.new_empty((batch, dim, length), dtype=itype) if z is not None else _empty(u)
    return out, x, pre


@torch.library.custom_op("dartmamba::selective_scan_cuda_bwd", mutates_args=())
def _scan_cuda_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor], x: Tensor, out_before_gate: Tensor,
                      delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ext = _mamba_extension()
    uk, dk, Ak, Bk, Ck, Dk, zk, bk = _mamba_inputs(u, delta, A, B, C, D, z, delta_bias)
    dout = dout.to(uk.dtype)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    du, ddelta, dA, dB, dC, dD, dbias, *rest = _call_mamba(
        ext.bwd, uk, dk, Ak, Bk, Ck, Dk, zk, bk, dout, x, out_before_gate if z is not None else None, None,
        delta_softplus, False)
    dz = rest[0] if z is not None else None
    return _grads_as_inputs((du, ddelta, dA, dB, dC, dD, dz, dbias), u, delta, A, B, C, D, z, delta_bias)


@_scan_cuda_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, x, out_before_gate, delta_softplus):
    return _grads_like(u, delta, A, B, C, D, z, delta_bias)


register_flops(torch.ops.dartmamba.selective_scan_cuda_fwd, _scan_fwd_flops, part="scan")
register_flops(torch.ops.dartmamba.selective_scan_cuda_bwd, _scan_bwd_flops, part="scan")


def _scan_cuda_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1], output[2])
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    ctx.delta_softplus = delta_softplus


def _scan_cuda_autograd(ctx, grad_out, grad_x, grad_pre):
    u, delta, A, B, C, D, z, delta_bias, x, pre = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_cuda_bwd_op(grad_out, u, delta, A, B, C, D, z, delta_bias, x, pre,
                                                              ctx.delta_softplus)
    has_D, has_z, has_bias = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None)


_scan_cuda_fwd_op.register_autograd(_scan_cuda_autograd, setup_context=_scan_cuda_setup_context)


@_expanding_low_rank_delta
@_flipping_for_reverse
def selective_scan_mamba_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                              z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                              delta_softplus: bool = False, return_last_state: bool = False):
    """mamba-ssm's fused CUDA selective scan (the ``"cuda"`` backend), as a custom op torch.compile can trace.

    Shapes as :func:`selective_scan_reference` (grouped B, C go to the kernel as they are). CUDA tensors only. The
    kernel computes in float32 and takes u/delta/B/C/z in half, bfloat16 or float32 (cast to u's dtype) and
    A/D/delta_bias in float32; the result is in ``u.dtype``. The last state (``return_last_state``) is read from
    the kernel's state checkpoints, float32, without gradient (as mamba-ssm's ``selective_scan_fn``). Raises
    :class:`~dartmamba.backends.BackendUnavailableError` when mamba-ssm cannot be imported.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    reason = _mamba_unavailable()
    if reason is not None:
        raise backends.BackendUnavailableError(f"scan backend 'cuda' is not available: {reason}")
    out, x, _ = _scan_cuda_fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return _with_state(out, x[:, :, -1, 1::2].detach(), return_last_state)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
backends.register(
    "scan", "cuda", selective_scan_mamba_cuda, devices=("cuda",), available=_mamba_unavailable,
    fallback_warning="mamba-ssm's CUDA selective scan is unavailable, so CUDA tensors use dartmamba's portable "
                     "chunked scan (much slower); install mamba-ssm (pip install 'dartmamba[cuda]')")
backends.register(
    "scan", "cpp", _scan_cpp_checked, devices=("cpu",), available=_cpp_unavailable, supports=_cpp_unsupported,
    fallback_warning="dartmamba's C++ selective scan for CPU tensors could not be built, so they use the portable "
                     "chunked torch scan (slower; a C++ compiler and ninja are needed)")
backends.register("scan", "cpu", selective_scan_cpu, devices=backends.ANY_DEVICE)
backends.register("scan", "reference", selective_scan_reference, devices=backends.ANY_DEVICE)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: Optional[str] = None, *, reverse: bool = False,
                   delta_proj: Optional[Tensor] = None):
    """Selective scan through the backend registry (op ``"scan"``).

    Args:
        u: (batch, dim, L). delta: (batch, dim, L), or with ``delta_proj`` its low-rank factor (batch, R, L).
            A: (dim, N), real. B, C: (batch, N, L), or (batch, G, N, L)
            grouped (channel d uses group d // (dim / G)). D: optional (dim,). z: optional (batch, dim, L) gate.
            delta_bias: optional (dim,).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last step, (batch, dim, N).
        reverse: run right to left (the scan of the flipped sequences, flipped back; the last state is the one
            after t = 0).
        delta_proj: optional (dim, R): the scan's delta is ``delta_proj @ delta`` (Mamba's ``dt_proj`` weight and
            its rank-R input; ``delta_bias`` is added after). The C++ kernel forms it step by step in registers
            where no gradient is needed (no (batch, dim, L) tensor and no GEMM); elsewhere, and whenever a gradient
            is needed, the product is taken first, under autograd.
        backend: ``None``/``"auto"`` (mamba-ssm's kernel for CUDA tensors when it imports, else the chunked
            ``"cpu"`` scan, with one RuntimeWarning; the C++ kernel ``"cpp"`` for CPU tensors when it builds, else
            ``"cpu"``, with one RuntimeWarning), ``"cuda"``, ``"cpp"``, ``"cpu"`` or ``"reference"``. The global
            setting is ``dartmamba.backends.set_backend("scan", ...)`` or ``DARTMAMBA_SCAN_BACKEND``;
            ``DARTMAMBA_BUILD_CPU_KERNELS=0`` never builds the C++ kernel.

    Returns:
        (batch, dim, L) in ``u.dtype``; with ``return_last_state``, (out, last_state).
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    low_rank = {} if delta_proj is None else {"delta_proj": delta_proj}
    return backends.dispatch("scan", u.device, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state, backend=backend, reverse=bool(reverse), **low_rank)
