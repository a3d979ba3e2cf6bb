"""Depthwise causal conv1d (+ optional SiLU), as in Mamba's mixer, with one dispatch point over its backends.

``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (K - 1) + k])`` with zeros before ``t = 0``.
``reverse=True`` runs it right to left (anti-causal: ``out[t]`` reads ``x[t .. t + K - 1]``, zeros after the end):
the conv of ``x.flip(-1)``, flipped back, which is what the backward branch of a bidirectional mixer needs. The C++
kernel does this in place; the other backends flip.

Backends (registry op ``"conv1d"``, see :mod:`dartmamba.backends`; env ``DARTMAMBA_CONV1D_BACKEND``):

- ``"cuda"``: the causal-conv1d package's ``causal_conv1d_fn`` (CUDA tensors, kernel width 2..4); imported lazily,
  never at module import. causal-conv1d >= 1.5.1 registers its kernels as custom ops, so torch.compile traces it.
- ``"cpp"``: dartmamba's C++ kernel for CPU tensors (``csrc/causal_conv1d_cpu.cpp``, custom ops
  ``dartmamba::causal_conv1d_cpp_fwd`` / ``_bwd``), built at first use with the selective scan's kernel (see
  :mod:`dartmamba.ops._jit`): vectorised over channels, the SiLU fused, any input layout; the output is
  channel-last when the input's channels are adjacent (a slice of a (B, L, C) projection), else laid out as it. Where it cannot be built, CPU tensors take ``"torch"`` with one RuntimeWarning.
- ``"torch"``: ``F.conv1d`` with ``groups=dim`` and left padding, any device, traced by dynamo as plain ops.

:func:`causal_conv1d_reference` is an explicit loop over the taps, for tests.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ._common import plain_eager, register_flops
from ._jit import cpu_kernels_unavailable

__all__ = ["causal_conv1d", "causal_conv1d_reference", "causal_conv1d_cpp"]

_ACTIVATIONS = (None, "silu", "swish")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> None:
    """Raise ValueError naming the first argument that does not fit."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must have shape (batch, dim, L), got {tuple(x.shape)}")
    dim = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must have shape (dim, K) with dim = {dim} (squeeze nn.Conv1d's "
                         f"(dim, 1, K) weight first), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"causal_conv1d: bias must have shape (dim,) = {(dim,)}, got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"causal_conv1d: {name} must be a floating-point tensor, got {t.dtype}")


def _activate(y: Tensor, activation: Optional[str]) -> Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def _flipping_for_reverse(fn):
    """A backend without its own right-to-left mode: ``reverse=True`` flips x along L, convolves, flips back."""
    @functools.wraps(fn)
    def run(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu", *,
            reverse: bool = False) -> Tensor:
        if not reverse:
            return fn(x, weight, bias, activation)
        return fn(x.flip(-1), weight, bias, activation).flip(-1)
    return run


@_flipping_for_reverse
def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                            activation: Optional[str] = "silu") -> Tensor:
    """Causal depthwise conv1d as an explicit sum over the K taps (plain autograd), for tests.

    Args:
        x: (batch, dim, L). weight: (dim, K). bias: optional (dim,).
        activation: ``"silu"``/``"swish"`` or ``None``.
        reverse (keyword): right to left (the conv of the flipped sequence, flipped back).

    Returns:
        (batch, dim, L) in ``x.dtype``; math in the promoted dtype of x and weight.
    """
    _check_args(x, weight, bias, activation)
    cdt = torch.promote_types(x.dtype, weight.dtype)
    length = x.shape[-1]
    kernel = weight.shape[1]
    xp = F.pad(x.to(cdt), (kernel - 1, 0))                           # zeros before t = 0
    out = torch.zeros_like(xp[..., :length])
    for k in range(kernel):
        out = out + weight[:, k, None].to(cdt) * xp[..., k:k + length]
    if bias is not None:
        out = out + bias.to(cdt)[:, None]
    return _activate(out, activation).to(x.dtype)


@_flipping_for_reverse
def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        activation: Optional[str] = "silu") -> Tensor:
    """The ``"torch"`` backend: ``F.conv1d`` with groups=dim, padding K-1, truncated to L. Any device.

    Shapes as :func:`causal_conv1d_reference`; result in ``x.dtype``.
    """
    _check_args(x, weight, bias, activation)
    cdt = torch.promote_types(x.dtype, weight.dtype)
    dim, kernel = weight.shape
    length = x.shape[-1]
    y = F.conv1d(x.to(cdt), weight.to(cdt).unsqueeze(1), None if bias is None else bias.to(cdt),
                 padding=kernel - 1, groups=dim)[..., :length]
    return _activate(y, activation).to(x.dtype)


_LOADED: dict = {}


