"""Vim's bidirectional scan of one layer (registry op ``"bimamba_scan"``): the two directions' selective scans
combined as bimamba v2 combines them::

    out = 0.5 * (selective_scan(forward, z) + selective_scan(backward, z, reverse=True))
        = 0.5 * (y_forward + y_backward) * silu(z)        (y ungated)

``forward`` and ``backward`` are :class:`ScanBranch` es (u, delta, A, B, C, D, delta_bias, delta_proj, as
:func:`~dartmamba.ops.selective_scan` takes them: the backward branch's sequences in their original order, its
conv already run right to left); ``z`` is the gate both share.

Backends (env ``DARTMAMBA_BIMAMBA_SCAN_BACKEND``), in preference order:

- ``"cpp"`` (:mod:`.cpp`): one pass of dartmamba's C++ scan over the channel blocks, both directions per block,
  the gate computed and the output written once; CPU calls that need no gradient (inference).
- ``"torch"`` (:mod:`.torch`): the two scans through the ``"scan"`` op (each dispatched there: mamba-ssm,
  Triton, the C++ kernel or torch) and the sum; any device, autograd. The definition, and the fallback.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from ... import backends
from ..scan.checks import check_args


class ScanBranch(NamedTuple):
    """One direction's inputs of :func:`bimamba_scan`, as :func:`~dartmamba.ops.selective_scan` takes them."""
    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Optional[Tensor] = None
    delta_bias: Optional[Tensor] = None
    delta_proj: Optional[Tensor] = None


def check_branches(forward: ScanBranch, backward: ScanBranch, z: Tensor) -> None:
    """The two branches alike (which inputs are present, shapes, dtypes), and each valid for the scan with gate
    ``z``."""
    for name, branch in (("forward", forward), ("backward", backward)):
        if not isinstance(branch, ScanBranch):
            raise TypeError(f"{name} must be a ScanBranch, got {type(branch).__name__}")
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a (batch, dim, L) tensor, got {type(z).__name__}")
    for field, a, b in zip(ScanBranch._fields, forward, backward):
        if (a is None) != (b is None):
            raise ValueError(f"forward.{field} and backward.{field} must both be given or both be None")
        if a is not None and (a.shape != b.shape or a.dtype != b.dtype):
            raise ValueError(f"forward.{field} and backward.{field} must match in shape and dtype, got "
                             f"{tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    check_args(forward.u, forward.delta, forward.A, forward.B, forward.C, forward.D, z, forward.delta_bias,
               forward.delta_proj)


# registration order is the preference order of "auto"
from .cpp import bimamba_scan_cpp  # noqa: E402
from .torch import bimamba_scan_torch  # noqa: E402

__all__ = ["ScanBranch", "bimamba_scan", "bimamba_scan_cpp", "bimamba_scan_torch", "check_branches"]


def bimamba_scan(forward: ScanBranch, backward: ScanBranch, z: Tensor, delta_softplus: bool = False,
                 backend: Optional[str] = None) -> Tensor:
    """Both scan directions of a bimamba v2 layer: ``0.5 * (scan(forward) + scan(backward, reverse=True)) *
    silu(z)``, (batch, dim, L) in ``forward.u.dtype``.

    Args:
        forward, backward: :class:`ScanBranch` es of equal shapes and dtypes; ``backward`` is scanned right to left.
        z: (batch, dim, L), the gate of both.
        delta_softplus: softplus of ``delta + delta_bias`` in both.
        backend: ``None``/``"auto"`` (the C++ kernel for CPU calls that need no gradient, else the two scans
            through the ``"scan"`` op), or a name to force (see :mod:`dartmamba.backends`).
    """
    check_branches(forward, backward, z)
    return backends.dispatch("bimamba_scan", z.device, forward, backward, z, bool(delta_softplus), backend=backend)
