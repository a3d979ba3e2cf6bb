"""Shims over torch APIs that are not public: the only places dartmamba uses them.

- :func:`extension_build_directory`: ``torch.utils.cpp_extension._get_build_directory`` (where ``load`` builds an
  extension: torch's extension root, ``TORCH_EXTENSIONS_DIR``), used by :mod:`dartmamba.ops._jit` to tell a fresh
  build from a cached one and to stage the sources.
- :class:`RecordingFlopCounterMode`: ``FlopCounterMode`` with its private per-op hook ``_count_flops`` overridden,
  to record custom ops that have no FLOP formula (a silent 0 otherwise) and to pick up formulas registered after
  the count began (an op whose module is imported lazily, during the count). torch has no public hook for either.
- :func:`is_fake` and :func:`fake_tensor_mode`: ``torch._subclasses.fake_tensor`` (tensors without values: the
  tokenizer's input checks skip value checks on them; the FLOP counter runs models on them).

tests/compat/test_torch_internals.py checks each against the installed torch.
"""
from __future__ import annotations

from typing import Callable

from torch.utils.flop_counter import FlopCounterMode, flop_registry


class TorchInternalsShimError(RuntimeError):
    """torch changed under a shim of dartmamba.compat.torch_internals."""


def extension_build_directory(name: str) -> str:
    """The directory ``torch.utils.cpp_extension.load(name=name)`` builds in (created if missing)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError as exc:
        raise TorchInternalsShimError("dartmamba.compat.torch_internals: torch.utils.cpp_extension."
                                      "_get_build_directory is gone; update the shim") from exc
    return _get_build_directory(name, verbose=False)


def is_fake(tensor) -> bool:
    """Whether ``tensor`` is a fake tensor (shapes and dtypes, no values)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(tensor)


def fake_tensor_mode(**kwargs):
    """A ``FakeTensorMode(**kwargs)`` context: tensors made inside it are fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(**kwargs)


class RecordingFlopCounterMode(FlopCounterMode):
    """FlopCounterMode that records, in ``missing``, every op with no formula for which ``needs_formula(op)`` is
    true, and takes formulas registered (``register_flop_formula``) after it began."""

    def __init__(self, needs_formula: Callable[[object], bool], **kwargs):
        super().__init__(**kwargs)
        self.missing: set = set()
        self._needs_formula = needs_formula

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet not in self.flop_registry:
            if func_packet in flop_registry:
                self.flop_registry[func_packet] = flop_registry[func_packet]
            elif self._needs_formula(func_packet):
                self.missing.add(func_packet)
        return super()._count_flops(func_packet, out, args, kwargs)

    def formula(self, op):
        """The formula this count uses for ``op`` (None when it has none)."""
        return self.flop_registry.get(op)
