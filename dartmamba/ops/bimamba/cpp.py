"""The ``"cpp"`` backend of ``bimamba_scan``: one pass of the C++ scan over both directions
(``bimamba_scan_fwd`` in ``csrc/selective_scan_cpu.cpp``), for CPU calls that need no gradient.

Per block of channels the kernel runs the forward branch left to right and the backward branch right to left (the
scan's own code, ungated), sums the two in cache, gathers z and applies 0.5 silu(z) once, and writes the output
once: against two gated ``scan_fwd`` calls and the sum, it saves one gather and sigmoid of z, one output write, and
the two passes of the sum and the halving. Vim-Ti's two scans of a layer at 784 tokens, batch 4: see
docs/benchmarks.md. The results equal the ``"torch"`` backend's up to rounding (the gate multiplies the sum, not
each term). Dtypes as the scan's C++ backend: 16-bit sequences read and written in their dtype, math in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._common import needs_grad, register_flops
from .._jit import after_load, cpu_kernels, register_cpp_backend
from ..scan.checks import scan_fwd_flops
from ..scan.cpp import kernel_arguments
from ..scan.cpp import unsupported as scan_unsupported


def unsupported(forward, backward, z: Tensor, delta_softplus: bool = False) -> Optional[str]:
    """Why the kernel cannot take these inputs (None when it can)."""
    if needs_grad(z, *forward, *backward):
        return "its kernel has no backward (calls that need a gradient take the two scans)"
    # the branches share shapes and dtypes (check_branches), so what the scan's kernel says of one holds for both
    return scan_unsupported(forward.u, forward.delta, forward.A, forward.B, forward.C, forward.D, z,
                            forward.delta_bias, delta_proj=forward.delta_proj)


def branch_kernel_arguments(branch, z: Tensor) -> list[Tensor]:
    """(u, delta, A, B, C, D, delta_bias, delta_proj, z) as the kernel takes them (the scan's
    ``kernel_arguments``)."""
    u, delta, A, B, C, D, z, delta_bias, delta_proj = kernel_arguments(
        branch.u, branch.delta, branch.A, branch.B, branch.C, branch.D, z, branch.delta_bias, branch.delta_proj)
    return [u, delta, A, B, C, D, delta_bias, delta_proj, z]


def bimamba_scan_cpp(forward, backward, z: Tensor, delta_softplus: bool = False) -> Tensor:
    """The registered backend: one call of ``bimamba_scan_fwd``; arguments as
    :func:`~dartmamba.ops.bimamba.bimamba_scan`."""
    f = branch_kernel_arguments(forward, z)
    b = branch_kernel_arguments(backward, z)
    out = cpu_kernels().bimamba_scan_fwd(*f[:8], *b[:8], f[8], bool(delta_softplus))
    return out if out.dtype == forward.u.dtype else out.to(forward.u.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Registered once, when the library loads
# ----------------------------------------------------------------------------------------------------------------
def _fake(u, delta, A, B, C, D, delta_bias, delta_proj, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
          delta_proj_b, z, softplus):
    return torch.empty_like(u)


def bimamba_scan_fwd_flops(u, delta, A, B, C, D, delta_bias, delta_proj, u_b, delta_b, A_b, B_b, C_b, D_b,
                           delta_bias_b, delta_proj_b, z, *args, out_shape=None, **kwargs) -> int:
    """The two gated scans' FLOPs (the count of the ``"torch"`` backend's two ``scan_fwd`` calls)."""
    return (scan_fwd_flops(u, delta, A, B, C, D, z, delta_bias)
            + scan_fwd_flops(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b))


def _register(namespace: str) -> None:
    torch.library.register_fake(f"{namespace}::bimamba_scan_fwd", _fake)
    register_flops(getattr(torch.ops, namespace).bimamba_scan_fwd, bimamba_scan_fwd_flops, part="scan")


after_load(_register)
# no fallback warning of its own: the scan's says that the kernels could not be built
bimamba_scan_cpp = register_cpp_backend("bimamba_scan", bimamba_scan_cpp, supports=unsupported)
