"""Shims over the causal-conv1d package: its public ``causal_conv1d_fn`` (the keyword dartmamba passes is checked
once) and the custom ops its releases register under differing names (for FLOP formulas).

Nothing here imports causal-conv1d at import time. tests/compat/test_causal_conv1d.py checks the expectations.
"""
from __future__ import annotations

import importlib
import inspect

import torch

_LOADED: dict = {}

# (namespace, op) pairs causal-conv1d releases register as custom ops (>= 1.5.1; names differ between releases)
OP_NAMES = tuple((ns, op) for ns in ("mamba_causal_conv1d", "causal_conv1d")
                 for op in ("causal_conv1d_fwd", "causal_conv1d_bwd"))


class CausalConv1dShimError(RuntimeError):
    """causal-conv1d changed under the shim dartmamba.compat.causal_conv1d."""


def check_fn(fn) -> None:
    """Raise :class:`CausalConv1dShimError` naming this shim when ``fn`` does not take (x, weight, bias,
    activation=...)."""
    params = list(inspect.signature(fn).parameters)
    if params[:3] != ["x", "weight", "bias"] or "activation" not in params:
        raise CausalConv1dShimError(f"dartmamba.compat.causal_conv1d: causal_conv1d_fn takes {params}, the shim "
                                    f"expects (x, weight, bias, ..., activation=...); update the shim")


def causal_conv1d_fn():
    """causal-conv1d's ``causal_conv1d_fn``, imported and checked on first use."""
    if "fn" not in _LOADED:
        fn = importlib.import_module("causal_conv1d").causal_conv1d_fn
        check_fn(fn)
        _LOADED["fn"] = fn
    return _LOADED["fn"]


def registered_ops() -> list:
    """The custom ops (OpOverloadPackets) of :data:`OP_NAMES` that exist in this process."""
    found = []
    for namespace, name in OP_NAMES:
        try:
            found.append(getattr(getattr(torch.ops, namespace), name))
        except (AttributeError, RuntimeError):
            continue
    return found
