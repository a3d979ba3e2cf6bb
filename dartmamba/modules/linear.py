"""Linear layers with a faster GEMM shape on CPU, the parameters and results of ``nn.Linear``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class OutputPaddedLinear(nn.Linear):
    """``nn.Linear`` whose CPU product runs with the output features padded with zero rows to a multiple of
    ``pad_to``; returns the first ``out_features`` columns (a view) with the values of ``F.linear``.

    The parameters are nn.Linear's (same names and shapes: checkpoints and hooks see a plain Linear). Why: MKL's
    sgemm runs Vim's x_proj, (B L, d_inner) @ (d_inner, dt_rank + 2 d_state) = (., 384) @ (384, 44) for Vim-Ti,
    about 25-35 % slower at 1 thread and 20 % at 2 than the same product with 48 outputs (AMD EPYC Zen 4;
    docs/benchmarks.md); 4 more output rows cost less than the odd width. Padded only for inference (CPU inputs,
    grad mode off: ``torch.no_grad`` / ``torch.inference_mode``): with autograd, and on other devices, it is
    ``F.linear`` as it is, so training and a FLOP count (which runs with grad mode on) see the logical product.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pad_to: int = 16,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 1:
            raise ValueError(f"pad_to must be an int >= 1, got {pad_to!r}")
        self.pad_to = pad_to

    def padded_features(self) -> int:
        """out_features rounded up to a multiple of pad_to."""
        return -(-self.out_features // self.pad_to) * self.pad_to

    def forward(self, x: Tensor) -> Tensor:
        extra = self.padded_features() - self.out_features
        if extra == 0 or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        weight = F.pad(self.weight, (0, 0, 0, extra))
        bias = None if self.bias is None else F.pad(self.bias, (0, extra))
        return F.linear(x, weight, bias)[..., :self.out_features]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pad_to={self.pad_to}"
