"""Selective scan: the chunked CPU scan against the sequential reference (forward and every input gradient),
numerical stability, argument checks, and the mamba-ssm wrapper's plumbing against a stand-in extension."""
import types

import pytest
import torch
import torch.nn.functional as F

from dartmamba.backends import BackendUnavailableError
from dartmamba.ops import selective_scan, selective_scan_cpu, selective_scan_reference
from dartmamba.ops import scan as ss

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, length, dstate, dtype, seed, *, D=True, z=True, delta_bias=True, softplus=True):
    """Random scan inputs; with softplus off, delta and delta_bias are made positive directly (a negative step
    size makes the state grow exponentially)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = rand(batch, dim, length)
    delta = 0.5 * rand(batch, dim, length) - 1.0
    if not softplus:
        delta = F.softplus(delta)
    A = -torch.exp(rand(dim, dstate))
    inputs = [u, delta, A, rand(batch, dstate, length), rand(batch, dstate, length),
              rand(dim) if D else None, rand(batch, dim, length) if z else None,
              (0.3 * rand(dim)).abs() if delta_bias and not softplus else 0.3 * rand(dim) if delta_bias else None]
    return [t.to(dtype) if t is not None else None for t in inputs]


def run(fn, inputs, softplus, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves, delta_softplus=softplus)
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float64).to(out.dtype)
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves], grad_out


def assert_rel_close(actual, expected, rtol, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{what}: max abs error {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def compare_to_reference(inputs, softplus, rtol, what):
    out_r, grads_r, grad_out = run(selective_scan_reference, inputs, softplus)
    out_f, grads_f, _ = run(selective_scan_cpu, inputs, softplus, grad_out)
    assert_rel_close(out_f, out_r, rtol, f"{what}: out")
    for name, gf, gr in zip(NAMES, grads_f, grads_r):
        if gr is None:
            assert gf is None, f"{what}: d{name} should be None"
        else:
            assert_rel_close(gf, gr, rtol, f"{what}: d{name}")


OPTION_SETS = [
    dict(D=True, z=True, delta_bias=True, softplus=True),     # Vim's call
    dict(D=False, z=False, delta_bias=False, softplus=False),
    dict(D=True, z=False, delta_bias=True, softplus=False),
    dict(D=False, z=True, delta_bias=False, softplus=True),
]
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(2, 4, 1, 3), (2, 5, 7, 4), (2, 8, 197, 16)], ids=lambda s: f"L{s[2]}")
@pytest.mark.parametrize("options", OPTION_SETS, ids=["vim", "bare", "D-bias", "z-softplus"])
def test_matches_reference(dtype, shape, options, seeds):
    for seed in seeds[:2] if shape[2] > 100 else seeds:
        inputs = make_inputs(*shape, dtype, seed, **options)
        compare_to_reference(inputs, options["softplus"], TOLERANCE[dtype], f"seed {seed}")


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunk_boundaries(chunk, seeds, monkeypatch):
    """Small chunks: the carried state and adjoint cross many chunk boundaries, incl. a ragged last chunk."""
    monkeypatch.setattr(ss, "_chunk_len", lambda *args: chunk)
    for seed in seeds:
        inputs = make_inputs(2, 3, 23, 4, torch.float64, seed)
        compare_to_reference(inputs, True, 1e-11, f"chunk {chunk}, seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_long_sequence(dtype, seeds):
    inputs = make_inputs(1, 3, 1200, 4, dtype, seeds[0])
    compare_to_reference(inputs, True, TOLERANCE[dtype] * 5, f"L=1200, seed {seeds[0]}")


def test_extreme_decays_are_stable(seeds):
    """delta*|A| from 1e-9 (decay ~1, the state accumulates) to 1e4 (decay underflows to 0), mixed in one tensor."""
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        batch, dim, length, dstate = 2, 6, 300, 4
        inputs = make_inputs(batch, dim, length, dstate, torch.float64, seed, softplus=False, delta_bias=False)
        log_delta = torch.empty(batch, dim, length, dtype=torch.float64).uniform_(-6, 2, generator=g)
        inputs[1] = 10.0 ** log_delta
        log_a = torch.empty(dim, dstate, dtype=torch.float64).uniform_(-3, 2, generator=g)
        inputs[2] = -(10.0 ** log_a)
        inputs[2][0] = -1e-3                          # a channel with decays within 1e-9 of 1 ...
        inputs[1][:, 0] = 1e-6
        inputs[2][1] = -100.0                         # ... and one whose decays are exactly 0
        inputs[1][:, 1] = 100.0
        compare_to_reference(inputs, False, 1e-10, f"fp64, seed {seed}")
        # fp32: finite, and close to the fp64 truth
        inputs32 = [t.float() if t is not None else None for t in inputs]
        out64, grads64, grad_out = run(selective_scan_reference, inputs, False)
        out32, grads32, _ = run(selective_scan_cpu, inputs32, False, grad_out.float())
        assert_rel_close(out32.double(), out64, 1e-4, f"fp32 out, seed {seed}")
        for name, g32, g64 in zip(NAMES, grads32, grads64):
            if g64 is not None:
                assert_rel_close(g32.double(), g64, 1e-3, f"fp32 d{name}, seed {seed}")


def test_low_precision_inputs_compute_in_fp32(seeds):
    inputs = make_inputs(2, 4, 33, 4, torch.bfloat16, seeds[0])
    inputs[2] = inputs[2].float()                     # A, D, delta_bias stay fp32 in Vim
    inputs[5], inputs[7] = inputs[5].float(), inputs[7].float()
    out_r, grads_r, grad_out = run(selective_scan_reference, inputs, True)
    out_f, grads_f, _ = run(selective_scan_cpu, inputs, True, grad_out)
    assert out_f.dtype == torch.bfloat16
    assert_rel_close(out_f.float(), out_r.float(), 1e-2, "bf16 out")
    for name, t, gf, gr in zip(NAMES, inputs, grads_f, grads_r):
        assert gf.dtype == t.dtype, f"d{name} dtype"
        assert_rel_close(gf.float(), gr.float(), 2e-2, f"bf16 d{name}")


def test_non_contiguous_inputs(seeds):
    inputs = make_inputs(2, 5, 11, 3, torch.float64, seeds[0])
    u, delta, A, B, C, D, z, bias = inputs
    # the same values, laid out (batch, L, dim) / (batch, L, N) and transposed back, as Vim's projections give them
    flipped = [u.transpose(1, 2).contiguous().transpose(1, 2), delta.transpose(1, 2).contiguous().transpose(1, 2),
               A.t().contiguous().t(), B.transpose(1, 2).contiguous().transpose(1, 2),
               C.transpose(1, 2).contiguous().transpose(1, 2), D, z.transpose(1, 2).contiguous().transpose(1, 2),
               bias]
    assert not flipped[0].is_contiguous()
    expected = selective_scan_reference(*inputs, delta_softplus=True)
    torch.testing.assert_close(selective_scan_cpu(*flipped, delta_softplus=True), expected, rtol=1e-12, atol=1e-12)


def test_dispatch_runs_each_backend(seeds, restore_backends, monkeypatch):
    """Each name runs its own implementation (spied in the registry), and every CPU backend gives the reference's
    numbers."""
    from dartmamba import backends

    inputs = make_inputs(2, 3, 9, 2, torch.float64, seeds[0])
    expected = selective_scan_reference(*inputs, delta_softplus=True)
    ran = []
    for impl in backends.implementations("scan"):
        monkeypatch.setattr(impl, "fn", lambda *a, _fn=impl.fn, _name=impl.name: ran.append(_name) or _fn(*a))
    for name, runs in ((None, "cpu"), ("auto", "cpu"), ("cpu", "cpu"), ("reference", "reference")):
        ran.clear()
        torch.testing.assert_close(selective_scan(*inputs, delta_softplus=True, backend=name), expected)
        assert ran == [runs], (name, ran)


@pytest.mark.parametrize("bad, message", [
    (dict(u=torch.zeros(2, 3)), "u must have shape"),
    (dict(delta=torch.zeros(2, 3, 6)), "delta must have"),
    (dict(A=torch.zeros(4, 2)), "A must have shape"),
    (dict(B=torch.zeros(2, 2, 6)), "B must have shape"),
    (dict(C=torch.zeros(2, 2, 1, 5)), "C must have shape"),
    (dict(D=torch.zeros(4)), "D must have shape"),
    (dict(z=torch.zeros(2, 3, 4)), "z must have"),
    (dict(delta_bias=torch.zeros(3, 1)), "delta_bias must have shape"),
    (dict(A=torch.zeros(3, 2, dtype=torch.complex64)), "A must be real"),
    (dict(u=torch.zeros(2, 3, 5, dtype=torch.long)), "u must be a floating-point"),
])
def test_bad_arguments_are_named(bad, message):
    args = dict(u=torch.zeros(2, 3, 5), delta=torch.zeros(2, 3, 5), A=torch.zeros(3, 2), B=torch.zeros(2, 2, 5),
                C=torch.zeros(2, 2, 5), D=torch.zeros(3), z=torch.zeros(2, 3, 5), delta_bias=torch.zeros(3))
    args.update(bad)
    for fn in (selective_scan, selective_scan_cpu, selective_scan_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_custom_ops_pass_opcheck(seeds):
    u, delta, A, B, C, D, z, bias = make_inputs(2, 3, 10, 2, torch.float64, seeds[0])
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    torch.library.opcheck(torch.ops.dartmamba.selective_scan_cpu_fwd.default, (*leaves, True, 4))
    torch.library.opcheck(torch.ops.dartmamba.selective_scan_cpu_fwd.default, (u, delta, A, B, C, None, None, None,
                                                                               False, 8))


# ----------------------------------------------------------------------------------------------------------------
# mamba-ssm wrapper, against a stand-in for its compiled extension
# ----------------------------------------------------------------------------------------------------------------
def fake_mamba_extension(calls):
    """Implements the ``selective_scan_cuda.fwd/bwd`` contract of mamba-ssm 2.3 (argument order, dtypes, the
    (batch, 1, N, L) B/C layout, the x checkpoint tensor, the return tuples) with the reference scan on CPU."""

    def check(u, delta, A, B, C, D, z, delta_bias):
        assert u.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert delta.dtype == u.dtype and B.dtype == u.dtype and C.dtype == u.dtype
        assert A.dtype == torch.float32 and B.dim() == 4 and B.shape[1] == 1 and C.dim() == 4
        assert u.stride(-1) == 1 and delta.stride(-1) == 1 and B.stride(-1) == 1 and C.stride(-1) == 1
        for t in (D, delta_bias):
            assert t is None or t.dtype == torch.float32
        assert z is None or (z.dtype == u.dtype and z.stride(-1) == 1)

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        check(u, delta, A, B, C, D, z, delta_bias)
        calls.append("fwd")
        out = selective_scan_reference(u, delta, A, B[:, 0], C[:, 0], D, None, delta_bias, delta_softplus)
        batch, dim, length = u.shape
        x = torch.zeros(batch, dim, -(-length // 2048), 2 * A.shape[1])
        return [out, x] + ([out * F.silu(z.float()).to(out.dtype)] if z is not None else [])

    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
        check(u, delta, A, B, C, D, z, delta_bias)
        assert dout.dtype == u.dtype and x.shape[2] == -(-u.shape[2] // 2048)
        assert (out is not None) == (z is not None) and dz is None and recompute_out_z is False
        calls.append("bwd")
        # autograd is off inside a custom op's kernel: use the chunked scan's hand-written backward
        D_, z_, bias_ = (None if t is None else t.float() for t in (D, z, delta_bias))
        _, states = ss._scan_cpu_forward(u, delta, A, B[:, 0], C[:, 0], D_, z_, bias_, delta_softplus, 4096)
        du, ddelta, dA, dB, dC, dD, dz_, dbias = ss._scan_cpu_backward(
            dout, u, delta, A, B[:, 0], C[:, 0], D_, z_, bias_, states, delta_softplus, 4096)
        return [du, ddelta, dA, dB.unsqueeze(1), dC.unsqueeze(1), dD if D is not None else None,
                dbias if delta_bias is not None else None] + ([dz_.to(z.dtype)] if z is not None else [])

    return types.SimpleNamespace(fwd=fwd, bwd=bwd)


@pytest.fixture
def fake_mamba(monkeypatch):
    calls = []
    monkeypatch.setattr(ss, "_mamba_extension", lambda: fake_mamba_extension(calls))
    monkeypatch.setattr(ss, "_mamba_unavailable", lambda: None)
    return calls


@pytest.mark.parametrize("options", OPTION_SETS[:2], ids=["vim", "bare"])
def test_mamba_wrapper_plumbing(options, seeds, fake_mamba):
    inputs = make_inputs(2, 3, 12, 4, torch.float32, seeds[0], **options)
    out_r, grads_r, grad_out = run(selective_scan_reference, inputs, options["softplus"])
    out_c, grads_c, _ = run(ss.selective_scan_mamba_cuda, inputs, options["softplus"], grad_out)
    assert fake_mamba == ["fwd", "bwd"]
    assert_rel_close(out_c, out_r, 1e-6, "out")
    for name, gc, gr in zip(NAMES, grads_c, grads_r):
        if gr is not None:
            assert_rel_close(gc, gr, 1e-5, f"d{name}")


def test_mamba_wrapper_casts_for_the_kernel(seeds, fake_mamba):
    """bf16 activations with fp32 A/D/bias (Vim under autocast), fp64 B: cast as the kernel wants, grads come
    back in each input's dtype."""
    inputs = make_inputs(2, 3, 12, 4, torch.float32, seeds[0])
    inputs[0], inputs[1], inputs[6] = (inputs[i].bfloat16() for i in (0, 1, 6))
    inputs[3] = inputs[3].double()
    out, grads, _ = run(ss.selective_scan_mamba_cuda, inputs, True)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]


