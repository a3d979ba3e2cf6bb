"""RMSNorm with a fused residual add (mamba-ssm ``rms_norm_fn`` semantics), with one dispatch point.

``rms_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32)``::

    s   = x + residual                       (just x when residual is None; summed in float32 or wider)
    out = s / sqrt(mean(s**2, -1) + eps) * weight (+ bias)          -> in x.dtype
    returns out, or (out, s) when prenorm; s is stored in the residual dtype:
    float32 (or wider) when residual_in_fp32, else residual.dtype (x.dtype when residual is None).

The normalisation uses the unrounded sum, as mamba-ssm's kernel does. One deliberate difference from
mamba-ssm: with ``residual_in_fp32=True`` and a low-precision ``residual``, mamba-ssm keeps the residual in
residual.dtype; here it is always float32, so both backends agree.

Backends (registry op ``"rmsnorm"``, see :mod:`dartmamba.backends`; env ``DARTMAMBA_RMSNORM_BACKEND``):

- ``"triton"``: mamba-ssm's Triton layer-norm kernels (``mamba_ssm.ops.triton.layer_norm``), wrapped as the
  custom ops ``dartmamba::rms_norm_triton_fwd`` / ``_bwd`` so torch.compile traces them. CUDA only; imported
  lazily, never at module import. They call mamba-ssm's private ``_layer_norm_fwd`` / ``_layer_norm_bwd``
  (signatures of mamba-ssm 2.x) rather than the ``rms_norm_fn`` autograd.Function, so dynamo never has to trace
  the kernels' Python launch code (``torch.cuda.device`` context, autotuner).
- ``"cpp"``: a C++ kernel for CPU tensors (``csrc/rms_norm_cpu.cpp``, built with the scan's kernels), forward
  only: plain eager calls that need no gradient (inference), one pass over each row instead of six torch ops
  (0.21 -> 0.05 ms per Vim-Ti block at batch 8 on 2 cores). Calls that need a gradient, and traced ones, take
  ``"torch"``.
- ``"torch"``: plain ops on any device (fused by Inductor under torch.compile).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import backends
from ._common import compute_dtype, plain_eager, register_flops, zero_flops
from ._jit import cpu_kernels_unavailable

__all__ = ["rms_norm", "rms_norm_reference", "rms_norm_cpp", "RMSNorm"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> None:
    """Raise ValueError naming the first argument that does not fit."""
    if x.dim() < 1:
        raise ValueError("rms_norm: x must have at least one dimension (..., dim)")
    dim = x.shape[-1]
    if tuple(weight.shape) != (dim,):
        raise ValueError(f"rms_norm: weight must have shape (dim,) = {(dim,)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"rms_norm: bias must have shape (dim,) = {(dim,)}, got {tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"rms_norm: {name} must be a floating-point tensor, got {t.dtype}")


def _residual_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    base = residual.dtype if residual is not None else x.dtype
    return torch.promote_types(base, torch.float32) if residual_in_fp32 else base


def rms_norm_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                       eps: float = 1e-5, prenorm: bool = False,
                       residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """RMSNorm with residual add, written out step by step (plain autograd), for tests.

    Args:
        x: (..., dim). weight: (dim,). bias: optional (dim,). residual: optional, x's shape.
        eps: added to the mean square. prenorm: also return the summed residual.
        residual_in_fp32: keep the returned residual in float32 (or wider).

    Returns:
        out (..., dim) in x.dtype, or (out, residual_out) when prenorm.
    """
    _check_args(x, weight, bias, residual)
    cdt = compute_dtype(x, weight, bias, residual)
    total = x.to(cdt)
    if residual is not None:
        total = total + residual.to(cdt)
    mean_square = (total * total).mean(dim=-1, keepdim=True)
    out = total / torch.sqrt(mean_square + eps) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    out = out.to(x.dtype)
    return (out, total.to(_residual_dtype(x, residual, residual_in_fp32))) if prenorm else out


def rms_norm_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                   eps: float = 1e-5, prenorm: bool = False,
                   residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The ``"torch"`` backend (plain ops, any device). Arguments and result as :func:`rms_norm_reference`."""
    _check_args(x, weight, bias, residual)
    cdt = compute_dtype(x, weight, bias, residual)
    total = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)
    out = total * torch.rsqrt(total.square().mean(dim=-1, keepdim=True) + eps) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    out = out.to(x.dtype)
    if not prenorm:
        return out
    return out, total.to(_residual_dtype(x, residual, residual_in_fp32))


# ----------------------------------------------------------------------------------------------------------------
# mamba-ssm's Triton kernels
# ----------------------------------------------------------------------------------------------------------------
_LOADED: dict = {}


