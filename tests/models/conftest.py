import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled-model tests must not see graphs, guards or recompile counts left by earlier tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
