"""Shims over mamba-ssm's internals: its compiled ``selective_scan_cuda`` extension and its private Triton layer norm.

- :func:`selective_scan_extension`: imports ``selective_scan_cuda`` and reads, once, how many arguments its pybind
  entry points ``fwd`` / ``bwd`` take (from their docstrings): newer builds take one extra optional trailing argument.
  :func:`scan_call` then passes ``None`` for it, with no try-and-retry on pybind's error text.
- :func:`layer_norm_kernels`: ``mamba_ssm.ops.triton.layer_norm._layer_norm_fwd`` / ``_layer_norm_bwd`` (private;
  the signatures of mamba-ssm 2.x), checked once for the keyword arguments dartmamba passes.

Nothing here imports mamba-ssm at import time. tests/compat/test_mamba_ssm.py checks the expectations.
"""
from __future__ import annotations

import importlib
import inspect
import re

_LOADED: dict = {}

# arguments dartmamba passes (the trailing optional one of newer builds excluded)
SCAN_FWD_ARGS = 9      # u, delta, A, B, C, D, z, delta_bias, delta_softplus
SCAN_BWD_ARGS = 14     # u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z
LAYER_NORM_FWD_KWARGS = ("residual_dtype", "is_rms_norm")
LAYER_NORM_BWD_KWARGS = ("dresidual", "has_residual", "is_rms_norm")


class MambaSsmShimError(RuntimeError):
    """mamba-ssm changed under a shim of dartmamba.compat.mamba_ssm."""


def pybind_arity(fn) -> int:
    """The number of arguments of a pybind11 function, read from its docstring's first signature line
    (``name(arg0: at::Tensor, ..., arg8: bool) -> ...``)."""
    doc = (getattr(fn, "__doc__", None) or "").strip()
    match = re.match(r"\w+\((.*)\)\s*->", doc.splitlines()[0] if doc else "")
    if match is None:
        raise MambaSsmShimError(f"dartmamba.compat.mamba_ssm: cannot read the signature of "
                                f"{getattr(fn, '__name__', fn)!r} from its docstring {doc[:120]!r}")
    params, depth, count = match.group(1), 0, 1 if match.group(1).strip() else 0
    for ch in params:
        depth += ch in "[(<"
        depth -= ch in "])>"
        count += ch == "," and depth == 0
    return count


def _extra_args(fn, expected: int, name: str) -> int:
    arity = pybind_arity(fn)
    if arity not in (expected, expected + 1):
        raise MambaSsmShimError(f"dartmamba.compat.mamba_ssm: selective_scan_cuda.{name} takes {arity} arguments; "
                                f"the shim knows {expected}, or {expected + 1} with a trailing optional one; "
                                f"update the shim for this mamba-ssm")
    return arity - expected


def check_extension(ext) -> dict[str, int]:
    """The extra trailing arguments (0 or 1) of ``ext.fwd`` and ``ext.bwd``; raises :class:`MambaSsmShimError`
    naming this shim when the arity is neither."""
    return {"fwd": _extra_args(ext.fwd, SCAN_FWD_ARGS, "fwd"), "bwd": _extra_args(ext.bwd, SCAN_BWD_ARGS, "bwd")}


def selective_scan_extension():
    """mamba-ssm's compiled ``selective_scan_cuda`` module, imported and checked on first use."""
    if "ext" not in _LOADED:
        ext = importlib.import_module("selective_scan_cuda")
        _LOADED["extra"] = check_extension(ext)
        _LOADED["ext"] = ext
    return _LOADED["ext"]


def scan_call(name: str, *args):
    """``selective_scan_cuda.<name>(*args)``, with ``None`` for the trailing optional argument of newer builds."""
    ext = selective_scan_extension()
    return getattr(ext, name)(*args, *([None] * _LOADED["extra"][name]))


def check_layer_norm(fwd, bwd) -> None:
    """Raise :class:`MambaSsmShimError` naming this shim when the private kernels lack a keyword dartmamba passes."""
    for fn, kwargs in ((fwd, LAYER_NORM_FWD_KWARGS), (bwd, LAYER_NORM_BWD_KWARGS)):
        params = inspect.signature(fn).parameters
        missing = [k for k in kwargs if k not in params]
        if missing:
            raise MambaSsmShimError(f"dartmamba.compat.mamba_ssm: mamba_ssm.ops.triton.layer_norm."
                                    f"{fn.__name__} no longer takes {missing}; update the shim for this mamba-ssm")


def layer_norm_kernels():
    """mamba-ssm's private ``(_layer_norm_fwd, _layer_norm_bwd)``, imported and checked on first use."""
    if "layer_norm" not in _LOADED:
        module = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
        fwd, bwd = module._layer_norm_fwd, module._layer_norm_bwd
        check_layer_norm(fwd, bwd)
        _LOADED["layer_norm"] = (fwd, bwd)
    return _LOADED["layer_norm"]
