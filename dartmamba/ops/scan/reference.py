"""The selective scan's definition: a sequential loop under plain autograd, which every backend is tested against.

Registered as the ``"reference"`` backend (no modes of its own: ``reverse`` and ``delta_proj`` are adapted)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import backends
from .._common import compute_dtype
from .checks import check_args, grouped, with_state


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
    check_args(u, delta, A, B, C, D, z, delta_bias)
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    batch, dim, length = u.shape
    groups, dstate = grouped(B).shape[1], A.shape[1]
    per_group = dim // groups
    uf = u.to(cdt)
    # channels as (group, channel in group): B_t and C_t broadcast over a group's channels
    dtg, ug = dt.view(batch, groups, per_group, length), uf.view(batch, groups, per_group, length)
    Af = A.to(cdt).view(groups, per_group, dstate)
    Bf, Cf = grouped(B).to(cdt), grouped(C).to(cdt)                          # (batch, G, N, L)
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
    return with_state(y.to(u.dtype), h.reshape(batch, dim, dstate), return_last_state)



selective_scan_reference = backends.register("scan", "reference", selective_scan_reference,
                                             devices=backends.ANY_DEVICE)
