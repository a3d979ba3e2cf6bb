"""The ``"cuda"`` backend: mamba-ssm's fused CUDA selective scan (``selective_scan_cuda.fwd/bwd``, through
:mod:`dartmamba.compat.mamba_ssm`), wrapped as the custom ops ``dartmamba::selective_scan_cuda_fwd`` / ``_bwd`` so
torch.compile traces it without a graph break. CUDA tensors only; imported lazily, never at module import. (The
custom ops are registered for every device so their plumbing can be tested on CPU against a stand-in extension.)
As in mamba-ssm, the returned last state carries no gradient. The kernel has none of the layout modes: ``reverse``,
a low-rank ``delta`` and strided sequences are adapted by the dispatch (:mod:`dartmamba.ops._common`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import backends
from ...compat import mamba_ssm as _mamba
from .._common import register_flops
from .checks import check_args, empty, grads_as_inputs, grads_like, grouped, scan_bwd_flops, scan_fwd_flops, with_state

# mamba-ssm's kernel keeps one checkpoint of the state every 2048 steps: x is (batch, dim, n_chunks, 2N) float32.
_MAMBA_CHUNK = 2048

mamba_unavailable = backends.cuda_extension_check(
    _mamba.selective_scan_extension, "mamba-ssm's CUDA extension selective_scan_cuda", "mamba-ssm")


def _inputs(u, delta, A, B, C, D, z, delta_bias):
    """Cast and lay out the inputs as the kernel requires: delta, B, C, z in u's dtype (half, bfloat16 or float32),
    A, D, delta_bias in float32, unit stride along L; B and C as (batch, G, N, L) (G = 1 when ungrouped)."""
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        u = u.float()
    itype = u.dtype

    def lay(t, dtype):
        t = t.to(dtype)
        return t if t.stride(-1) == 1 else t.contiguous()

    return (lay(u, itype), lay(delta, itype), A.float().contiguous(), grouped(lay(B, itype)),
            grouped(lay(C, itype)), None if D is None else D.float().contiguous(),
            None if z is None else lay(z, itype), None if delta_bias is None else delta_bias.float().contiguous())


@torch.library.custom_op("dartmamba::selective_scan_cuda_fwd", mutates_args=())
def _fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            delta_bias: Optional[Tensor], delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out, x, out_before_gate): x is the kernel's state checkpoints (batch, dim, n_chunks, 2N) fp32;
    out_before_gate is the ungated output when z is given (the backward needs it), else a 0-element tensor."""
    out, x, *rest = _mamba.scan_call("fwd", *_inputs(u, delta, A, B, C, D, z, delta_bias), delta_softplus)
    if z is not None:
        return rest[0].to(u.dtype), x, out
    return out.to(u.dtype), x, empty(u)


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    itype = u.dtype if u.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    n_chunks = (length + _MAMBA_CHUNK - 1) // _MAMBA_CHUNK
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    x = u.new_empty((batch, dim, n_chunks, 2 * A.shape[1]), dtype=torch.float32)
    pre = u.new_empty((batch, dim, length), dtype=itype) if z is not None else empty(u)
    return out, x, pre


@torch.library.custom_op("dartmamba::selective_scan_cuda_bwd", mutates_args=())
def _bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            z: Optional[Tensor], delta_bias: Optional[Tensor], x: Tensor, out_before_gate: Tensor,
            delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    uk, dk, Ak, Bk, Ck, Dk, zk, bk = _inputs(u, delta, A, B, C, D, z, delta_bias)
    dout = dout.to(uk.dtype)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    du, ddelta, dA, dB, dC, dD, dbias, *rest = _mamba.scan_call(
        "bwd", uk, dk, Ak, Bk, Ck, Dk, zk, bk, dout, x, out_before_gate if z is not None else None, None,
        delta_softplus, False)
    dz = rest[0] if z is not None else None
    return grads_as_inputs((du, ddelta, dA, dB, dC, dD, dz, dbias), u, delta, A, B, C, D, z, delta_bias)


@_bwd_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, x, out_before_gate, delta_softplus):
    return grads_like(u, delta, A, B, C, D, z, delta_bias)


register_flops(torch.ops.dartmamba.selective_scan_cuda_fwd, scan_fwd_flops, part="scan")
register_flops(torch.ops.dartmamba.selective_scan_cuda_bwd, scan_bwd_flops, part="scan")


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1], output[2])
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, grad_out, grad_x, grad_pre):
    u, delta, A, B, C, D, z, delta_bias, x, pre = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _bwd_op(grad_out, u, delta, A, B, C, D, z, delta_bias, x, pre,
                                                    ctx.delta_softplus)
    has_D, has_z, has_bias = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_mamba_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                              z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                              delta_softplus: bool = False, return_last_state: bool = False):
    """mamba-ssm's fused CUDA selective scan, as a custom op torch.compile can trace.

    Shapes as :func:`~dartmamba.ops.selective_scan` (grouped B, C go to the kernel as they are). CUDA tensors only.
    The kernel computes in float32 and takes u/delta/B/C/z in half, bfloat16 or float32 (cast to u's dtype) and
    A/D/delta_bias in float32; the result is in ``u.dtype``. The last state (``return_last_state``) is read from
    the kernel's state checkpoints, float32, without gradient (as mamba-ssm's ``selective_scan_fn``). Raises
    :class:`~dartmamba.backends.BackendUnavailableError` when mamba-ssm cannot be imported.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    reason = mamba_unavailable()
    if reason is not None:
        raise backends.BackendUnavailableError(f"scan backend 'cuda' is not available: {reason}")
    out, x, _ = _fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return with_state(out, x[:, :, -1, 1::2].detach(), return_last_state)


selective_scan_mamba_cuda = backends.register(
    "scan", "cuda", selective_scan_mamba_cuda, devices=("cuda",), available=mamba_unavailable,
    fallback_warning="mamba-ssm's CUDA selective scan is unavailable, so CUDA tensors use dartmamba's Triton scan "
                     "(the portable chunked torch scan where triton is missing); install mamba-ssm "
                     "(pip install 'dartmamba[cuda]')")