def _triton_kernels():
    """mamba-ssm's (_layer_norm_fwd, _layer_norm_bwd), imported on first use."""
    if "kernels" not in _LOADED:
        from mamba_ssm.ops.triton.layer_norm import _layer_norm_bwd, _layer_norm_fwd  # noqa: PLC0415
        _LOADED["kernels"] = (_layer_norm_fwd, _layer_norm_bwd)
    return _LOADED["kernels"]


_triton_unavailable = backends.cuda_extension_check(_triton_kernels, "mamba-ssm's Triton layer norm", "mamba-ssm")


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# The custom ops take and return 2-D (rows, dim) tensors, so their outputs are plain tensors rather than views.
@torch.library.custom_op("dartmamba::rms_norm_triton_fwd", mutates_args=())
def _triton_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
                   residual_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual: (rows, dim). Returns out (rows, dim) in x.dtype, residual_out (rows, dim) in residual_dtype,
    rstd (rows,) float32."""
    fwd, _ = _triton_kernels()
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    res2 = None if residual is None else residual.to(residual_dtype)
    if res2 is not None and res2.stride(-1) != 1:
        res2 = res2.contiguous()
    y, _, _, rstd, res_out, *_ = fwd(x2, weight.contiguous(), None if bias is None else bias.contiguous(), eps,
                                     res2, residual_dtype=residual_dtype, is_rms_norm=True)
    if res_out.data_ptr() == x.data_ptr():  # the kernel hands x back when nothing had to be stored
        res_out = res_out.clone()
    return y, res_out, rstd


@_triton_fwd_op.register_fake
def _(x, weight, bias, residual, eps, residual_dtype):
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=residual_dtype),
            x.new_empty((x.shape[0],), dtype=torch.float32))


@torch.library.custom_op("dartmamba::rms_norm_triton_bwd", mutates_args=())
def _triton_bwd_op(dy: Tensor, residual_out: Tensor, weight: Tensor, bias: Optional[Tensor], rstd: Tensor,
                   dresidual: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns d(x + residual) (rows, dim) in residual_out's dtype, dweight, dbias (0-element when bias is None)."""
    _, bwd = _triton_kernels()
    dres2 = None if dresidual is None else _rows(dresidual.to(residual_out.dtype))
    dx, dw, db, *_ = bwd(_rows(dy), _rows(residual_out), weight.contiguous(),
                         None if bias is None else bias.contiguous(), eps, None, rstd, dresidual=dres2,
                         has_residual=False, is_rms_norm=True)
    return dx, dw, db if bias is not None else weight.new_empty(0)


@_triton_bwd_op.register_fake
def _(dy, residual_out, weight, bias, rstd, dresidual, eps):
    return (residual_out.new_empty(residual_out.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0))


# normalisation is elementwise work, which the FLOP convention (fvcore's) does not count
register_flops(torch.ops.dartmamba.rms_norm_triton_fwd, zero_flops)
register_flops(torch.ops.dartmamba.rms_norm_triton_bwd, zero_flops)


def _triton_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, residual_dtype = inputs
    ctx.save_for_backward(weight, bias, output[1], output[2])
    ctx.eps = eps
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _triton_autograd(ctx, grad_out, grad_residual_out, grad_rstd):
    weight, bias, residual_out, rstd = ctx.saved_tensors
    dsum, dw, db = _triton_bwd_op(grad_out, residual_out, weight, bias, rstd, grad_residual_out, ctx.eps)
    dres = None if ctx.residual_dtype is None else dsum.to(ctx.residual_dtype)
    return dsum.to(ctx.x_dtype), dw, db if bias is not None else None, dres, None, None


_triton_fwd_op.register_autograd(_triton_autograd, setup_context=_triton_setup_context)


def _triton_unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                        *args, **kwargs) -> Optional[str]:
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.dtype not in _KERNEL_DTYPES:
            return f"its kernel supports float16/bfloat16/float32, got {name} {t.dtype}"
    return None


