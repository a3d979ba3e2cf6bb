"""Test-wide setup. TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported, so
Triton kernels run on CPU tensors here (numpy underneath; tiny shapes only)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """A fresh, reported seed per test (pass -p no:randomly style reproduction via DARTMAMBA_TEST_SEED)."""
    value = int(os.environ.get("DARTMAMBA_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value
