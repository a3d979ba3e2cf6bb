"""RMSNorm's definition, written out step by step under plain autograd (the ``"reference"`` backend, for tests)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ... import backends
from .._common import compute_dtype
from .checks import check_args, residual_dtype


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
    check_args(x, weight, bias, residual)
    cdt = compute_dtype(x, weight, bias, residual)
    total = x.to(cdt)
    if residual is not None:
        total = total + residual.to(cdt)
    mean_square = (total * total).mean(dim=-1, keepdim=True)
    out = total / torch.sqrt(mean_square + eps) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    out = out.to(x.dtype)
    return (out, total.to(residual_dtype(x, residual, residual_in_fp32))) if prenorm else out


rms_norm_reference = backends.register("rmsnorm", "reference", rms_norm_reference, devices=backends.ANY_DEVICE)