def conv_flops(x, weight, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a depthwise causal conv (input shapes in): K multiply-adds per output element."""
    return 2 * x[0] * x[1] * x[2] * weight[-1]


def _conv_fn():
    """causal-conv1d's ``causal_conv1d_fn`` (imported on first use)."""
    if "fn" not in _LOADED:
        from causal_conv1d import causal_conv1d_fn  # noqa: PLC0415  (only importable where causal-conv1d is built)
        _LOADED["fn"] = causal_conv1d_fn
        _register_package_flops()
    return _LOADED["fn"]


_cuda_unavailable = backends.cuda_extension_check(_conv_fn, "causal-conv1d", "causal-conv1d")


def _cuda_unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      activation: Optional[str] = "silu", *, reverse: bool = False) -> Optional[str]:
    """Why causal-conv1d's kernel cannot take these arguments (None when it can)."""
    if not 2 <= weight.shape[1] <= 4:
        return f"its kernel supports widths 2..4, got weight of width {weight.shape[1]}"
    if x.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES:
        return f"its kernel supports float16/bfloat16/float32, got x {x.dtype} and weight {weight.dtype}"
    return None


@_flipping_for_reverse
def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       activation: Optional[str] = "silu") -> Tensor:
    """The ``"cuda"`` backend: causal-conv1d's ``causal_conv1d_fn``. CUDA tensors, width 2..4.

    Shapes as :func:`causal_conv1d_reference`; result in ``x.dtype`` (the kernel accepts mixed x/weight dtypes;
    bias is cast to weight's dtype as it requires).
    """
    _check_args(x, weight, bias, activation)
    reason = _cuda_unavailable() or _cuda_unsupported(x, weight)
    if reason is not None:
        raise backends.BackendUnavailableError(f"conv1d backend 'cuda' is not available: {reason}")
    if bias is None:
        # some causal-conv1d releases allocate the bias gradient with zeros_like(bias) and fail on None
        bias = weight.new_zeros(weight.shape[0])
    return _conv_fn()(x, weight, bias.to(weight.dtype), activation=activation)


def _register_package_flops() -> None:
    """FLOP formulas for the custom ops causal-conv1d registers (their names differ between releases; those that
    exist get one): a depthwise conv, K multiply-adds per output element."""
    from torch.utils.flop_counter import flop_registry

    for namespace in ("mamba_causal_conv1d", "causal_conv1d"):
        for name in ("causal_conv1d_fwd", "causal_conv1d_bwd"):
            try:
                op = getattr(getattr(torch.ops, namespace), name)
            except (AttributeError, RuntimeError):
                continue
            if op not in flop_registry:
                register_flops(op, conv_flops)


# ----------------------------------------------------------------------------------------------------------------
# C++ kernel for CPU tensors (built at first use)
# ----------------------------------------------------------------------------------------------------------------
_CPP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# the availability check shared by every "cpp" backend (the kernels are one library)
_cpp_unavailable = cpu_kernels_unavailable


def _cpp_unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     activation: Optional[str] = "silu", *, reverse: bool = False) -> Optional[str]:
    bad = [t.dtype for t in (x, weight, bias) if t is not None and t.dtype not in _CPP_DTYPES]
    if bad:
        return f"its kernel computes float16/bfloat16/float32/float64 inputs, got {bad[0]}"
    return None


def _cpp_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """x, weight (contiguous) and bias (contiguous, or 0-element) in the promoted compute dtype (float32 at least)."""
    cdt = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    b = x.new_empty(0, dtype=cdt) if bias is None else bias.to(cdt).contiguous()
    return x.to(cdt), weight.to(cdt).contiguous(), b


def _cpp_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    from ._jit import cpu_kernels

    return cpu_kernels().causal_conv1d_fwd(*_cpp_inputs(x, weight, bias), silu, reverse).to(x.dtype)


