"""Depthwise causal conv1d (+ optional SiLU), as in Mamba's mixer: one public entry point over the backends of
registry op ``"conv1d"``.

``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (K - 1) + k])`` with zeros before ``t = 0``.

Layout modes, declared as capabilities by the backends that handle them (the others get the generic adapter of
:mod:`dartmamba.ops._common`): ``"reverse"`` (``reverse=True``: right to left, anti-causal: ``out[t]`` reads
``x[t .. t + K - 1]``, zeros after the end; the conv of ``x.flip(-1)``, flipped back) and ``"any_strides"``.

Backends (env ``DARTMAMBA_CONV1D_BACKEND``), one module each, in preference order: ``"cuda"`` (:mod:`.cuda`,
causal-conv1d), ``"triton"`` (:mod:`.triton`, dartmamba's Triton kernels: CUDA without causal-conv1d, widths 2..4;
CPU tensors under ``TRITON_INTERPRET=1`` when allowed with :func:`dartmamba.backends.allow_device`), ``"cpp"``
(:mod:`.cpp`, dartmamba's C++ kernel for CPU tensors), ``"torch"`` (:mod:`.torch`, ``F.conv1d``, any device),
``"reference"`` (:mod:`.reference`, an explicit loop over the taps).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ... import backends
from .._common import reversing, unit_stride
from .checks import check_args

backends.declare_modes("conv1d", {"reverse": reversing((0,)), "any_strides": unit_stride((0,))})

# registration order is the preference order of "auto"
from .cuda import causal_conv1d_cuda  # noqa: E402
from .triton import causal_conv1d_triton  # noqa: E402
from .cpp import causal_conv1d_cpp  # noqa: E402
from .torch import causal_conv1d_torch  # noqa: E402
from .reference import causal_conv1d_reference  # noqa: E402

__all__ = ["causal_conv1d", "causal_conv1d_reference", "causal_conv1d_torch", "causal_conv1d_cpp",
           "causal_conv1d_cuda", "causal_conv1d_triton"]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                  backend: Optional[str] = None, *, reverse: bool = False) -> Tensor:
    """Depthwise causal conv1d + optional SiLU, through the backend registry (op ``"conv1d"``).

    Args:
        x: (batch, dim, L). weight: (dim, K). bias: optional (dim,).
        activation: ``"silu"`` (default) / ``"swish"`` or ``None``.
        reverse: right to left (anti-causal): the conv of ``x.flip(-1)``, flipped back.
        backend: ``None``/``"auto"`` (causal-conv1d for CUDA tensors when it imports and supports the width and
            dtypes, else dartmamba's Triton kernels, else ``"torch"``; the C++ kernel ``"cpp"`` for CPU tensors
            when it builds, else ``"torch"``), or a name to force. The global setting is
            ``dartmamba.backends.set_backend("conv1d", ...)`` or ``DARTMAMBA_CONV1D_BACKEND``.

    Returns:
        (batch, dim, L) in ``x.dtype``.
    """
    check_args(x, weight, bias, activation)
    return backends.dispatch("conv1d", x.device, x, weight, bias, activation, backend=backend, reverse=bool(reverse))
