"""The Triton causal conv1d (backend "triton") against the reference: widths 2..4, SiLU or none, bias or none,
channel-first and channel-last inputs (read in place, output laid out as the input), every dtype, every gradient;
the custom ops under opcheck and torch.compile; what it refuses. The sm_80 / sm_90 compile of its kernels is in
tests/ops/test_triton_scan.py (one compile script for both ops).

On CPU the kernels run under TRITON_INTERPRET=1 with [32 channels, 16 steps] tiles, so dim 40 and L 37 give ragged
tiles in both directions."""
import contextlib

import pytest
import torch

pytest.importorskip("triton")

from dartmamba import backends  # noqa: E402
from dartmamba.ops import causal_conv1d  # noqa: E402
from dartmamba.ops.conv1d import triton as conv_triton  # noqa: E402


def _interpreted() -> bool:
    try:
        return conv_triton.interpreted()
    except Exception:  # pragma: no cover - no triton
        return False


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _interpreted(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _interpreted(), reason="compiled kernels needed: run with TRITON_INTERPRET=0")]),
]
# relative to the largest reference value (float64 on the same rounded inputs): one ulp or so of the result dtype
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@contextlib.contextmanager
def on_triton(device):
    with backends.allow_device("conv1d", "triton", "cpu") if device == "cpu" else contextlib.nullcontext():
        yield


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def conv_run(x, weight, bias, activation, grad_out, backend, device="cpu"):
    leaves = [t.detach().to(device).clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    if x.stride(1) == 1:                      # keep channel-last inputs channel-last on the device
        leaves[0] = x.detach().transpose(1, 2).to(device).contiguous().transpose(1, 2).requires_grad_()
    with on_triton(device):
        out = causal_conv1d(*leaves, activation=activation, backend=backend)
    out.backward(grad_out.to(device, out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


CASES = [  # (dtype, width, channel_last, bias, activation)
    (torch.float32, 4, True, True, "silu"),
    (torch.float32, 2, False, False, None),
    (torch.float16, 3, False, True, "silu"),
    (torch.float16, 4, True, False, None),
    (torch.bfloat16, 2, True, True, "silu"),
    (torch.bfloat16, 3, False, True, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, width, channel_last, has_bias, activation", CASES,
                         ids=[f"{str(c[0])[6:]}-K{c[1]}-{'BLD' if c[2] else 'BDL'}-{'bias' if c[3] else 'nobias'}-"
                              f"{c[4]}" for c in CASES])
def test_matches_reference_every_gradient(device, dtype, width, channel_last, has_bias, activation, seed):
    g = torch.Generator().manual_seed(seed)
    batch, dim, length = 2, 40, 37
    if channel_last:                          # a (batch, L, dim) projection viewed as (batch, dim, L)
        x = torch.randn(batch, length, dim, generator=g).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, generator=g).to(dtype)
    weight = (0.5 * torch.randn(dim, width, generator=g)).to(dtype)
    bias = torch.randn(dim, generator=g).to(dtype) if has_bias else None
    grad_out = torch.randn(batch, dim, length, generator=g).to(dtype)
    want, want_grads = conv_run(x.double(), weight.double(), None if bias is None else bias.double(), activation,
                                grad_out.double(), "reference")
    got, got_grads = conv_run(x, weight, bias, activation, grad_out, "triton", device)
    assert got.dtype == dtype
    if channel_last:
        assert got.stride(1) == 1 and got_grads[0].stride(1) == 1, "the output and dx are laid out as x"
    errors = {"out": rel_err(got.cpu(), want)}
    for name, t, gf, gr in zip(("x", "weight", "bias"), (x, weight, bias), got_grads, want_grads):
        if t is not None:
            assert gf.dtype == t.dtype and torch.isfinite(gf).all()
            errors[f"d{name}"] = rel_err(gf.cpu(), gr)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if v > TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]:g}: {bad}"


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck_and_compile_in_one_graph(device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 20, 8, generator=g).transpose(1, 2).to(device).requires_grad_()
    weight = torch.randn(8, 4, generator=g).to(device).requires_grad_()
    bias = torch.randn(8, generator=g).to(device).requires_grad_()
    torch.library.opcheck(conv_triton._fwd_op, (x, weight, bias, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(conv_triton._bwd_op, (torch.randn(1, 8, 20, device=device), x, weight, bias, True),
                          test_utils=("test_schema", "test_faketensor"))

    def loss(x, w, b):
        return causal_conv1d(x, w, b, backend="triton", reverse=True).square().sum()

    with on_triton(device):
        want = torch.autograd.grad(loss(x, weight, bias), (x, weight, bias))
        got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(x, weight, bias),
                                  (x, weight, bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_refuses_widths_and_dtypes_it_does_not_take(restore_backends):
    """Widths other than 2..4 and float64: "auto" passes the kernel over (on CUDA: to F.conv1d), forcing names the
    reason."""
    x = torch.zeros(1, 2, 5)
    assert conv_triton.unsupported(x, torch.zeros(2, 5)) == "its kernels support widths 2..4, got weight of width 5"
    assert conv_triton.unsupported(x.double(), torch.zeros(2, 4)) == ("its kernels compute float16/bfloat16/float32 "
                                                                      "inputs, got torch.float64")
    assert conv_triton.unsupported(x, torch.zeros(2, 4)) is None
    if _interpreted():
        with backends.allow_device("conv1d", "triton", "cpu"):
            with pytest.raises(backends.BackendUnavailableError,
                               match="conv1d backend 'triton' cannot take these inputs: its kernels support widths"):
                causal_conv1d(x, torch.zeros(2, 5), backend="triton")
    assert {b.name: b.capabilities for b in backends.implementations("conv1d")}["triton"] == {"any_strides"}
