"""Op backends of the Vim encoder, one package per op in mamba-ssm's shape (``checks``, ``reference``, ``torch``,
``cpp``, ``cuda`` / ``triton``: each backend one module that registers itself and declares its capabilities).

Each op has one entry point that dispatches through the registry in :mod:`dartmamba.backends` (``backend=``
argument, ``dartmamba.backends.set_backend(op, name)`` / ``use_backend``, or ``DARTMAMBA_<OP>_BACKEND``):

- :func:`selective_scan` (op ``"scan"``, package :mod:`.scan`): ``"cuda"`` (mamba-ssm), ``"cpp"`` (a C++ kernel
  for CPU tensors, built at first use), ``"torch"`` (exact chunked torch scan, any device), ``"reference"``.
- :func:`bimamba_scan` (op ``"bimamba_scan"``, package :mod:`.bimamba`): both scan directions of a Vim
  layer and their gated mean: ``"cpp"`` (one pass of the C++ scan, CPU calls that need no gradient), ``"torch"``
  (the two scans through the ``"scan"`` op).
- :func:`causal_conv1d` (op ``"conv1d"``, package :mod:`.conv1d`): ``"cuda"`` (causal-conv1d), ``"cpp"`` (a C++
  kernel for CPU tensors, built with the scan's), ``"torch"``, ``"reference"``.
- :func:`rms_norm` / :class:`RMSNorm` (op ``"rmsnorm"``, package :mod:`.rmsnorm`): ``"triton"`` (mamba-ssm),
  ``"cpp"`` (a C++ forward for CPU calls that need no gradient, built with the scan's), ``"torch"``,
  ``"reference"``.

Every backend is named after what it runs on or with ("torch": plain torch ops on any device). Nothing here imports
CUDA extensions, mamba-ssm, causal-conv1d or triton, or builds anything, at import time.
"""
from . import bimamba as _bimamba, conv1d as _conv1d, rmsnorm as _rmsnorm, scan as _scan
from .bimamba import ScanBranch, bimamba_scan, bimamba_scan_cpp, bimamba_scan_torch
from .conv1d import causal_conv1d, causal_conv1d_cpp, causal_conv1d_cuda, causal_conv1d_reference, causal_conv1d_torch
from .rmsnorm import RMSNorm, rms_norm, rms_norm_cpp, rms_norm_reference, rms_norm_torch, rms_norm_triton
from .scan import (scan_backward_macs, scan_forward_macs, selective_scan, selective_scan_cpp,
                   selective_scan_mamba_cuda, selective_scan_reference, selective_scan_torch)

__all__ = [*_scan.__all__, *_bimamba.__all__, *_conv1d.__all__, *_rmsnorm.__all__]
