"""The ``"triton"`` backend of the causal conv1d: dartmamba's own Triton kernels, forward and backward (no compiled
extension). Widths 2..4, optional SiLU, any input layout (channel-last included: every tensor is addressed through
its strides, capability ``"any_strides"``; the output is laid out as the input). float16 / bfloat16 / float32 x
and weight, any mix; math in float32, results in each input's dtype. CUDA tensors, and CPU tensors under
``TRITON_INTERPRET=1`` (:func:`dartmamba.backends.allow_device`).

Design: one launch each way over a ``(L / BLOCK_L, dim / BLOCK_D, batch)`` grid of ``[BLOCK_D, BLOCK_L]`` tiles.
The forward reads the K shifted taps of its tile (neighbouring tiles' halos come from cache) and applies the SiLU
in registers. The backward recomputes the pre-activation at the K shifted positions that each dx needs (nothing is
saved but the inputs), and writes dweight / dbias as per-tile float32 partial sums that one torch sum reduces
(deterministic, no atomics). The kernels are the custom ops ``dartmamba::causal_conv1d_triton_fwd`` / ``_bwd`` with
fakes, registered autograd and FLOP formulas (``torch.compile`` traces them; nothing reads a tensor value).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import backends
from .._common import TritonKernels, register_flops
from .checks import check_args, conv_bwd_flops, conv_flops

CAPABILITIES = frozenset({"any_strides"})
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WIDTHS = (2, 3, 4)
# (BLOCK_D, BLOCK_L): 2048 values per tile on the GPU; small in the interpreter so that tests cross tile borders
BLOCKS_GPU, BLOCKS_INTERPRETED = (32, 64), (32, 16)


_TRITON = TritonKernels("dartmamba.ops.conv1d._triton_kernels", "conv_fwd_kernel")
interpreted = _TRITON.interpreted
triton_unavailable = backends.cached_check(_TRITON.unavailable)


def _kernels():
    return _TRITON.kernels


def unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                **modes) -> Optional[str]:
    """Why the kernels cannot take these arguments (None when they can); metadata only."""
    if weight.shape[1] not in _WIDTHS:
        return f"its kernels support widths 2..4, got weight of width {weight.shape[1]}"
    bad = [t.dtype for t in (x, weight, bias) if t is not None and t.dtype not in _DTYPES]
    if bad:
        return f"its kernels compute float16/bfloat16/float32 inputs, got {bad[0]}"
    return None


def _blocks() -> tuple[int, int]:
    return BLOCKS_INTERPRETED if interpreted() else BLOCKS_GPU


def _like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An output laid out as ``x`` (channel-last stays channel-last) when x is dense, else contiguous."""
    return torch.empty_like(x, dtype=dtype)


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter rounds float32 -> bfloat16 by truncation (compiled Triton and torch round to nearest even)
    return torch.float32 if dtype == torch.bfloat16 and interpreted() else dtype


def _device_guard(t: Tensor):
    from dartmamba_kernels._launch import device_guard
    return device_guard(t)


def _grid(x: Tensor, block_d: int, block_l: int) -> tuple[int, int, int]:
    batch, dim, length = x.shape
    return ((length + block_l - 1) // block_l, (dim + block_d - 1) // block_d, batch)


@torch.library.custom_op("dartmamba::causal_conv1d_triton_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """x (batch, dim, L) any strides; weight (dim, K). Returns (batch, dim, L) in x.dtype, laid out as x."""
    block_d, block_l = _blocks()
    out = _like(x, _store_dtype(x.dtype))
    if x.numel():
        wf = weight.float().contiguous()
        bf = None if bias is None else bias.float().contiguous()
        with _device_guard(x):
            _kernels().conv_fwd_kernel[_grid(x, block_d, block_l)](
                x, wf, bf, out, x.shape[2], x.shape[1], *x.stride(), *out.stride(), KW=weight.shape[1],
                HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=4)
    return out.to(x.dtype)


@_fwd_op.register_fake
def _(x, weight, bias, silu):
    return _like(x, x.dtype)


@torch.library.custom_op("dartmamba::causal_conv1d_triton_bwd", mutates_args=())
def _bwd_op(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
            silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx (laid out as x, x.dtype), dweight (dim, K), dbias (dim,) (0-element when bias is None)."""
    block_d, block_l = _blocks()
    grid = _grid(x, block_d, block_l)
    dim, width = weight.shape
    dx = _like(x, _store_dtype(x.dtype))
    dw = x.new_zeros((x.shape[0] * grid[0], dim, width), dtype=torch.float32)
    db = x.new_zeros((x.shape[0] * grid[0], dim), dtype=torch.float32)
    if x.numel():
        wf = weight.float().contiguous()
        bf = None if bias is None else bias.float().contiguous()
        with _device_guard(x):
            _kernels().conv_bwd_kernel[grid](
                x, wf, bf, dout, dx, dw, db, x.shape[2], dim, *x.stride(), *dout.stride(), *dx.stride(),
                KW=width, HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=4)
    else:
        dx.zero_()
    return (dx.to(x.dtype), dw.sum(0).to(weight.dtype),
            db.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0))


@_bwd_op.register_fake
def _(dout, x, weight, bias, silu):
    return (_like(x, x.dtype), torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else x.new_empty(0))


register_flops(torch.ops.dartmamba.causal_conv1d_triton_fwd, conv_flops)
register_flops(torch.ops.dartmamba.causal_conv1d_triton_bwd, conv_bwd_flops)


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _bwd_op(grad, x, weight, bias, ctx.silu)
    return dx, dw, db if bias is not None else None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def conv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                activation: Optional[str] = "silu") -> Tensor:
    """The registered backend (arguments checked by the dispatcher): one call of the forward op."""
    return _fwd_op(x, weight, bias, activation in ("silu", "swish"))


def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = "silu") -> Tensor:
    """The Triton causal conv1d, called directly (checks its arguments and that it can run them).

    Shapes as :func:`~dartmamba.ops.causal_conv1d` (width 2..4); the result is in ``x.dtype``, laid out as x.
    Raises :class:`~dartmamba.backends.BackendUnavailableError` when triton cannot run here or the inputs do not
    fit.
    """
    check_args(x, weight, bias, activation)
    reason = triton_unavailable() or unsupported(x, weight, bias)
    if reason is not None:
        raise backends.BackendUnavailableError(f"conv1d backend 'triton' is not available: {reason}")
    return conv_triton(x, weight, bias, activation)


backends.register(
    "conv1d", "triton", conv_triton, devices=("cuda",), available=triton_unavailable, supports=unsupported,
    capabilities=CAPABILITIES,
    fallback_warning="dartmamba's Triton causal conv1d is unavailable, so CUDA tensors use F.conv1d; install triton")
