"""The clamp conventions the backward kernels mirror: asked of autograd at first use, never at import, and the same
answer whatever grad mode, inference mode or tracing the first caller is in."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

pytest.importorskip("triton")

from dartmamba_kernels._launch import clamp_passes  # noqa: E402
from tests.helpers import RECORD_AUTOGRAD_CALLS  # noqa: E402


def _autograd_answer(value: float, lo: float, hi: float | None) -> bool:
    x = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    y = x.clamp_min(lo) if hi is None else x.clamp(lo, hi)
    (grad,) = torch.autograd.grad(y, x)
    return bool(grad.item() != 0.0)


CASES = [(0.0, 0.0, 1.0), (1.0, 1.0, None), (0.5, 0.0, 1.0), (-1.0, 0.0, 1.0), (2.0, 1.0, None)]


@pytest.mark.parametrize("value, lo, hi", CASES)
def test_clamp_passes_is_autogrades_answer(value, lo, hi):
    assert clamp_passes(value, lo, hi) == _autograd_answer(value, lo, hi)
    # off the boundary there is nothing to decide: inside passes, outside does not
    if value != lo:
        assert clamp_passes(value, lo, hi) == (value > lo and (hi is None or value < hi))


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "fake_trace"])
def test_the_first_caller_state_does_not_change_the_answer(context):
    """The first call may come from a backward traced with fake tensors (torch.compile), or from code under
    no_grad / inference_mode: the probe runs in its own thread, so it still asks autograd with real tensors."""
    expected = {case: _autograd_answer(*case) for case in CASES}
    clamp_passes.cache_clear()
    if context == "fake_trace":
        answers = {}

        def traced(x):
            answers.update({case: clamp_passes(*case) for case in CASES})
            return x * 2

        make_fx(traced, tracing_mode="fake")(torch.ones(3))
    else:
        with torch.no_grad() if context == "no_grad" else torch.inference_mode():
            answers = {case: clamp_passes(*case) for case in CASES}
    assert answers == expected


def test_importing_the_kernels_runs_no_autograd():
    """Importing dartmamba_kernels.resample / .geometry defines kernels and registers ops; the convention is not
    asked until a kernel runs (then once, cached)."""
    code = RECORD_AUTOGRAD_CALLS + textwrap.dedent("""
        import dartmamba_kernels.resample, dartmamba_kernels.geometry
        from dartmamba_kernels._launch import clamp_passes
        assert autograd_calls == [] and clamp_passes.cache_info().currsize == 0, (autograd_calls,
                                                                                   clamp_passes.cache_info())
        clamp_passes(0.0, 0.0, 1.0)
        clamp_passes(0.0, 0.0, 1.0)
        assert len(autograd_calls) == 1 and autograd_calls[0].startswith("torch.autograd.grad"), autograd_calls
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
