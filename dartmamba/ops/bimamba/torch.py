"""The ``"torch"`` backend of ``bimamba_scan``: the two directions through the ``"scan"`` op and their mean.

The definition the C++ pass is tested against, and what runs wherever it does not (gradients, CUDA, export): each
scan is dispatched by the ``"scan"`` op (mamba-ssm's kernel, Triton, the C++ scan or torch, as forced there).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from ..scan import selective_scan


def bimamba_scan_torch(forward, backward, z: Tensor, delta_softplus: bool = False) -> Tensor:
    """0.5 * (selective_scan(forward, z) + selective_scan(backward, z, reverse=True)); arguments as
    :func:`~dartmamba.ops.bimamba.bimamba_scan`."""
    y_forward = selective_scan(*forward[:6], z=z, delta_bias=forward.delta_bias, delta_softplus=delta_softplus,
                               delta_proj=forward.delta_proj)
    y_backward = selective_scan(*backward[:6], z=z, delta_bias=backward.delta_bias, delta_softplus=delta_softplus,
                                reverse=True, delta_proj=backward.delta_proj)
    # without autograd the sum goes into y_backward, still in cache from the scan; the same bits either way
    y = torch.add(y_forward, y_backward) if y_backward.requires_grad else y_backward.add_(y_forward)
    return y.mul_(0.5)


bimamba_scan_torch = backends.register("bimamba_scan", "torch", bimamba_scan_torch, devices=backends.ANY_DEVICE)
