"""Pieces shared by the op modules: the compute dtype, and FLOP formulas registered beside each custom op."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.utils._python_dispatch
from torch import Tensor


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32 (half and bfloat16 inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def register_flops(op, formula: Callable[..., int], part: str | None = None) -> None:
    """Register the FLOP formula of a custom op with torch's ``FlopCounterMode`` (see :mod:`dartmamba.flops`).

    ``formula(*input_shapes, out_shape=None, **kwargs)`` returns FLOPs in torch's convention (2 per multiply-add);
    ``part`` names the part of a :class:`~dartmamba.flops.FlopReport` the op's work belongs to (``"scan"``,
    ``"resample"``, ``"posembed"``; ``None``: wherever the module it runs in belongs).
    """
    from torch.utils.flop_counter import register_flop_formula

    formula.flop_part = part          # functools.wraps in torch's shape wrapper carries it over
    register_flop_formula(op)(formula)


def zero_flops(*args, out_shape=None, **kwargs) -> int:
    """The formula of ops whose work the counting convention leaves out (normalisation, the partition)."""
    return 0


def plain_eager(*tensors) -> bool:
    """True for a plain eager call: not traced or compiled, no dispatch or torch-function mode, no torch.func
    transform, plain tensors or parameters (None for absent ones). The C++ CPU kernels take a direct
    autograd.Function then, and their custom ops (which torch.compile, fake tensors and the FLOP counter see)
    otherwise: the custom ops' Python dispatch costs tens of microseconds per call."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)     # a parameter comes in as itself, e.g. bias.float()
