"""torch.compile: the ops trace with zero graph breaks, forward and backward, and compiled gradients match eager."""
import contextlib

import pytest
import torch
import torch._dynamo

from dartmamba.ops import causal_conv1d, rms_norm, selective_scan


def inputs():
    g = torch.Generator().manual_seed(0)
    b, d, length, n = 2, 4, 9, 3
    scan = [torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g),
            -torch.rand(d, n, generator=g) - 0.1, torch.randn(b, n, length, generator=g),
            torch.randn(b, n, length, generator=g), torch.randn(d, generator=g), torch.randn(b, d, length, generator=g),
            torch.randn(d, generator=g)]
    conv = [torch.randn(d, 4, generator=g), torch.randn(d, generator=g)]
    norm = [torch.rand(d, generator=g) + 0.5, torch.randn(b, length, d, generator=g)]
    return [t.requires_grad_() for t in scan + conv + norm]


def block(u, delta, A, B, C, D, z, delta_bias, conv_w, conv_b, norm_w, residual):
    """A miniature Vim mixer path: conv -> scan -> residual RMSNorm."""
    x = causal_conv1d(u, conv_w, conv_b, activation="silu")
    y = selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    out, res = rms_norm(y.transpose(1, 2), norm_w, residual=residual, prenorm=True, residual_in_fp32=True)
    return out.square().sum() + res.sum()


def forward_backward(*args):
    loss = block(*args)
    return (loss.detach(), *torch.autograd.grad(loss, args))


def test_forward_has_no_graph_breaks():
    explanation = torch._dynamo.explain(block)(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_forward_and_backward_have_no_graph_breaks():
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace torch.autograd.grad in dynamo")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(forward_backward)(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_gradients_match_eager():
    """fullgraph=True: one graph or an error; AOTAutograd traces the backward through the custom ops' fakes."""
    args = inputs()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(block(*args), args)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_backend_choice_for_cuda_traces_without_breaks(monkeypatch):
    """Choosing for a CUDA device probes the optional extensions (and may warn): the probes are not traced."""
    from dartmamba import backends
    monkeypatch.setattr(backends, "_WARNED", set())

    def pick(x):
        names = (backends.choose("scan", "cuda"), backends.choose("conv1d", "cuda"), backends.choose("rmsnorm", "cuda"))
        return x * 2 if "cuda" in names or "triton" in names else x + 1

    with pytest.warns(RuntimeWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        explanation = torch._dynamo.explain(pick)(torch.ones(3))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_vim_block_compiles_in_one_graph_with_the_layout_modes(grad):
    """A Vim block (RMSNorm, conv and scan right to left, the low-rank delta) compiles with fullgraph=True: under
    no_grad (the C++ RMSNorm, the scan forming delta in the kernel) and with autograd; compiled == eager."""
    from dartmamba.modules.bimamba import BiMambaMixer, VimBlock

    torch.manual_seed(0)
    block = VimBlock(16, BiMambaMixer(16, d_state=4, bimamba_impl="two_pass"))
    hidden = torch.randn(2, 7, 16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(grad):
        want = block(hidden)
        got = compiled(hidden)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
