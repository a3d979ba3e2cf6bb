"""Pieces shared by the op packages: the compute dtype, FLOP registration, and the generic adapters of the ops'
layout modes (see :func:`dartmamba.backends.declare_modes`).

An op declares its modes once; a backend registered without one gets the adapter here wrapped around it:

- ``"reverse"`` (:func:`reversing`): right to left as the op of the sequences flipped along L, flipped back;
- ``"low_rank_delta"`` (:func:`expanding_low_rank`): a (batch, R, L) factor and a (dim, R) projection multiplied
  out to (batch, dim, L) first (under autograd);
- ``"any_strides"`` (:func:`unit_stride`): the sequences made unit-stride along L first.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, Optional

import torch
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


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """True when autograd records this call: grad mode on and some input requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _positional_params(fn: Callable) -> tuple[tuple[str, object], ...]:
    """(name, default) of ``fn``'s positional-or-keyword parameters (through ``functools.wraps`` layers)."""
    return tuple((p.name, None if p.default is p.empty else p.default)
                 for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD)


def _as_positional(params, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Positional arguments passed by keyword moved into ``args`` (absent ones take their defaults), so that the
    adapters can find the sequences by position. The dispatcher passes them positionally: nothing to do then."""
    if not kwargs or all(name not in kwargs for name, _ in params[len(args):]):
        return args, kwargs
    kwargs = dict(kwargs)
    return (*args, *(kwargs.pop(name, default) for name, default in params[len(args):])), kwargs


def _flip(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.flip(-1)


def reversing(sequences: tuple[int, ...]) -> Callable[[Callable], Callable]:
    """The adapter of ``"reverse"``: the positional arguments at ``sequences`` (tensors (..., L) or None) are
    flipped along L, and so is the output (the first output when there are several)."""
    def adapter(fn: Callable) -> Callable:
        params = _positional_params(fn)

        @functools.wraps(fn)
        def run(*args, reverse: bool = False, **kwargs):
            if not reverse:
                return fn(*args, **kwargs)
            args, kwargs = _as_positional(params, args, kwargs)
            args = [_flip(a) if i in sequences else a for i, a in enumerate(args)]
            result = fn(*args, **kwargs)
            if isinstance(result, tuple):
                return (result[0].flip(-1), *result[1:])
            return result.flip(-1)
        return run
    return adapter


def full_from_low_rank(proj: Tensor, factor: Tensor) -> Tensor:
    """proj (dim, R) @ factor (batch, R, L) -> (batch, dim, L) in their promoted dtype, laid out channel-last (a GEMM
    over the factor's rows, which are contiguous when it is a slice of a (batch * L, R + ...) projection)."""
    dtype = torch.promote_types(proj.dtype, factor.dtype)
    return torch.matmul(factor.transpose(1, 2).to(dtype), proj.t().to(dtype)).transpose(1, 2)


def expanding_low_rank(position: int, keyword: str,
                       check: Callable[..., None] | None = None) -> Callable[[Callable], Callable]:
    """The adapter of ``"low_rank_delta"``: with ``keyword=proj`` (dim, R), the positional argument at ``position``
    is the (batch, R, L) factor and becomes ``proj @ factor`` (batch, dim, L) before the call. ``check(*args,
    proj)`` is the op's argument check (raising the op's own errors for a projection that does not fit)."""
    def adapter(fn: Callable) -> Callable:
        params = _positional_params(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            proj = kwargs.pop(keyword, None)
            if proj is None:
                return fn(*args, **kwargs)
            args, kwargs = _as_positional(params, args, kwargs)
            if check is not None:
                check(*args, proj)
            args = (*args[:position], full_from_low_rank(proj, args[position]), *args[position + 1:])
            return fn(*args, **kwargs)
        return run
    return adapter


def unit_stride(sequences: tuple[int, ...]) -> Callable[[Callable], Callable]:
    """The adapter of ``"any_strides"``: the positional arguments at ``sequences`` (tensors (..., L) or None) are
    made unit-stride along L (a copy only where they are not)."""
    def adapter(fn: Callable) -> Callable:
        params = _positional_params(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            args, kwargs = _as_positional(params, args, kwargs)
            args = [a.contiguous() if i in sequences and a is not None and a.stride(-1) != 1 else a
                    for i, a in enumerate(args)]
            return fn(*args, **kwargs)
        return run
    return adapter


class TritonKernels:
    """The Triton kernels of one op's ``"triton"`` backend: ``module`` is imported at first use (importing dartmamba
    never imports triton); ``probe`` names one of its kernels, whose type says whether they run interpreted."""

    def __init__(self, module: str, probe: str):
        self.module, self.probe = module, probe

    @functools.cached_property
    def kernels(self):
        return importlib.import_module(self.module)

    def interpreted(self) -> bool:
        """Whether the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` when they were imported)."""
        return type(getattr(self.kernels, self.probe)).__name__ == "InterpretedFunction"

    def unavailable(self) -> Optional[str]:
        """Why the kernels cannot run here, or None."""
        try:
            self.kernels
        except Exception as exc:  # a missing or broken triton must not break the other backends
            return f"cannot import triton ({type(exc).__name__}: {exc}); pip install triton"
        if not self.interpreted() and not torch.cuda.is_available():
            return "CUDA is not available (and TRITON_INTERPRET=1 was not set for the interpreter)"
        return None
