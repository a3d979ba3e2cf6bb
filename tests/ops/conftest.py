"""Fixtures of the op tests (self-contained: nothing here relies on the repository-wide conftest)."""
import os
import random

import pytest


@pytest.fixture
def seeds(request):
    """Three fresh seeds per test (reported in the test's properties and in assertion messages); set
    DARTMAMBA_TEST_SEED to replay a failure deterministically."""
    if os.environ.get("DARTMAMBA_TEST_SEED"):
        base = int(os.environ["DARTMAMBA_TEST_SEED"])
        values = [base, base + 1, base + 2]
    else:
        values = [random.SystemRandom().randrange(2**31) for _ in range(3)]
    request.node.user_properties.append(("seeds", values))
    return values


@pytest.fixture
def restore_backends():
    """Undo any forced backend a test sets."""
    from dartmamba import backends
    saved = {op: entry.forced for op, entry in backends._OPS.items()}
    yield
    for op, forced in saved.items():
        backends._OPS[op].forced = forced