def _cpp_backward(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                  silu: bool, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ._jit import cpu_kernels

    xc, wc, bc = _cpp_inputs(x, weight, bias)
    dx, dw, db = cpu_kernels().causal_conv1d_bwd(dout.to(xc.dtype), xc, wc, bc, silu, reverse)
    return dx.to(x.dtype), dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db


@torch.library.custom_op("dartmamba::causal_conv1d_cpp_fwd", mutates_args=())
def _conv_cpp_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    return _cpp_forward(x, weight, bias, silu, reverse)


def _like_input(x: Tensor) -> Tensor:
    """The kernel's output layout: channel-last when x's channels are adjacent (a slice of a (B, L, C) projection),
    so that the GEMM after the conv reads it without a copy; else as x (dense) or contiguous."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        return x.new_empty((x.shape[0], x.shape[2], x.shape[1])).transpose(1, 2)
    return torch.empty_like(x)


@_conv_cpp_fwd_op.register_fake
def _(x, weight, bias, silu, reverse):
    return _like_input(x)


@torch.library.custom_op("dartmamba::causal_conv1d_cpp_bwd", mutates_args=())
def _conv_cpp_bwd_op(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                     silu: bool, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _cpp_backward(dout, x, weight, bias, silu, reverse)


@_conv_cpp_bwd_op.register_fake
def _(dout, x, weight, bias, silu, reverse):
    return (_like_input(x), torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias) if bias is not None else x.new_empty(0))


register_flops(torch.ops.dartmamba.causal_conv1d_cpp_fwd, conv_flops)
register_flops(torch.ops.dartmamba.causal_conv1d_cpp_bwd, lambda dout, x, weight, *args, out_shape=None, **kw:
               2 * conv_flops(x, weight))    # dx and dweight: K multiply-adds per element each


def _conv_cpp_setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.reverse = silu, reverse


def _conv_cpp_grads(ctx, grad_out, backward) -> tuple:
    """The autograd gradients of both paths from ``backward`` (the custom op or the direct kernel call)."""
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = backward(grad_out, x, weight, bias, ctx.silu, ctx.reverse)
    return dx, dw, db if bias is not None else None, None, None


def _conv_cpp_autograd(ctx, grad_out):
    return _conv_cpp_grads(ctx, grad_out, _conv_cpp_bwd_op)


_conv_cpp_fwd_op.register_autograd(_conv_cpp_autograd, setup_context=_conv_cpp_setup_context)


class _ConvCppEager(torch.autograd.Function):
    """The same kernels as the custom ops above, called directly: what plain eager calls take (see
    :func:`dartmamba.ops._common.plain_eager`); both paths give the same bits (tested)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        output = _cpp_forward(x, weight, bias, silu, reverse)
        _conv_cpp_setup_context(ctx, (x, weight, bias, silu, reverse), output)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        return _conv_cpp_grads(ctx, grad_out, _cpp_backward)


def causal_conv1d_cpp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      activation: Optional[str] = "silu", *, reverse: bool = False) -> Tensor:
    """The ``"cpp"`` backend: dartmamba's C++ kernel. CPU tensors, any width K and any layout of x; ``reverse``
    (right to left) without flipping copies.

    Shapes as :func:`causal_conv1d_reference`; the result is in ``x.dtype``, channel-last when x's channels are
    adjacent (else laid out as ``x``), math in float32 (float64 for float64 inputs). Raises :class:`~dartmamba.backends.BackendUnavailableError` when the kernel cannot
    be built.
    """
    _check_args(x, weight, bias, activation)
    reason = _cpp_unavailable() or _cpp_unsupported(x, weight, bias)
    if reason is not None:
        raise backends.BackendUnavailableError(f"conv1d backend 'cpp' is not available: {reason}")
    return _conv_cpp_checked(x, weight, bias, activation, reverse=reverse)


def _conv_cpp_checked(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                      *, reverse: bool = False) -> Tensor:
    """:func:`causal_conv1d_cpp` after its checks (what the dispatcher calls). Plain eager calls that need no
    gradient call the kernel directly, plain eager calls that do take the direct autograd.Function, everything else
    the custom op; all three give the same bits."""
    silu = activation in ("silu", "swish")
    if not plain_eager(x, weight, bias):
        return _conv_cpp_fwd_op(x, weight, bias, silu, bool(reverse))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _ConvCppEager.apply(x, weight, bias, silu, bool(reverse))
    return _cpp_forward(x, weight, bias, silu, bool(reverse))


backends.register(
    "conv1d", "cuda", causal_conv1d_cuda, devices=("cuda",), available=_cuda_unavailable, supports=_cuda_unsupported,
    fallback_warning="causal-conv1d's CUDA kernel is unavailable, so CUDA tensors use F.conv1d; install "
                     "causal-conv1d (pip install 'dartmamba[cuda]')")
backends.register(
    "conv1d", "cpp", _conv_cpp_checked, devices=("cpu",), available=_cpp_unavailable, supports=_cpp_unsupported,
    fallback_warning="dartmamba's C++ causal conv1d for CPU tensors could not be built, so they use F.conv1d "
                     "(a C++ compiler and ninja are needed)")
backends.register("conv1d", "torch", causal_conv1d_torch, devices=backends.ANY_DEVICE)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                  backend: Optional[str] = None, *, reverse: bool = False) -> Tensor:
    """Depthwise causal conv1d + optional SiLU, through the backend registry (op ``"conv1d"``).

    Args:
        x: (batch, dim, L). weight: (dim, K). bias: optional (dim,).
        activation: ``"silu"`` (default) / ``"swish"`` or ``None``.
        reverse: right to left (anti-causal): the conv of ``x.flip(-1)``, flipped back.
        backend: ``None``/``"auto"`` (causal-conv1d for CUDA tensors when it imports and supports the width and
            dtypes, else ``"torch"``; the C++ kernel ``"cpp"`` for CPU tensors when it builds, else ``"torch"``),
            ``"cuda"``, ``"cpp"`` or ``"torch"``. The global setting is
            ``dartmamba.backends.set_backend("conv1d", ...)`` or ``DARTMAMBA_CONV1D_BACKEND``.

    Returns:
        (batch, dim, L) in ``x.dtype``.
    """
    _check_args(x, weight, bias, activation)
    return backends.dispatch("conv1d", x.device, x, weight, bias, activation, backend=backend, reverse=bool(reverse))
