"""Selective scan (Mamba-1 SSM recurrence): one public entry point over the backends of registry op ``"scan"``.

For every batch ``b``, channel ``d`` and state index ``n`` the scan runs the linear recurrence::

    dt_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t  = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B[b, g, n, t] * u_t,      h_{-1} = 0
    y_t  = sum_n C[b, g, n, t] * h_t[n]  +  D[d] * u_t
    out  = y * silu(z)                               (gate optional)

Shapes follow mamba-ssm's ``selective_scan_fn`` (input-dependent B and C, ungrouped or grouped): u, delta, z:
(batch, dim, L); A: (dim, N), real; B, C: (batch, N, L), or (batch, G, N, L) with channel ``d`` in group
``g = d // (dim / G)`` (the one-pass bidirectional mixer stacks both directions as G = 2); D, delta_bias: (dim,).

Layout modes, which a backend declares as capabilities when it handles them itself (the others get one generic
adapter from :mod:`dartmamba.ops._common`, applied at registration):

- ``"reverse"``: ``reverse=True`` runs the recurrence right to left: the scan of every sequence input flipped
  along L, with the output flipped back (the last state is then the one after t = 0);
- ``"low_rank_delta"``: ``delta_proj`` (dim, R) makes ``delta`` a low-rank factor (batch, R, L) of the step sizes
  ``delta_proj @ delta`` (Mamba's ``dt_proj``);
- ``"any_strides"``: sequences with any strides (else they are made unit-stride along L first).

Backends (env ``DARTMAMBA_SCAN_BACKEND``), one module each, in preference order:

- ``"cuda"`` (:mod:`.cuda`): mamba-ssm's fused CUDA kernel; no modes.
- ``"triton"`` (:mod:`.triton`): dartmamba's Triton kernels (CUDA without mamba-ssm: no compile step; CPU tensors
  under ``TRITON_INTERPRET=1`` when allowed with :func:`dartmamba.backends.allow_device`); ``any_strides``.
- ``"cpp"`` (:mod:`.cpp`): dartmamba's C++ kernel for CPU tensors, built at first use; every mode.
- ``"torch"`` (:mod:`.torch`): an exact chunked scan in plain torch ops with a hand-written backward (any device:
  the fallback on CUDA without mamba-ssm and on CPU without a C++ compiler); no modes.
- ``"reference"`` (:mod:`.reference`): a sequential loop under plain autograd; no modes.

On CUDA, "auto" takes mamba-ssm's kernel when it imports, else the Triton kernels (passing over mamba-ssm warns
once), else the torch scan.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ... import backends
from .._common import expanding_low_rank, reversing, unit_stride
from .checks import check_args, scan_backward_macs, scan_forward_macs

_SEQUENCES = (0, 1, 3, 4, 6)          # u, delta, B, C, z: the positional arguments with an L axis
backends.declare_modes("scan", {"low_rank_delta": expanding_low_rank(1, "delta_proj",
                                                                    lambda *a: check_args(*a[:8], a[-1])),
                                "reverse": reversing(_SEQUENCES), "any_strides": unit_stride(_SEQUENCES)})

# registration order is the preference order of "auto"
from .cuda import selective_scan_mamba_cuda  # noqa: E402
from .triton import selective_scan_triton  # noqa: E402
from .cpp import selective_scan_cpp  # noqa: E402
from .torch import selective_scan_torch  # noqa: E402
from .reference import selective_scan_reference  # noqa: E402

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_torch", "selective_scan_cpp",
           "selective_scan_mamba_cuda", "selective_scan_triton", "scan_forward_macs", "scan_backward_macs"]


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
            its rank-R input; ``delta_bias`` is added after). A backend with the ``"low_rank_delta"`` capability
            (the C++ kernel) forms it step by step where no gradient is needed; elsewhere, and whenever a gradient
            is needed, the product is taken first, under autograd.
        backend: ``None``/``"auto"`` (the first of ``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"`` that runs on the
            inputs' device and takes them; passing over a missing kernel warns once), or a name to force. The
            global setting is ``dartmamba.backends.set_backend("scan", ...)`` or ``DARTMAMBA_SCAN_BACKEND``;
            ``DARTMAMBA_BUILD_CPU_KERNELS=0`` never builds the C++ kernel.

    Returns:
        (batch, dim, L) in ``u.dtype``; with ``return_last_state``, (out, last_state (batch, dim, N)).
    """
    check_args(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    if delta_proj is None:
        return backends.dispatch("scan", u.device, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 return_last_state, backend=backend, reverse=bool(reverse))
    return backends.dispatch("scan", u.device, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state, backend=backend, reverse=bool(reverse), delta_proj=delta_proj)