def test_mamba_missing_raises_when_called_directly():
    if ss._mamba_unavailable() is None:
        pytest.skip("mamba-ssm is installed here")
    inputs = make_inputs(1, 2, 3, 2, torch.float32, 0)
    with pytest.raises(BackendUnavailableError, match="scan backend 'cuda' is not available"):
        ss.selective_scan_mamba_cuda(*inputs)


# ----------------------------------------------------------------------------------------------------------------
# On a GPU with mamba-ssm
# ----------------------------------------------------------------------------------------------------------------
def _mamba_ready():
    return torch.cuda.is_available() and ss._mamba_unavailable() is None


@pytest.mark.gpu
@pytest.mark.skipif(not _mamba_ready(), reason="needs CUDA and mamba-ssm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 197, 2500])
def test_cuda_kernel_matches_cpu_scan(dtype, length, seeds):
    inputs = make_inputs(2, 64, length, 16, torch.float32, seeds[0])
    for i in (0, 1, 3, 4, 6):
        inputs[i] = inputs[i].to(dtype)
    cuda_inputs = [t.cuda() for t in inputs]
    out_c, grads_c, grad_out = run(lambda *a, **k: selective_scan(*a, **k, backend="cuda"), cuda_inputs, True)
    out_f, grads_f, _ = run(selective_scan_cpu, cuda_inputs, True, grad_out)
    rtol_out, rtol_grad = (1e-4, 1e-3) if dtype == torch.float32 else (3e-2, 3e-2)
    assert out_c.dtype == dtype
    assert_rel_close(out_c.float(), out_f.float(), rtol_out, "out")
    for name, gc, gf in zip(NAMES, grads_c, grads_f):
        assert gc.dtype == gf.dtype
        assert_rel_close(gc.float(), gf.float(), rtol_grad, f"d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not _mamba_ready(), reason="needs CUDA and mamba-ssm")
def test_cuda_kernel_compiles_without_graph_breaks(seeds):
    inputs = [t.cuda().requires_grad_() for t in make_inputs(2, 64, 197, 16, torch.float32, seeds[0])]

    def loss(*args):
        return selective_scan(*args, delta_softplus=True, backend="cuda").square().sum()

    explanation = torch._dynamo.explain(loss)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(loss(*inputs), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
