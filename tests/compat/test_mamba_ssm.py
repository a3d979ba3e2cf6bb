"""dartmamba.compat.mamba_ssm: the arity read from pybind's docstrings and the private layer-norm kernels' keywords,
checked against stand-ins with mamba-ssm's signatures (and against mamba-ssm itself where it imports)."""
import importlib.util
import types

import pytest

from dartmamba.compat import mamba_ssm as shim


def pybind(name, arity, doc=None):
    """A stand-in for a pybind11 function: its docstring names its arguments as pybind writes them."""
    params = ", ".join(f"arg{i}: Optional[at::Tensor]" if i % 3 == 2 else f"arg{i}: at::Tensor"
                       for i in range(arity))
    calls = []

    def fn(*args):
        calls.append(args)
        return args

    fn.__doc__ = doc if doc is not None else f"{name}({params}) -> List[at::Tensor]\n"
    fn.__name__ = name
    fn.calls = calls
    return fn


def test_pybind_arity_reads_the_docstring():
    assert shim.pybind_arity(pybind("fwd", 9)) == 9
    assert shim.pybind_arity(pybind("fwd", 0)) == 0
    nested = pybind("bwd", 0, doc="bwd(arg0: Dict[str, Tuple[int, int]], arg1: bool) -> None")
    assert shim.pybind_arity(nested) == 2
    with pytest.raises(shim.MambaSsmShimError, match="dartmamba.compat.mamba_ssm: cannot read the signature"):
        shim.pybind_arity(pybind("fwd", 0, doc="no signature here"))


@pytest.mark.parametrize("extra", [0, 1])
def test_scan_call_passes_the_trailing_optional_argument_of_newer_builds(extra, monkeypatch):
    ext = types.SimpleNamespace(fwd=pybind("fwd", shim.SCAN_FWD_ARGS + extra),
                                bwd=pybind("bwd", shim.SCAN_BWD_ARGS + extra))
    assert shim.check_extension(ext) == {"fwd": extra, "bwd": extra}
    monkeypatch.setitem(shim._LOADED, "ext", ext)
    monkeypatch.setitem(shim._LOADED, "extra", shim.check_extension(ext))
    args = tuple(range(shim.SCAN_FWD_ARGS))
    assert shim.scan_call("fwd", *args) == args + (None,) * extra


def test_an_unknown_arity_names_the_shim():
    ext = types.SimpleNamespace(fwd=pybind("fwd", shim.SCAN_FWD_ARGS + 2), bwd=pybind("bwd", shim.SCAN_BWD_ARGS))
    with pytest.raises(shim.MambaSsmShimError, match=r"dartmamba.compat.mamba_ssm: selective_scan_cuda.fwd takes "
                                                     r"11 arguments; the shim knows 9"):
        shim.check_extension(ext)


def _layer_norm_fwd(x, weight, bias, eps, residual=None, x1=None, weight1=None, bias1=None, dropout_p=0.0,
                    rowscale=None, out_dtype=None, residual_dtype=None, is_rms_norm=False, return_dropout_mask=False):
    """mamba-ssm 2.x's signature."""


def _layer_norm_bwd(dy, x, weight, bias, eps, mean, rstd, dresidual=None, dy1=None, weight1=None, bias1=None,
                    seeds=None, dropout_p=0.0, rowscale=None, has_residual=False, has_x1=False, is_rms_norm=False,
                    x_dtype=None, recompute_output=False):
    """mamba-ssm 2.x's signature."""


def test_layer_norm_keywords_are_checked():
    shim.check_layer_norm(_layer_norm_fwd, _layer_norm_bwd)

    def renamed(x, weight, bias, eps, residual=None, out_dtype=None, residual_dtype=None, rms=False):
        pass

    with pytest.raises(shim.MambaSsmShimError, match=r"dartmamba.compat.mamba_ssm: mamba_ssm.ops.triton.layer_norm"
                                                     r".renamed no longer takes \['is_rms_norm'\]"):
        shim.check_layer_norm(renamed, _layer_norm_bwd)


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba-ssm is not installed here")
def test_the_installed_mamba_ssm_fits_the_shim():
    shim.layer_norm_kernels()
    if importlib.util.find_spec("selective_scan_cuda") is not None:
        shim.selective_scan_extension()