def rms_norm_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                    eps: float = 1e-5, prenorm: bool = False,
                    residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The ``"triton"`` backend: mamba-ssm's fused Triton RMSNorm (CUDA tensors, float16/bfloat16/float32).

    Arguments and result as :func:`rms_norm_reference`.
    """
    _check_args(x, weight, bias, residual)
    reason = _triton_unavailable() or _triton_unsupported(x, weight, bias, residual)
    if reason is not None:
        raise backends.BackendUnavailableError(f"rmsnorm backend 'triton' is not available: {reason}")
    shape = x.shape
    out, res_out, _ = _triton_fwd_op(x.reshape(-1, shape[-1]), weight, bias,
                                     None if residual is None else residual.reshape(-1, shape[-1]), float(eps),
                                     _residual_dtype(x, residual, residual_in_fp32))
    return (out.view(shape), res_out.view(shape)) if prenorm else out.view(shape)


# ----------------------------------------------------------------------------------------------------------------
# C++ kernel for CPU tensors (forward only)
# ----------------------------------------------------------------------------------------------------------------
# the availability check shared by every "cpp" backend (the kernels are one library)
_cpp_unavailable = cpu_kernels_unavailable


def _cpp_unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                     *args, **kwargs) -> Optional[str]:
    tensors = (x, weight, bias, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "its kernel has no backward (calls that need a gradient take the torch ops)"
    if not plain_eager(*tensors):
        return "traced and transformed calls take the torch ops (which Inductor fuses)"
    return None


def rms_norm_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 eps: float = 1e-5, prenorm: bool = False,
                 residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The ``"cpp"`` backend: the C++ kernel (CPU tensors; plain eager calls that need no gradient). Arguments and
    result as :func:`rms_norm_reference`; math in float32 (float64 when any input is float64)."""
    _check_args(x, weight, bias, residual)
    reason = _cpp_unavailable() or _cpp_unsupported(x, weight, bias, residual)
    if reason is not None:
        raise backends.BackendUnavailableError(f"rmsnorm backend 'cpp' is not available: {reason}")
    return _rms_norm_cpp_checked(x, weight, bias, residual, eps, prenorm, residual_in_fp32)


def _rms_norm_cpp_checked(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          residual: Optional[Tensor] = None, eps: float = 1e-5, prenorm: bool = False,
                          residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`rms_norm_cpp` after its checks (what the dispatcher calls)."""
    from ._jit import cpu_kernels

    cdt = compute_dtype(x, weight, bias, residual)
    empty = x.new_empty(0, dtype=cdt)
    out, residual_out = cpu_kernels().rms_norm_fwd(
        _rows(x.to(cdt)), weight.to(cdt).contiguous(), empty if bias is None else bias.to(cdt).contiguous(),
        empty if residual is None else _rows(residual.to(cdt)), float(eps), bool(prenorm))
    out = out.view(x.shape).to(x.dtype)
    if not prenorm:
        return out
    return out, residual_out.view(x.shape).to(_residual_dtype(x, residual, residual_in_fp32))


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
backends.register(
    "rmsnorm", "triton", rms_norm_triton, devices=("cuda",), available=_triton_unavailable,
    supports=_triton_unsupported,
    fallback_warning="mamba-ssm's Triton RMSNorm is unavailable, so CUDA tensors use the plain torch RMSNorm; "
                     "install mamba-ssm (pip install 'dartmamba[cuda]')")
backends.register("rmsnorm", "cpp", _rms_norm_cpp_checked, devices=("cpu",), available=_cpp_unavailable,
                  supports=_cpp_unsupported)
backends.register("rmsnorm", "torch", rms_norm_torch, devices=backends.ANY_DEVICE)


def rms_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
             eps: float = 1e-5, prenorm: bool = False, residual_in_fp32: bool = False,
             backend: Optional[str] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """RMSNorm with fused residual add, through the backend registry (op ``"rmsnorm"``).

    Args:
        x: (..., dim). weight: (dim,). bias: optional (dim,). residual: optional, x's shape.
        eps: added to the mean square. prenorm: also return ``residual_out = x + residual``.
        residual_in_fp32: store ``residual_out`` in float32 (or wider).
        backend: ``None``/``"auto"`` (mamba-ssm's Triton kernel for CUDA tensors when it imports, else
            ``"torch"``; the C++ kernel for CPU calls that need no gradient, else ``"torch"``), ``"triton"``,
            ``"cpp"`` or ``"torch"``. The global setting is
            ``dartmamba.backends.set_backend("rmsnorm", ...)`` or ``DARTMAMBA_RMSNORM_BACKEND``.

    Returns:
        out (..., dim) in x.dtype, or (out, residual_out) when prenorm.
    """
    _check_args(x, weight, bias, residual)
    return backends.dispatch("rmsnorm", x.device, x, weight, bias, residual, eps, prenorm, residual_in_fp32,
                             backend=backend)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned ``weight`` (dim,), initialised to ones.

    The parameter is named ``weight`` so hustvl/Vim checkpoints' ``norm.weight`` / ``norm_f.weight`` load as is.
    ``forward(x, residual=None, prenorm=False, residual_in_fp32=False)`` calls :func:`rms_norm`.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, prenorm: bool = False,
                residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        return rms_norm(x, self.weight, None, residual, self.eps, prenorm, residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
