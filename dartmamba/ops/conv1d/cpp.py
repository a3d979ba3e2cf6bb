"""The ``"cpp"`` backend of the causal conv1d: dartmamba's C++ kernel for CPU tensors (``csrc/causal_conv1d_cpu.cpp``),
built with the scan's (:mod:`dartmamba.ops._jit`): vectorised over channels, the SiLU fused, any width and any input
layout, ``reverse`` (right to left) without flipped copies; the output is channel-last when the input's channels are
adjacent (a slice of a (B, L, C) projection), else laid out as it.

One path: every call runs the C++-registered ops ``torch.ops.<ext>.causal_conv1d_fwd`` / ``_bwd``, whose fake
implementations, autograd and FLOP formulas are registered once when the library loads (:func:`_register`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import backends
from .._common import needs_grad, register_flops
from .._jit import after_load, cpu_kernels, cpu_kernels_unavailable, register_cpp_backend
from .checks import check_args, conv_bwd_flops, conv_flops

CAPABILITIES = frozenset({"reverse", "any_strides"})
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                **modes) -> Optional[str]:
    bad = [t.dtype for t in (x, weight, bias) if t is not None and t.dtype not in _DTYPES]
    if bad:
        return f"its kernel computes float16/bfloat16/float32/float64 inputs, got {bad[0]}"
    return None


def conv_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu", *,
             reverse: bool = False) -> Tensor:
    """The registered backend (arguments checked by the dispatcher): one call of ``causal_conv1d_fwd`` in the
    promoted compute dtype (float32 at least). A bfloat16 / float16 ``x`` is read and the output written in its dtype
    (math in float32) unless autograd records the call (the backward computes in float32: x is cast first); the
    weight and bias (parameter-sized) are cast to the compute dtype. The casts are autograd ops."""
    cdt = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    keep = (x.dtype in (torch.float16, torch.bfloat16) and cdt == torch.float32
            and not needs_grad(x, weight, bias))
    xc = x if keep or x.dtype == cdt else x.to(cdt)
    bc = x.new_empty(0, dtype=cdt) if bias is None else bias.to(cdt).contiguous()
    out = cpu_kernels().causal_conv1d_fwd(xc, weight.to(cdt).contiguous(), bc, activation in ("silu", "swish"),
                                          bool(reverse))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def causal_conv1d_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      activation: Optional[str] = "silu", *, reverse: bool = False) -> Tensor:
    """The C++ kernel, called directly (checks its arguments and that it can run them).

    Shapes as :func:`~dartmamba.ops.causal_conv1d`; the result is in ``x.dtype``, channel-last when x's channels
    are adjacent (else laid out as ``x``), math in float32 (float64 for float64 inputs; bfloat16 / float16 ``x`` read
    and written in its dtype). Raises
    :class:`~dartmamba.backends.BackendUnavailableError` when the kernel cannot be built.
    """
    check_args(x, weight, bias, activation)
    reason = cpu_kernels_unavailable() or unsupported(x, weight, bias)
    if reason is not None:
        raise backends.BackendUnavailableError(f"conv1d backend 'cpp' is not available: {reason}")
    return conv_cpp(x, weight, bias, activation, reverse=reverse)


# ----------------------------------------------------------------------------------------------------------------
# Registered once, when the library loads
# ----------------------------------------------------------------------------------------------------------------
def _like_input(x: Tensor) -> Tensor:
    """The kernel's output layout: channel-last when x's channels are adjacent (a slice of a (B, L, C) projection),
    so that the GEMM after the conv reads it without a copy; else as x (dense) or contiguous."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        return x.new_empty((x.shape[0], x.shape[2], x.shape[1])).transpose(1, 2)
    return torch.empty_like(x)


def _fake_fwd(x, weight, bias, silu, reverse):
    return _like_input(x)


def _fake_bwd(dout, x, weight, bias, silu, reverse):
    return [_like_input(x), torch.empty_like(weight, memory_format=torch.contiguous_format), torch.empty_like(bias)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.flags = (silu, reverse)


def _backward(ctx, grad_out):
    dx, dw, db = cpu_kernels().causal_conv1d_bwd(grad_out, *ctx.saved_tensors, *ctx.flags)
    return dx, dw, db, None, None


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)
    torch.library.register_fake(f"{namespace}::causal_conv1d_fwd", _fake_fwd)
    torch.library.register_fake(f"{namespace}::causal_conv1d_bwd", _fake_bwd)
    torch.library.register_autograd(f"{namespace}::causal_conv1d_fwd", _backward, setup_context=_setup_context)
    register_flops(ops.causal_conv1d_fwd, conv_flops)
    register_flops(ops.causal_conv1d_bwd, conv_bwd_flops)


after_load(_register)
register_cpp_backend("conv1d", conv_cpp, supports=unsupported, capabilities=CAPABILITIES, fallback="F.conv1d")
