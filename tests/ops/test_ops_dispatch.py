"""Backend choice for the scan, conv1d and rmsnorm ops: forcing, the environment, errors, CUDA fallback warnings."""
import importlib
import warnings

import pytest
import torch

from dartmamba import backends
from dartmamba.backends import BackendUnavailableError
from dartmamba.ops import causal_conv1d, rms_norm, selective_scan

ss = importlib.import_module("dartmamba.ops.selective_scan")


def scan_inputs():
    g = torch.Generator().manual_seed(0)
    u, delta = (torch.randn(1, 2, 5, generator=g) for _ in range(2))
    A = -torch.rand(2, 3, generator=g)
    B, C = (torch.randn(1, 3, 5, generator=g) for _ in range(2))
    return u, delta, A, B, C


def test_forcing_cuda_on_cpu_tensors_names_the_backend(restore_backends):
    with pytest.raises(BackendUnavailableError, match=r"scan backend 'cuda' runs on cuda tensors, got a cpu tensor"):
        selective_scan(*scan_inputs(), backend="cuda")
    with backends.use_backend("scan", "cuda"):
        with pytest.raises(BackendUnavailableError, match="'cuda'"):
            selective_scan(*scan_inputs())


def test_unknown_backend_lists_the_valid_ones(restore_backends):
    with pytest.raises(ValueError, match=r"\['auto', 'cuda', 'cpu', 'reference'\]"):
        selective_scan(*scan_inputs(), backend="triton")
    with pytest.raises(ValueError, match=r"\['auto', 'cuda', 'torch'\]"):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4), backend="cpu")
    with pytest.raises(ValueError, match=r"\['auto', 'triton', 'torch'\]"):
        rms_norm(torch.zeros(2, 4), torch.ones(4), backend="cuda")
    with pytest.raises(ValueError, match="'reference'"):
        backends.set_backend("scan", "fast")


def test_environment_forces_a_backend(monkeypatch, restore_backends):
    calls = []
    real = ss.selective_scan_reference
    monkeypatch.setattr(ss, "selective_scan_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("DARTMAMBA_SCAN_BACKEND", "reference")
    assert backends.choose("scan", "cpu") == "reference"
    selective_scan(*scan_inputs())
    assert calls == [1]
    monkeypatch.setenv("DARTMAMBA_SCAN_BACKEND", "cpu")
    selective_scan(*scan_inputs())
    assert calls == [1]
    monkeypatch.setenv("DARTMAMBA_SCAN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        selective_scan(*scan_inputs())
    monkeypatch.setenv("DARTMAMBA_SCAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DARTMAMBA_SCAN_BACKEND must be one of"):
        selective_scan(*scan_inputs())
    # an explicit argument wins over the environment
    monkeypatch.setenv("DARTMAMBA_CONV1D_BACKEND", "cuda")
    causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4), backend="torch")
    with pytest.raises(BackendUnavailableError):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4))


def test_cpu_tensors_default_to_the_portable_backends(restore_backends):
    assert backends.choose("scan", "cpu") == "cpu"
    assert backends.choose("conv1d", "cpu") == "torch"
    assert backends.choose("rmsnorm", "cpu") == "torch"


@pytest.mark.parametrize("op, fallback, package", [("scan", "cpu", "mamba-ssm"), ("conv1d", "torch", "causal-conv1d"),
                                                   ("rmsnorm", "torch", "mamba-ssm")])
def test_cuda_without_the_kernels_falls_back_with_one_warning(op, fallback, package, monkeypatch, restore_backends):
    """On a CUDA device whose extension does not import, "auto" takes the portable backend and warns once."""
    kernel = backends._OPS[op].backends[0]
    monkeypatch.setattr(kernel, "available", lambda: "cannot import it (ImportError: no module)")
    monkeypatch.setattr(backends, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.choose(op, "cuda") == fallback
        assert backends.choose(op, "cuda") == fallback
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert package in str(runtime[0].message)
    with pytest.raises(BackendUnavailableError, match="cannot import it"):
        backends.choose(op, "cuda", kernel.name)


def test_availability_checks_are_cached_and_never_import_at_module_import():
    import sys
    for name in ("selective_scan_cuda", "causal_conv1d", "mamba_ssm"):
        if name in sys.modules and not torch.cuda.is_available():
            pytest.fail(f"{name} imported on a machine without CUDA")
    assert ss._mamba_unavailable() is ss._mamba_unavailable()  # cached: one import attempt
