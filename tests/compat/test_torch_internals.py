"""dartmamba.compat.torch_internals against the installed torch: each failure names the shim that broke."""
import inspect
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from dartmamba.compat import torch_internals as shim

SHIM = "dartmamba.compat.torch_internals"


def test_extension_build_directory_is_torchs(tmp_path, monkeypatch):
    """The shim over cpp_extension._get_build_directory: <TORCH_EXTENSIONS_DIR>/<name>, created."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = shim.extension_build_directory("dartmamba_probe")
    assert os.path.realpath(path) == os.path.realpath(tmp_path / "dartmamba_probe"), \
        f"{SHIM}.extension_build_directory: torch builds elsewhere now ({path})"
    assert os.path.isdir(path)


def test_flop_counter_hook_has_the_signature_the_shim_overrides():
    hook = getattr(FlopCounterMode, "_count_flops", None)
    assert hook is not None, f"{SHIM}.RecordingFlopCounterMode: FlopCounterMode._count_flops is gone"
    params = list(inspect.signature(hook).parameters)
    assert params == ["self", "func_packet", "out", "args", "kwargs"], \
        f"{SHIM}.RecordingFlopCounterMode: FlopCounterMode._count_flops now takes {params}"


_LIB = torch.library.Library("dartmamba_compat_test", "DEF")   # an op of no torch namespace, without a formula
_LIB.define("doubled(Tensor x) -> Tensor")
_LIB.impl("doubled", lambda x: x * 2, "CompositeExplicitAutograd")
_doubled = torch.ops.dartmamba_compat_test.doubled


def test_recording_counter_records_missing_formulas_and_takes_late_ones():
    """An op without a formula is recorded (not a silent 0); a formula registered during the count is used."""
    x = torch.ones(3, 4)
    ours = lambda op: "dartmamba_compat_test" in str(op)        # noqa: E731
    with shim.RecordingFlopCounterMode(ours, display=False) as counter:
        _doubled(x)
    assert counter.missing == {torch.ops.dartmamba_compat_test.doubled}, \
        f"{SHIM}.RecordingFlopCounterMode no longer sees each op: {counter.missing}"
    assert counter.get_total_flops() == 0
    with shim.RecordingFlopCounterMode(ours, display=False) as counter:
        register_flop_formula(torch.ops.dartmamba_compat_test.doubled)(
            lambda x_shape, out_shape=None, **kw: 7 * x_shape[0] * x_shape[1])
        _doubled(x)
    assert not counter.missing and counter.get_total_flops() == 7 * 12, \
        f"{SHIM}.RecordingFlopCounterMode did not pick up a formula registered during the count"
    assert counter.formula(torch.ops.dartmamba_compat_test.doubled) is not None


def test_fake_tensor_shims_make_and_recognise_fake_tensors():
    """Tensors made under fake_tensor_mode are fake (shapes, dtype, no values); real ones are not."""
    real = torch.randn(2, 3)
    with shim.fake_tensor_mode(allow_non_fake_inputs=True):
        fake = torch.empty(4, 5, dtype=torch.float64) + 1
        mixed = fake.sum() + real.sum()
    assert shim.is_fake(fake) and shim.is_fake(mixed), f"{SHIM}.fake_tensor_mode: tensors made in it are not fake"
    assert fake.shape == (4, 5) and fake.dtype == torch.float64
    assert not shim.is_fake(real), f"{SHIM}.is_fake: a real tensor is reported fake"
