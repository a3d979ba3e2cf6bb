"""The causal conv1d's definition: an explicit sum over the K taps under plain autograd (the ``"reference"`` backend,
for tests; ``reverse`` is adapted)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import backends
from .checks import activate, check_args


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
    check_args(x, weight, bias, activation)
    cdt = torch.promote_types(x.dtype, weight.dtype)
    length = x.shape[-1]
    kernel = weight.shape[1]
    xp = F.pad(x.to(cdt), (kernel - 1, 0))                           # zeros before t = 0
    out = torch.zeros_like(xp[..., :length])
    for k in range(kernel):
        out = out + weight[:, k, None].to(cdt) * xp[..., k:k + length]
    if bias is not None:
        out = out + bias.to(cdt)[:, None]
    return activate(out, activation).to(x.dtype)


causal_conv1d_reference = backends.register("conv1d", "reference", causal_conv1d_reference,
                                            devices=backends.ANY_DEVICE, capabilities={"any_strides"})
