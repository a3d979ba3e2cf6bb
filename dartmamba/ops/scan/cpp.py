"""The ``"cpp"`` backend: dartmamba's C++ selective scan for CPU tensors (``csrc/selective_scan_cpu.cpp``).

One path: every call (eager, torch.compile, torch.export, fake tensors, the FLOP counter) runs the C++-registered
ops ``torch.ops.<ext>.scan_fwd`` / ``scan_bwd`` of :func:`dartmamba.ops._jit.cpu_kernels`; their fake
implementations, autograd and FLOP formulas are registered once, when the library loads (:func:`_register`).
The kernel handles every layout mode itself: ``reverse`` (right to left, reversing rows in cache), a low-rank
``delta`` (``delta_proj`` (dim, R) @ delta (batch, R, L), formed step by step in registers) and any strides (the
output is laid out as ``u``). The backward does not take the low-rank delta: a call that needs a gradient gets it
multiplied out first, under autograd, and the op runs without it (a mode of the one op, not a second path).

Dtypes: the state and every sum are float32 (float64 when an input is float64). bfloat16 / float16 sequences (u,
delta, B, C, z sharing one such dtype: a bf16 model, or activations under CPU autocast) are read and the output
written in that dtype by the kernel itself, so inference makes no float32 copy of them; the parameters (A, D,
delta_bias, delta_proj) are cast to float32 (parameter-sized). The backward computes in float32: a call that autograd
records takes float32 copies of 16-bit sequences first (the casts are autograd ops).

How the kernel works: the vector lanes run over adjacent channels of one group, so B_t and C_t are broadcast
scalars and the recurrence, the output and the adjoint are vertical vector arithmetic with the state in registers;
the decays exp(dt A) are inline 2^(dt A log2 e) (in float with AVX-512: a 16-entry table in a register and a degree-3
polynomial, within 1.06 ulp); the backward recomputes each channel block's decays and states and runs the adjoint
recurrence backwards. See the source's header.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import backends
from .._common import compute_dtype, full_from_low_rank, needs_grad, register_flops
from .._jit import after_load, cpu_kernels, cpu_kernels_unavailable, register_cpp_backend
from .checks import check_args, grads_like, grouped, scan_bwd_flops, scan_fwd_flops, with_state

CAPABILITIES = frozenset({"reverse", "low_rank_delta", "any_strides"})
_MAX_DSTATE = 256          # the kernel keeps the state in a fixed-size register array
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def unsupported(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
                *, reverse=False, delta_proj=None) -> Optional[str]:
    """Why the kernel cannot take these inputs (None when it can)."""
    if A.shape[1] > _MAX_DSTATE:
        return f"its kernel supports N <= {_MAX_DSTATE}, got A of shape {tuple(A.shape)}"
    bad = [t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj)
           if t is not None and t.dtype not in _DTYPES]
    if bad:
        return f"its kernel computes float16/bfloat16/float32/float64 inputs, got {bad[0]}"
    return None


def storage_dtype(*sequences: Optional[Tensor]) -> Optional[torch.dtype]:
    """The 16-bit dtype the kernel reads and writes the sequences in, when they all share one (else None: they are
    computed in the compute dtype)."""
    dtypes = {t.dtype for t in sequences if t is not None}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _HALF_DTYPES else None


def kernel_arguments(u, delta, A, B, C, D, z, delta_bias, delta_proj,
                     low_precision: bool = True) -> list[Tensor]:
    """The kernel's arguments: the sequences (u, delta, B, C, z) in their shared bfloat16 / float16 dtype (read and
    written in it: the state and the sums stay float32), else all in the compute dtype; the parameters (A, D,
    delta_bias, delta_proj: parameter-sized) in the compute dtype. B, C grouped (views); A, D, delta_bias contiguous;
    absent ones 0-element. The casts are autograd ops, so gradients reach the inputs in their own dtypes."""
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    sdt = (storage_dtype(u, delta, B, C, z) if low_precision and cdt == torch.float32 else None) or cdt

    def cast(t, dtype=cdt):
        return u.new_empty(0, dtype=dtype) if t is None else t if t.dtype == dtype else t.to(dtype)

    return [cast(u, sdt), cast(delta, sdt), cast(A).contiguous(), grouped(cast(B, sdt)), grouped(cast(C, sdt)),
            cast(D).contiguous(), cast(z, sdt), cast(delta_bias).contiguous(), cast(delta_proj).contiguous()]


def scan_cpp(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
             z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
             return_last_state: bool = False, *, reverse: bool = False, delta_proj: Optional[Tensor] = None):
    """The registered backend (arguments checked by the dispatcher): one call of ``scan_fwd``."""
    grad = needs_grad(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    if delta_proj is not None and grad:
        delta, delta_proj = full_from_low_rank(delta_proj, delta), None
    # the backward computes in float32: a call autograd records takes float32 copies of 16-bit sequences
    args = kernel_arguments(u, delta, A, B, C, D, z, delta_bias, delta_proj, low_precision=not grad)
    out, last = cpu_kernels().scan_fwd(*args[:8], bool(delta_softplus), bool(reverse), args[8])
    return with_state(out if out.dtype == u.dtype else out.to(u.dtype), last, return_last_state)


def selective_scan_cpp(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False, *, reverse: bool = False,
                       delta_proj: Optional[Tensor] = None):
    """The C++ kernel, called directly (checks its arguments and that it can run them).

    Same arguments, shapes and result as :func:`~dartmamba.ops.selective_scan` (grouped B, C included); any strides
    (the output is laid out as ``u``, in its dtype). CPU tensors; math in float32 (float64 when any input is
    float64), 16-bit sequences read and written in their dtype without autograd (see the module doc); gradients
    flow to every tensor argument and from the last state. Nothing is saved for the backward but the inputs (the
    backward recomputes the states). Built at first use (a C++ compiler and ninja are needed; see
    :mod:`dartmamba.ops._jit`); raises :class:`~dartmamba.backends.BackendUnavailableError` when it cannot run.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    reason = cpu_kernels_unavailable() or unsupported(u, delta, A, B, C, D, z, delta_bias, delta_proj=delta_proj)
    if reason is not None:
        raise backends.BackendUnavailableError(f"scan backend 'cpp' is not available: {reason}")
    return scan_cpp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse=reverse,
                    delta_proj=delta_proj)


