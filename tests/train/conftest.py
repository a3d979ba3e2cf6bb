"""Fixtures of the training tests (helpers live in train_helpers.py)."""
from __future__ import annotations

import pytest

from tests.train.train_helpers import write_recipe


@pytest.fixture
def tiny_recipe(tmp_path) -> str:
    return write_recipe(tmp_path / "tiny.yaml")


@pytest.fixture(scope="session")
def dist_group():
    """A single-rank gloo process group in this process (what ``python train/train.py`` sets up)."""
    pytest.importorskip("deepspeed")
    from dartmamba_train.distributed import init_distributed

    return init_distributed()
