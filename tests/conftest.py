"""Test-wide setup. TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported, so
Triton kernels run on CPU tensors here (numpy underneath; tiny shapes only)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Frozen MobileNetV3 scorer trunks default to timm's pretrained ImageNet weights from the Hub, which tests cannot
# download: they start random unless a test asks otherwise (the tests of the pretrained path set trunk_weights, or
# run with their own Hub cache in a subprocess).
os.environ.setdefault("DARTMAMBA_TRUNK_WEIGHTS", "random")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """The test's fresh seed, reported in its properties (replay a failure with DARTMAMBA_TEST_SEED=<seed>); torch's
    global generator is seeded with it. The one seed source of the suite."""
    value = int(os.environ.get("DARTMAMBA_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def seeds(seed):
    """Three seeds for tests that draw several independent inputs: ``seed``, ``seed + 1``, ``seed + 2``."""
    return [seed, seed + 1, seed + 2]


@pytest.fixture
def compile_offline_for_sm90():
    """Run a script that compiles Triton kernels for sm_90 with the real compiler (TTIR -> PTX -> cubin with the
    bundled ptxas; no GPU needed, TRITON_INTERPRET unset) and assert it printed "compiled": catches what the
    interpreter lets through. Skips where triton has no NVIDIA backend."""
    import subprocess
    import sys

    def run(script: str) -> None:
        try:
            from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        except Exception as exc:  # pragma: no cover - non-NVIDIA triton builds
            pytest.skip(f"no NVIDIA backend in this triton: {exc}")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]

    return run


@pytest.fixture
def restore_backends():
    """Undo any backend a test forces with ``dartmamba.backends.set_backend``."""
    from dartmamba import backends

    saved = {op: backends._OPS[op].forced for op in backends.ops()}
    yield
    for op, forced in saved.items():
        backends._OPS[op].forced = forced
