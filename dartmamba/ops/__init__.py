"""Op backends of the Vim encoder (mamba-ssm layout: the fused kernels and the references they are tested against).

Each op has one entry point that dispatches through the registry in :mod:`dartmamba.backends` (``backend=``
argument, ``dartmamba.backends.set_backend(op, name)`` / ``use_backend``, or ``DARTMAMBA_<OP>_BACKEND``):

- :func:`selective_scan` (op ``"scan"``, module :mod:`.scan`): ``"cuda"`` (mamba-ssm), ``"cpp"`` (a C++ kernel for
  CPU tensors, built at first use), ``"cpu"`` (exact chunked torch scan, any device), ``"reference"``.
- :func:`causal_conv1d` (op ``"conv1d"``, module :mod:`.conv1d`): ``"cuda"`` (causal-conv1d), ``"cpp"`` (a C++
  kernel for CPU tensors, built with the scan's), ``"torch"``.
- :func:`rms_norm` / :class:`RMSNorm` (op ``"rmsnorm"``, module :mod:`.rmsnorm`): ``"triton"`` (mamba-ssm),
  ``"cpp"`` (a C++ forward for CPU calls that need no gradient, built with the scan's), ``"torch"``.

Nothing here imports CUDA extensions, mamba-ssm, causal-conv1d or triton, or builds anything, at import time.
"""
from . import conv1d as _conv1d, rmsnorm as _rmsnorm, scan as _scan
from .conv1d import causal_conv1d, causal_conv1d_cpp, causal_conv1d_reference
from .rmsnorm import RMSNorm, rms_norm, rms_norm_cpp, rms_norm_reference
from .scan import (scan_backward_macs, scan_forward_macs, selective_scan, selective_scan_cpp, selective_scan_cpu,
                   selective_scan_mamba_cuda, selective_scan_reference)

__all__ = [*_scan.__all__, *_conv1d.__all__, *_rmsnorm.__all__]