# ----------------------------------------------------------------------------------------------------------------
# Registered once, when the library loads
# ----------------------------------------------------------------------------------------------------------------
def _fake_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, delta_proj):
    # out laid out as u, in its dtype; the last state in the compute dtype (A's)
    return [torch.empty_like(u), A.new_empty((u.shape[0], u.shape[1], A.shape[1]))]


def _fake_bwd(dout, u, delta, A, B, C, D, z, delta_bias, dlast, softplus, reverse):
    return list(grads_like(u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, reverse, delta_proj = inputs
    if delta_proj.numel():
        raise RuntimeError("scan_fwd: the backward does not take a low-rank delta_proj (multiply it out first)")
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.flags = (softplus, reverse)
    ctx.set_materialize_grads(False)     # an unused last state costs no zero tensor


def _backward(ctx, grads):
    grad_out, grad_last = grads
    saved = ctx.saved_tensors            # read once: under checkpointing each read unpacks (recomputes) again
    u = saved[0]
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    grad_last = u.new_empty(0) if grad_last is None else grad_last.contiguous()
    dgrads = cpu_kernels().scan_bwd(grad_out, *saved, grad_last, *ctx.flags)
    return (*dgrads, None, None, None)


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)
    torch.library.register_fake(f"{namespace}::scan_fwd", _fake_fwd)
    torch.library.register_fake(f"{namespace}::scan_bwd", _fake_bwd)
    torch.library.register_autograd(f"{namespace}::scan_fwd", _backward, setup_context=_setup_context)
    register_flops(ops.scan_fwd, scan_fwd_flops, part="scan")
    register_flops(ops.scan_bwd, scan_bwd_flops, part="scan")


after_load(_register)
register_cpp_backend("scan", scan_cpp, supports=unsupported, capabilities=CAPABILITIES,
                     fallback="the portable chunked torch scan (slower)")
