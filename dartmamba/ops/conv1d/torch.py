"""The ``"torch"`` backend of the causal conv1d: ``F.conv1d`` with groups=dim and left padding (any device, traced
by dynamo as plain ops; ``reverse`` is adapted)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import backends
from .checks import activate, check_args


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        activation: Optional[str] = "silu") -> Tensor:
    """``F.conv1d`` with groups=dim, padding K-1, truncated to L. Any device.

    Shapes as :func:`~dartmamba.ops.causal_conv1d`; result in ``x.dtype``.
    """
    check_args(x, weight, bias, activation)
    cdt = torch.promote_types(x.dtype, weight.dtype)
    dim, kernel = weight.shape
    length = x.shape[-1]
    y = F.conv1d(x.to(cdt), weight.to(cdt).unsqueeze(1), None if bias is None else bias.to(cdt),
                 padding=kernel - 1, groups=dim)[..., :length]
    return activate(y, activation).to(x.dtype)


causal_conv1d_torch = backends.register("conv1d", "torch", causal_conv1d_torch, devices=backends.ANY_DEVICE,
                                        capabilities={"any_strides"})
