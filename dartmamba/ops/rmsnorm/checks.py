"""RMSNorm's argument checks and the helpers its backends share."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> None:
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


def residual_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool) -> torch.dtype:
    base = residual.dtype if residual is not None else x.dtype
    return torch.promote_types(base, torch.float32) if residual_in_fp32 else base


def rows(t: Tensor) -> Tensor:
    """(..., dim) -> (rows, dim) with unit stride along dim (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()
