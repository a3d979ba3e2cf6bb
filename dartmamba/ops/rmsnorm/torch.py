"""The ``"torch"`` backend of RMSNorm: plain ops on any device (fused by Inductor under torch.compile)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ... import backends
from .._common import compute_dtype
from .checks import check_args, residual_dtype


def rms_norm_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                   eps: float = 1e-5, prenorm: bool = False,
                   residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Arguments and result as :func:`~dartmamba.ops.rms_norm`."""
    check_args(x, weight, bias, residual)
    cdt = compute_dtype(x, weight, bias, residual)
    total = x.to(cdt) if residual is None else x.to(cdt) + residual.to(cdt)
    out = total * torch.rsqrt(total.square().mean(dim=-1, keepdim=True) + eps) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    out = out.to(x.dtype)
    if not prenorm:
        return out
    return out, total.to(residual_dtype(x, residual, residual_in_fp32))


rms_norm_torch = backends.register("rmsnorm", "torch", rms_norm_torch, devices=backends.ANY_DEVICE)
