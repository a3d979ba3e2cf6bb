"""The ``"cuda"`` backend of the causal conv1d: the causal-conv1d package's ``causal_conv1d_fn`` (CUDA tensors,
kernel width 2..4; through :mod:`dartmamba.compat.causal_conv1d`), imported lazily. causal-conv1d >= 1.5.1
registers its kernels as custom ops, so torch.compile traces it. ``reverse`` and strided inputs are adapted."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import flop_registry

from ... import backends
from ...compat import causal_conv1d as _package
from .._common import register_flops
from .checks import check_args, conv_flops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _load():
    fn = _package.causal_conv1d_fn()
    for op in _package.registered_ops():        # FLOP formulas for the package's own custom ops
        if op not in flop_registry:
            register_flops(op, conv_flops)
    return fn


cuda_unavailable = backends.cuda_extension_check(_load, "causal-conv1d", "causal-conv1d")


def unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = "silu",
                **modes) -> Optional[str]:
    """Why causal-conv1d's kernel cannot take these arguments (None when it can)."""
    if not 2 <= weight.shape[1] <= 4:
        return f"its kernel supports widths 2..4, got weight of width {weight.shape[1]}"
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        return f"its kernel supports float16/bfloat16/float32, got x {x.dtype} and weight {weight.dtype}"
    return None


def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       activation: Optional[str] = "silu") -> Tensor:
    """causal-conv1d's ``causal_conv1d_fn``. CUDA tensors, width 2..4.

    Shapes as :func:`~dartmamba.ops.causal_conv1d`; result in ``x.dtype`` (the kernel accepts mixed x/weight
    dtypes; bias is cast to weight's dtype as it requires).
    """
    check_args(x, weight, bias, activation)
    reason = cuda_unavailable() or unsupported(x, weight)
    if reason is not None:
        raise backends.BackendUnavailableError(f"conv1d backend 'cuda' is not available: {reason}")
    if bias is None:
        # some causal-conv1d releases allocate the bias gradient with zeros_like(bias) and fail on None
        bias = weight.new_zeros(weight.shape[0])
    return _package.causal_conv1d_fn()(x, weight, bias.to(weight.dtype), activation=activation)


causal_conv1d_cuda = backends.register(
    "conv1d", "cuda", causal_conv1d_cuda, devices=("cuda",), available=cuda_unavailable, supports=unsupported,
    fallback_warning="causal-conv1d's CUDA kernel is unavailable, so CUDA tensors use dartmamba's Triton conv "
                     "(F.conv1d where triton is missing); install causal-conv1d (pip install 'dartmamba[cuda]')")
