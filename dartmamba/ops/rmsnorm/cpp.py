"""The ``"cpp"`` backend of RMSNorm: a C++ forward for CPU tensors (``csrc/rms_norm_cpu.cpp``, built with the scan's
kernels): one pass over each row instead of six torch ops, math in float32 (float64 when any input is float64) for
inputs of any floating dtype, each read and written in its own dtype (bfloat16 / float16 rows are converted in
registers, not copied). Forward only: calls that need a gradient take
``"torch"`` (:func:`unsupported` says so). One path: the C++-registered op ``torch.ops.<ext>.rms_norm_fwd``, whose fake
implementation and FLOP formula are registered once when the library loads.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ... import backends
from .._common import compute_dtype, needs_grad, register_flops, zero_flops
from .._jit import after_load, cpu_kernels, cpu_kernels_unavailable, register_cpp_backend
from .checks import check_args, residual_dtype, rows


def unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                *args, **kwargs) -> Optional[str]:
    if needs_grad(x, weight, bias, residual):
        return "its kernel has no backward (calls that need a gradient take the torch ops)"
    return None


def norm_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
             eps: float = 1e-5, prenorm: bool = False,
             residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The registered backend (arguments checked by the dispatcher)."""
    cdt = compute_dtype(x, weight, bias, residual)
    empty = x.new_empty(0, dtype=cdt)
    out, residual_out = cpu_kernels().rms_norm_fwd(
        rows(x), weight.to(cdt).contiguous(), empty if bias is None else bias.to(cdt).contiguous(),
        empty if residual is None else rows(residual), float(eps), bool(prenorm),
        residual_dtype(x, residual, residual_in_fp32))
    out = out.view(x.shape)
    if not prenorm:
        return out
    return out, residual_out.view(x.shape)


def rms_norm_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 eps: float = 1e-5, prenorm: bool = False,
                 residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The C++ kernel, called directly (CPU tensors; calls that need no gradient). Arguments and result as
    :func:`~dartmamba.ops.rms_norm`; math in float32 (float64 when any input is float64)."""
    check_args(x, weight, bias, residual)
    reason = cpu_kernels_unavailable() or unsupported(x, weight, bias, residual)
    if reason is not None:
        raise backends.BackendUnavailableError(f"rmsnorm backend 'cpp' is not available: {reason}")
    return norm_cpp(x, weight, bias, residual, eps, prenorm, residual_in_fp32)


def _fake_fwd(x, weight, bias, residual, eps, store_residual, residual_dtype):
    rows_, dim = x.shape                                    # contiguous (rows, dim), as the kernel allocates
    return [x.new_empty((rows_, dim)), x.new_empty((rows_ if store_residual else 0, dim), dtype=residual_dtype)]


def _register(namespace: str) -> None:
    torch.library.register_fake(f"{namespace}::rms_norm_fwd", _fake_fwd)
    # normalisation is elementwise work, which the FLOP convention (fvcore's) does not count
    register_flops(getattr(torch.ops, namespace).rms_norm_fwd, zero_flops)


after_load(_register)
register_cpp_backend("rmsnorm", norm_cpp, supports=unsupported)
