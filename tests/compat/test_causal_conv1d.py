"""dartmamba.compat.causal_conv1d: the signature of causal_conv1d_fn and the package's op names, checked against
stand-ins (and against causal-conv1d itself where it imports)."""
import importlib.util

import pytest
import torch

from dartmamba.compat import causal_conv1d as shim


def test_the_expected_signature_passes_and_another_names_the_shim():
    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        pass

    shim.check_fn(causal_conv1d_fn)

    def renamed(x, w, bias=None, act=None):
        pass

    with pytest.raises(shim.CausalConv1dShimError, match=r"dartmamba.compat.causal_conv1d: causal_conv1d_fn takes "
                                                         r"\['x', 'w', 'bias', 'act'\]"):
        shim.check_fn(renamed)


def test_registered_ops_finds_the_packages_op_names():
    """Ops under the package's known names are found once registered (a stand-in op here)."""
    assert all(str(op).split(".")[0] in ("mamba_causal_conv1d", "causal_conv1d") for op in shim.registered_ops())
    if importlib.util.find_spec("causal_conv1d") is not None:
        pytest.skip("causal-conv1d is installed: its own ops would be registered")
    lib = torch.library.Library("mamba_causal_conv1d", "FRAGMENT")
    try:
        lib.define("causal_conv1d_fwd(Tensor x) -> Tensor")
        assert shim.registered_ops() == [torch.ops.mamba_causal_conv1d.causal_conv1d_fwd]
    finally:
        lib._destroy()


@pytest.mark.skipif(importlib.util.find_spec("causal_conv1d") is None, reason="causal-conv1d is not installed here")
def test_the_installed_causal_conv1d_fits_the_shim():
    shim.causal_conv1d_fn()
