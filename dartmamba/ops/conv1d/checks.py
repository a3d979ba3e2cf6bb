"""The causal conv1d's argument checks, its FLOP formula and its activation."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "silu", "swish")


def check_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> None:
    """Raise ValueError naming the first argument that does not fit."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
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


def activate(y: Tensor, activation: Optional[str]) -> Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def conv_flops(x, weight, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a depthwise causal conv (input shapes in): K multiply-adds per output element."""
    return 2 * x[0] * x[1] * x[2] * weight[-1]


def conv_bwd_flops(dout, x, weight, *args, out_shape=None, **kwargs) -> int:
    """dx and dweight: K multiply-adds per element each."""
    return 2 * conv_flops(x, weight)
