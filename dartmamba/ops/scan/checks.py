"""The selective scan's argument checks, its FLOP/MAC formulas, and the small helpers its backends share."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_args(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               z: Optional[Tensor], delta_bias: Optional[Tensor], delta_proj: Optional[Tensor] = None) -> None:
    """Raise ValueError (TypeError for a non-tensor) naming the first argument whose shape or dtype does not fit."""
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


# ----------------------------------------------------------------------------------------------------------------
# FLOP / MAC formulas
# ----------------------------------------------------------------------------------------------------------------
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


def scan_fwd_flops(u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    """FLOP formula of every backend's forward op (input shapes in; 2 FLOPs per multiply-add)."""
    batch, dim, length = u
    return 2 * scan_forward_macs(batch, dim, length, A[1], _present(D), _present(z))


def scan_bwd_flops(dout, u, delta, A, B, C, D, z, delta_bias, *args, out_shape=None, **kwargs) -> int:
    """FLOP formula of every backend's backward op."""
    batch, dim, length = u
    return 2 * scan_backward_macs(batch, dim, length, A[1], _present(D), _present(z))


# ----------------------------------------------------------------------------------------------------------------
# Shared by the backends
# ----------------------------------------------------------------------------------------------------------------
def grouped(t: Tensor) -> Tensor:
    """B or C as (batch, G, N, L) (a view)."""
    return t if t.dim() == 4 else t.unsqueeze(1)


def with_state(out: Tensor, last_state: Tensor, return_last_state: bool):
    return (out, last_state) if return_last_state else out


def empty(t: Tensor) -> Tensor:
    """A 0-element placeholder for an absent optional tensor (op outputs cannot be None)."""
    return t.new_empty(0)


def grads_like(u, delta, A, B, C, D, z, delta_bias) -> tuple[Tensor, ...]:
    """The backward ops' fake outputs: a contiguous gradient per input, 0-element for absent ones."""
    return tuple(empty(u) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (u, delta, A, B, C, D, z, delta_bias))


def grads_as_inputs(grads, u, delta, A, B, C, D, z, delta_bias) -> tuple[Tensor, ...]:
    """A kernel's (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in each input's dtype and B, C's layout (the kernels
    take them grouped); absent inputs get a 0-element placeholder."""
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.view(B.shape).to(B.dtype),
            dC.view(C.shape).to(C.dtype), dD.to(D.dtype) if D is not None else empty(u),
            dz.to(z.dtype) if z is not None else empty(u),
            dbias.to(delta_bias.dtype) if delta_bias is not None else empty(u))
