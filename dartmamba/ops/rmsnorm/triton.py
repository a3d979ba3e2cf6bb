"""The ``"triton"`` backend of RMSNorm: mamba-ssm's Triton layer-norm kernels (through
:mod:`dartmamba.compat.mamba_ssm`), wrapped as the custom ops ``dartmamba::rms_norm_triton_fwd`` / ``_bwd`` so
torch.compile traces them. CUDA only; imported lazily, never at module import. They call mamba-ssm's private
``_layer_norm_fwd`` / ``_layer_norm_bwd`` rather than the ``rms_norm_fn`` autograd.Function, so dynamo never has to
trace the kernels' Python launch code (``torch.cuda.device`` context, autotuner).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ... import backends
from ...compat import mamba_ssm as _mamba
from .._common import register_flops, zero_flops
from .checks import check_args, residual_dtype, rows

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

triton_unavailable = backends.cuda_extension_check(_mamba.layer_norm_kernels, "mamba-ssm's Triton layer norm",
                                                   "mamba-ssm")


# The custom ops take and return 2-D (rows, dim) tensors, so their outputs are plain tensors rather than views.
@torch.library.custom_op("dartmamba::rms_norm_triton_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
            residual_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual: (rows, dim). Returns out (rows, dim) in x.dtype, residual_out (rows, dim) in residual_dtype,
    rstd (rows,) float32."""
    fwd, _ = _mamba.layer_norm_kernels()
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    res2 = None if residual is None else residual.to(residual_dtype)
    if res2 is not None and res2.stride(-1) != 1:
        res2 = res2.contiguous()
    y, _, _, rstd, res_out, *_ = fwd(x2, weight.contiguous(), None if bias is None else bias.contiguous(), eps,
                                     res2, residual_dtype=residual_dtype, is_rms_norm=True)
    if res_out.data_ptr() == x.data_ptr():  # the kernel hands x back when nothing had to be stored
        res_out = res_out.clone()
    return y, res_out, rstd


@_fwd_op.register_fake
def _(x, weight, bias, residual, eps, residual_dtype):
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=residual_dtype),
            x.new_empty((x.shape[0],), dtype=torch.float32))


@torch.library.custom_op("dartmamba::rms_norm_triton_bwd", mutates_args=())
def _bwd_op(dy: Tensor, residual_out: Tensor, weight: Tensor, bias: Optional[Tensor], rstd: Tensor,
            dresidual: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns d(x + residual) (rows, dim) in residual_out's dtype, dweight, dbias (0-element when bias is None)."""
    _, bwd = _mamba.layer_norm_kernels()
    dres2 = None if dresidual is None else rows(dresidual.to(residual_out.dtype))
    dx, dw, db, *_ = bwd(rows(dy), rows(residual_out), weight.contiguous(),
                         None if bias is None else bias.contiguous(), eps, None, rstd, dresidual=dres2,
                         has_residual=False, is_rms_norm=True)
    return dx, dw, db if bias is not None else weight.new_empty(0)


@_bwd_op.register_fake
def _(dy, residual_out, weight, bias, rstd, dresidual, eps):
    return (residual_out.new_empty(residual_out.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0))


# normalisation is elementwise work, which the FLOP convention (fvcore's) does not count
register_flops(torch.ops.dartmamba.rms_norm_triton_fwd, zero_flops)
register_flops(torch.ops.dartmamba.rms_norm_triton_bwd, zero_flops)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, residual_dtype = inputs
    ctx.save_for_backward(weight, bias, output[1], output[2])
    ctx.eps = eps
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_out, grad_residual_out, grad_rstd):
    weight, bias, residual_out, rstd = ctx.saved_tensors
    dsum, dw, db = _bwd_op(grad_out, residual_out, weight, bias, rstd, grad_residual_out, ctx.eps)
    dres = None if ctx.residual_dtype is None else dsum.to(ctx.residual_dtype)
    return dsum.to(ctx.x_dtype), dw, db if bias is not None else None, dres, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                *args, **kwargs) -> Optional[str]:
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.dtype not in _DTYPES:
            return f"its kernel supports float16/bfloat16/float32, got {name} {t.dtype}"
    return None


def rms_norm_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                    eps: float = 1e-5, prenorm: bool = False,
                    residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """mamba-ssm's fused Triton RMSNorm (CUDA tensors, float16/bfloat16/float32). Arguments and result as
    :func:`~dartmamba.ops.rms_norm`."""
    check_args(x, weight, bias, residual)
    reason = triton_unavailable() or unsupported(x, weight, bias, residual)
    if reason is not None:
        raise backends.BackendUnavailableError(f"rmsnorm backend 'triton' is not available: {reason}")
    shape = x.shape
    out, res_out, _ = _fwd_op(x.reshape(-1, shape[-1]), weight, bias,
                              None if residual is None else residual.reshape(-1, shape[-1]), float(eps),
                              residual_dtype(x, residual, residual_in_fp32))
    return (out.view(shape), res_out.view(shape)) if prenorm else out.view(shape)


rms_norm_triton = backends.register(
    "rmsnorm", "triton", rms_norm_triton, devices=("cuda",), available=triton_unavailable, supports=unsupported,
    fallback_warning="mamba-ssm's Triton RMSNorm is unavailable, so CUDA tensors use the plain torch RMSNorm; "
                     "install mamba-ssm (pip install 'dartmamba[cuda]')")
