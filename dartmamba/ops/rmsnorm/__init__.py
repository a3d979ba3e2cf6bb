"""RMSNorm with a fused residual add (mamba-ssm ``rms_norm_fn`` semantics), with one dispatch point.

``rms_norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32)``::

    s   = x + residual                       (just x when residual is None; summed in float32 or wider)
    out = s / sqrt(mean(s**2, -1) + eps) * weight (+ bias)          -> in x.dtype
    returns out, or (out, s) when prenorm; s is stored in the residual dtype:
    float32 (or wider) when residual_in_fp32, else residual.dtype (x.dtype when residual is None).

The normalisation uses the unrounded sum, as mamba-ssm's kernel does. One deliberate difference from
mamba-ssm: with ``residual_in_fp32=True`` and a low-precision ``residual``, mamba-ssm keeps the residual in
residual.dtype; here it is always float32, so both backends agree.

Backends (registry op ``"rmsnorm"``, see :mod:`dartmamba.backends`; env ``DARTMAMBA_RMSNORM_BACKEND``), one module
each, in preference order (no layout modes):

- ``"triton"`` (:mod:`.triton`): mamba-ssm's Triton layer-norm kernels, CUDA only.
- ``"cpp"`` (:mod:`.cpp`): a C++ forward for CPU tensors (one pass over each row), for calls that need no gradient.
- ``"torch"`` (:mod:`.torch`): plain ops on any device (fused by Inductor under torch.compile).
- ``"reference"`` (:mod:`.reference`): the definition, step by step.
"""
from __future__ import annotations

from typing import Optional, Union

import torch as _torch          # the name "torch" is this package's torch backend module once it is imported
from torch import Tensor, nn

from ... import backends
from .checks import check_args

# registration order is the preference order of "auto"
from .triton import rms_norm_triton  # noqa: E402
from .cpp import rms_norm_cpp  # noqa: E402
from .torch import rms_norm_torch  # noqa: E402
from .reference import rms_norm_reference  # noqa: E402

__all__ = ["rms_norm", "rms_norm_reference", "rms_norm_torch", "rms_norm_cpp", "rms_norm_triton", "RMSNorm"]


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
    check_args(x, weight, bias, residual)
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
        self.weight = nn.Parameter(_torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, prenorm: bool = False,
                residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        return rms_norm(x, self.weight, None, residual, self.eps, prenorm, residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
