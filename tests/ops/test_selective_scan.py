"""Selective scan: the fast scans (the chunked torch scan "torch" and the C++ kernel "cpp") against the sequential
reference (forward, every input gradient, grouped B/C, the last state), numerical stability, argument checks, the
kernel's build fallback, and the mamba-ssm wrapper's plumbing against a stand-in extension."""
import types
from pathlib import Path
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dartmamba import backends
from dartmamba.backends import BackendUnavailableError
from dartmamba.compat import mamba_ssm as compat_mamba
from dartmamba.ops import selective_scan, selective_scan_cpp, selective_scan_reference, selective_scan_torch
from dartmamba.ops import scan as ss
from dartmamba.ops._jit import cpu_kernels, cpu_kernels_unavailable
from dartmamba.ops.scan import cpp as scan_cpp, cuda as scan_cuda, torch as scan_torch

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def cpp_or_skip():
    reason = cpu_kernels_unavailable()
    if reason is not None:
        pytest.skip(f"the C++ scan kernel is not available here: {reason}")


def fast_scan(name):
    """The fast scan under test (the C++ kernel skips where it cannot be built)."""
    if name == "cpp":
        cpp_or_skip()
        return selective_scan_cpp
    return selective_scan_torch


FAST = ("torch", "cpp")


def make_inputs(batch, dim, length, dstate, dtype, seed, *, D=True, z=True, delta_bias=True, softplus=True,
                groups=None):
    """Random scan inputs; with softplus off, delta and delta_bias are made positive directly (a negative step
    size makes the state grow exponentially). ``groups``: B and C as (batch, groups, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = rand(batch, dim, length)
    delta = 0.5 * rand(batch, dim, length) - 1.0
    if not softplus:
        delta = F.softplus(delta)
    A = -torch.exp(rand(dim, dstate))
    bc = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    inputs = [u, delta, A, rand(*bc), rand(*bc),
              rand(dim) if D else None, rand(batch, dim, length) if z else None,
              (0.3 * rand(dim)).abs() if delta_bias and not softplus else 0.3 * rand(dim) if delta_bias else None]
    return [t.to(dtype) if t is not None else None for t in inputs]


def run(fn, inputs, softplus, grad_out=None, grad_last=None):
    """Forward and backward of ``fn``; with ``grad_last`` the last state is returned and gets that gradient too."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    if grad_last is None:
        out = fn(*leaves, delta_softplus=softplus)
        last = None
    else:
        out, last = fn(*leaves, delta_softplus=softplus, return_last_state=True)
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float64).to(out.dtype)
    if last is None:
        out.backward(grad_out)
    else:
        torch.autograd.backward([out, last], [grad_out, grad_last.to(last.dtype)])
        last = last.detach()
    return out.detach(), [t.grad if t is not None else None for t in leaves], grad_out, last


def assert_rel_close(actual, expected, rtol, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: {actual.dtype} {tuple(actual.shape)} vs {expected.dtype} {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-30, f"{what}: max abs error {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def compare_to_reference(fn, inputs, softplus, rtol, what, last_state=False):
    grad_last = None
    if last_state:
        u, A = inputs[0], inputs[2]
        grad_last = torch.randn(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    out_r, grads_r, grad_out, last_r = run(selective_scan_reference, inputs, softplus, grad_last=grad_last)
    out_f, grads_f, _, last_f = run(fn, inputs, softplus, grad_out, grad_last=grad_last)
    assert_rel_close(out_f, out_r, rtol, f"{what}: out")
    if last_state:
        assert_rel_close(last_f, last_r, rtol, f"{what}: last state")
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


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(2, 4, 1, 3), (2, 5, 7, 4), (2, 8, 197, 16)], ids=lambda s: f"L{s[2]}")
@pytest.mark.parametrize("options", OPTION_SETS, ids=["vim", "bare", "D-bias", "z-softplus"])
def test_matches_reference(backend, dtype, shape, options, seeds):
    fn = fast_scan(backend)
    for seed in seeds[:2] if shape[2] > 100 else seeds:
        inputs = make_inputs(*shape, dtype, seed, **options)
        compare_to_reference(fn, inputs, options["softplus"], TOLERANCE[dtype], f"seed {seed}")


# (batch, dim, L, N, groups): the C++ kernel runs blocks of 16 (float) / 8 (double) channels of one group with the
# common state sizes compiled in: partial and several blocks per group, every compiled N and a run-time one
GROUPED_SHAPES = [(1, 2, 1, 3, 2), (2, 6, 7, 4, 2), (3, 40, 33, 5, 2), (2, 34, 19, 8, 1), (1, 36, 12, 32, 3),
                  (2, 16, 29, 16, 4), (2, 768, 17, 16, 2)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", GROUPED_SHAPES, ids=lambda s: f"b{s[0]}d{s[1]}L{s[2]}N{s[3]}G{s[4]}")
def test_grouped_and_last_state_match_reference(backend, dtype, shape, seeds):
    """Grouped B/C (channel d reads group d // (dim / G)) and the last state, forward and every gradient, with the
    last state's gradient flowing in."""
    fn = fast_scan(backend)
    batch, dim, length, dstate, groups = shape
    for seed, options in zip(seeds, OPTION_SETS[:3]):
        inputs = make_inputs(batch, dim, length, dstate, dtype, seed, groups=groups, **options)
        compare_to_reference(fn, inputs, options["softplus"], TOLERANCE[dtype], f"seed {seed}", last_state=True)


def test_grouped_reference_is_the_scan_of_each_group(seeds):
    """The reference's grouping is the definition: each group's channels scanned with that group's B and C."""
    inputs = make_inputs(2, 6, 9, 3, torch.float64, seeds[0], groups=3)
    out, last = selective_scan_reference(*inputs, delta_softplus=True, return_last_state=True)
    for g in range(3):
        part, part_last = selective_scan_reference(*scan_torch._group_args(g, 2, *inputs), delta_softplus=True,
                                                   return_last_state=True)
        torch.testing.assert_close(out[:, 2 * g:2 * g + 2], part, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(last[:, 2 * g:2 * g + 2], part_last, rtol=1e-13, atol=1e-15)
    # and the last state is the state the output reads: y_{L-1} = <C_{L-1}, h_{L-1}> without D and z
    bare = make_inputs(2, 6, 9, 3, torch.float64, seeds[1], D=False, z=False, groups=3)
    out, last = selective_scan_reference(*bare, delta_softplus=True, return_last_state=True)
    C = bare[4].repeat_interleave(2, dim=1)                      # (batch, dim, N, L)
    torch.testing.assert_close(out[..., -1], (last * C[..., -1]).sum(-1))


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunk_boundaries(chunk, seeds, monkeypatch):
    """Small chunks: the carried state and adjoint cross many chunk boundaries, incl. a ragged last chunk."""
    monkeypatch.setattr(scan_torch, "_chunk_len", lambda *args: chunk)
    for seed in seeds:
        inputs = make_inputs(2, 3, 23, 4, torch.float64, seed)
        compare_to_reference(selective_scan_torch, inputs, True, 1e-11, f"chunk {chunk}, seed {seed}",
                             last_state=True)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_long_sequence(backend, dtype, seeds):
    inputs = make_inputs(1, 3, 1200, 4, dtype, seeds[0])
    compare_to_reference(fast_scan(backend), inputs, True, TOLERANCE[dtype] * 5, f"L=1200, seed {seeds[0]}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_saturated_gates_and_step_sizes_match_reference(backend, dtype, seeds):
    """Gates z and pre-softplus step sizes far outside randn's range (|value| up to ~400: sigmoid(z) and
    exp(-z) under- and overflow, softplus passes large deltas through), as an untrained or diverging model makes
    them: finite, and the reference's values."""
    fn = fast_scan(backend)
    for seed in seeds:
        inputs = make_inputs(2, 37, 23, 4, torch.float64, seed)
        inputs[6] = inputs[6] * 100.0                       # z: silu of -400 .. 400
        inputs[1] = inputs[1] * 5.0 + 3.0 * torch.sign(inputs[1])
        compare_to_reference(fn, [t.to(dtype) if t is not None else None for t in inputs], True,
                             TOLERANCE[dtype], f"seed {seed}")


@pytest.mark.parametrize("backend", FAST)
def test_extreme_decays_are_stable(backend, seeds):
    """delta*|A| from 1e-9 (decay ~1, the state accumulates) to 1e4 (decay underflows to 0), mixed in one tensor."""
    fn = fast_scan(backend)
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
        compare_to_reference(fn, inputs, False, 1e-10, f"fp64, seed {seed}")
        # fp32: finite, and close to the fp64 truth
        inputs32 = [t.float() if t is not None else None for t in inputs]
        out64, grads64, grad_out, _ = run(selective_scan_reference, inputs, False)
        out32, grads32, _, _ = run(fn, inputs32, False, grad_out.float())
        assert_rel_close(out32.double(), out64, 1e-4, f"fp32 out, seed {seed}")
        for name, g32, g64 in zip(NAMES, grads32, grads64):
            if g64 is not None:
                assert_rel_close(g32.double(), g64, 1e-3, f"fp32 d{name}, seed {seed}")


@pytest.mark.parametrize("backend", FAST)
def test_low_precision_inputs_compute_in_fp32(backend, seeds):
    fn = fast_scan(backend)
    inputs = make_inputs(2, 4, 33, 4, torch.bfloat16, seeds[0])
    inputs[2] = inputs[2].float()                     # A, D, delta_bias stay fp32 in Vim
    inputs[5], inputs[7] = inputs[5].float(), inputs[7].float()
    out_r, grads_r, grad_out, _ = run(selective_scan_reference, inputs, True)
    out_f, grads_f, _, _ = run(fn, inputs, True, grad_out)
    assert out_f.dtype == torch.bfloat16
    assert_rel_close(out_f.float(), out_r.float(), 1e-2, "bf16 out")
    for name, t, gf, gr in zip(NAMES, inputs, grads_f, grads_r):
        assert gf.dtype == t.dtype, f"d{name} dtype"
        assert_rel_close(gf.float(), gr.float(), 2e-2, f"bf16 d{name}")


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_inputs(backend, seeds):
    fn = fast_scan(backend)
    inputs = make_inputs(2, 5, 11, 3, torch.float64, seeds[0])
    u, delta, A, B, C, D, z, bias = inputs
    # the same values, laid out (batch, L, dim) / (batch, L, N) and transposed back, as Vim's projections give them
    flipped = [u.transpose(1, 2).contiguous().transpose(1, 2), delta.transpose(1, 2).contiguous().transpose(1, 2),
               A.t().contiguous().t(), B.transpose(1, 2).contiguous().transpose(1, 2),
               C.transpose(1, 2).contiguous().transpose(1, 2), D, z.transpose(1, 2).contiguous().transpose(1, 2),
               bias]
    assert not flipped[0].is_contiguous()
    expected = selective_scan_reference(*inputs, delta_softplus=True)
    torch.testing.assert_close(fn(*flipped, delta_softplus=True), expected, rtol=1e-12, atol=1e-12)
    # gradients of strided inputs come back in the inputs' shapes, matching the reference's
    compare_to_reference(fn, flipped, True, 1e-11, "strided")


def flipped_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """The definition of reverse=True: the reference scan of every sequence input flipped along L, flipped back."""
    flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
    result = selective_scan_reference(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias,
                                      delta_softplus, return_last_state)
    return (result[0].flip(-1), result[1]) if return_last_state else result.flip(-1)


@pytest.mark.parametrize("backend", FAST + ("dispatch",))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "G2"])
def test_reverse_is_the_scan_of_the_flipped_sequences(backend, dtype, groups, seeds):
    """reverse=True (right to left, as the backward branch of Vim's mixer runs) equals the reference scan of the
    flipped sequences, flipped back: output, last state (the one after t = 0) and every gradient, with the last
    state's gradient flowing in; channel-last u / delta / z for every other seed (the C++ kernel reverses in place,
    whatever the layout)."""
    if backend == "dispatch":
        fn = selective_scan
    else:
        fn = fast_scan(backend)
    for seed, options in zip(seeds, OPTION_SETS):
        inputs = make_inputs(2, 40, 37, 16, dtype, seed, groups=groups, **options)
        if seed % 2 == 0:
            for i in (0, 1, 6):
                if inputs[i] is not None:
                    inputs[i] = inputs[i].transpose(1, 2).contiguous().transpose(1, 2)
        grad_last = torch.randn(2, 40, 16, dtype=torch.float64)
        out_r, grads_r, grad_out, last_r = run(flipped_reference, inputs, options["softplus"], grad_last=grad_last)
        out_f, grads_f, _, last_f = run(lambda *a, **k: fn(*a, **k, reverse=True), inputs, options["softplus"],
                                        grad_out, grad_last=grad_last)
        what = f"seed {seed}"
        assert_rel_close(out_f, out_r, TOLERANCE[dtype], f"{what}: out")
        assert_rel_close(last_f, last_r, TOLERANCE[dtype], f"{what}: last state")
        for name, gf, gr in zip(NAMES, grads_f, grads_r):
            if gr is not None:
                assert_rel_close(gf, gr, TOLERANCE[dtype], f"{what}: d{name}")


def low_rank_inputs(dtype, seed, groups=None, options=OPTION_SETS[0], rank=5):
    """Scan inputs (batch 2, dim 40, L 37, N 16) and a low-rank delta: delta_proj (dim, R) and the factor
    (batch, R, L), a strided slice of a (batch * L, R + 9) projection, as Vim's mixer passes dt."""
    inputs = make_inputs(2, 40, 37, 16, dtype, seed, groups=groups, **options)
    g = torch.Generator().manual_seed(seed + 7)
    rows = torch.randn(2 * 37, rank + 9, generator=g, dtype=torch.float64)[:, 3:3 + rank]
    factor = rows.reshape(2, 37, rank).transpose(1, 2).to(dtype)
    delta_proj = (0.4 * torch.randn(40, rank, generator=g, dtype=torch.float64)).to(dtype)
    return inputs, factor, delta_proj


LOW_RANK_SCANS = {"torch": selective_scan_torch, "cpp": selective_scan_cpp, "reference": selective_scan_reference,
                  "dispatch": selective_scan}


@pytest.mark.parametrize("backend", list(LOW_RANK_SCANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "G2"])
@pytest.mark.parametrize("reverse", [False, True], ids=["l2r", "r2l"])
def test_low_rank_delta_is_the_scan_of_the_product(backend, dtype, groups, reverse, seeds):
    """delta_proj (dim, R) with delta its (batch, R, L) factor is the scan of delta = delta_proj @ factor: without
    autograd (the C++ kernel forms the product in registers) and with it (every gradient, the factor's and
    delta_proj's included), both directions, grouped or not."""
    if backend == "cpp":
        cpp_or_skip()
    fn = LOW_RANK_SCANS[backend]
    tol = TOLERANCE[dtype]
    for seed, options in zip(seeds, (OPTION_SETS[0], OPTION_SETS[3])):
        inputs, factor, delta_proj = low_rank_inputs(dtype, seed, groups, options)
        others = [inputs[0], *inputs[2:]]

        def expected_fn(u, factor, A, B, C, D, z, delta_bias, delta_proj):
            return flipped_reference(u, delta_proj @ factor, A, B, C, D, z, delta_bias, options["softplus"]) \
                if reverse else selective_scan_reference(u, delta_proj @ factor, A, B, C, D, z, delta_bias,
                                                         options["softplus"])

        def actual_fn(u, factor, A, B, C, D, z, delta_bias, delta_proj):
            return fn(u, factor, A, B, C, D, z, delta_bias, options["softplus"], reverse=reverse,
                      delta_proj=delta_proj)

        args = [others[0], factor, *others[1:], delta_proj]
        with torch.no_grad():
            expected = expected_fn(*args)
            assert_rel_close(actual_fn(*args), expected, tol, f"seed {seed}: no-grad out")
        grads = []
        for f in (expected_fn, actual_fn):
            leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in args]
            out = f(*leaves)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype))
            grads.append((out.detach(), [t.grad if t is not None else None for t in leaves]))
        (out_r, grads_r), (out_f, grads_f) = grads
        assert_rel_close(out_f, out_r, tol, f"seed {seed}: out")
        for name, gf, gr in zip(("u", "factor", *NAMES[2:], "delta_proj"), grads_f, grads_r):
            if gr is not None:
                assert_rel_close(gf, gr, tol, f"seed {seed}: d{name}")


@pytest.mark.parametrize("reverse", [False, True], ids=["l2r", "r2l"])
def test_cpp_inference_in_the_mixers_layouts_matches_reference(reverse, seeds):
    """The inference call exactly as Vim's two-pass mixer makes it, with several channel blocks per task (the kernel
    prefetches the next block's channel-last rows and unrolls the low-rank delta over 8 steps): u and z strided
    slices of one channel-last (batch, L, 2 dim) projection, dt, B and C column slices of one (batch * L, R + 2N)
    product, the low-rank delta, L not a multiple of 8. Equals the reference scan of the same values (flipped for
    r2l)."""
    cpp_or_skip()
    batch, dim, length, dstate, rank = 2, 288, 45, 16, 5
    for seed in seeds[:2]:
        g = torch.Generator().manual_seed(seed)
        xz = torch.randn(batch, length, 2 * dim, generator=g)
        u, z = xz[..., :dim].transpose(1, 2), xz[..., dim:].transpose(1, 2)        # channel-last views
        x_dbl = torch.randn(batch * length, rank + 2 * dstate, generator=g)             # x_proj's output
        dt, B, C = (t.reshape(batch, length, -1).transpose(1, 2) for t in x_dbl.split([rank, dstate, dstate], 1))
        delta_proj = 0.4 * torch.randn(dim, rank, generator=g)
        A = -torch.exp(torch.randn(dim, dstate, generator=g))
        D, bias = torch.randn(dim, generator=g), 0.3 * torch.randn(dim, generator=g)
        with torch.inference_mode():
            out = selective_scan_cpp(u, dt, A, B, C, D, z, bias, True, reverse=reverse, delta_proj=delta_proj)
        args = [t.double() for t in (u, delta_proj @ dt, A, B, C, D, z, bias)]
        expected = flipped_reference(*args, True) if reverse else selective_scan_reference(*args, True)
        assert out.stride(1) == 1                                          # channel-last, as u
        assert_rel_close(out.double(), expected, TOLERANCE[torch.float32], f"seed {seed}")


def test_cpp_low_rank_delta_needs_no_full_delta_without_autograd(seeds, monkeypatch):
    """Calls that need no gradient hand the factor to the C++ kernel: the full (batch, dim, L) delta is never
    built (the product is spied on); calls that need one build it, and both agree."""
    cpp_or_skip()
    inputs, factor, delta_proj = low_rank_inputs(torch.float32, seeds[0])
    built = []
    real = scan_cpp.full_from_low_rank
    monkeypatch.setattr(scan_cpp, "full_from_low_rank", lambda *a: built.append(1) or real(*a))
    args = (inputs[0], factor, *inputs[2:], True)
    with torch.inference_mode():
        inference = selective_scan(*args, delta_proj=delta_proj)
    with torch.no_grad():
        no_grad = selective_scan(*args, delta_proj=delta_proj, reverse=True)
    assert built == []
    with_grad = selective_scan(inputs[0], factor, *inputs[2:], True, delta_proj=delta_proj.requires_grad_())
    assert built == [1]
    assert_rel_close(inference, with_grad.detach(), TOLERANCE[torch.float32], "inference vs autograd")
    assert_rel_close(no_grad, flipped_reference(inputs[0], delta_proj.detach() @ factor, *inputs[2:], True),
                     TOLERANCE[torch.float32], "right to left")


def test_dispatch_runs_each_backend(seeds, restore_backends, monkeypatch):
    """Each name runs its own implementation (spied in the registry), "auto" takes the C++ kernel on CPU where it
    builds (else the chunked scan), and every CPU backend gives the reference's numbers."""
    inputs = make_inputs(2, 3, 9, 2, torch.float64, seeds[0])
    expected = selective_scan_reference(*inputs, delta_softplus=True)
    ran = []
    for impl in backends.implementations("scan"):
        monkeypatch.setattr(impl, "fn", lambda *a, _fn=impl.fn, _name=impl.name, **k: ran.append(_name) or _fn(*a, **k))
    auto = "cpp" if cpu_kernels_unavailable() is None else "torch"
    cases = [(None, auto), ("auto", auto), ("torch", "torch"), ("reference", "reference")]
    if auto == "cpp":
        cases.append(("cpp", "cpp"))
    for name, runs in cases:
        ran.clear()
        torch.testing.assert_close(selective_scan(*inputs, delta_softplus=True, backend=name), expected)
        assert ran == [runs], (name, ran)
    out, last = selective_scan(*inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(last, selective_scan_reference(*inputs, delta_softplus=True,
                                                              return_last_state=True)[1])


def test_failed_kernel_build_falls_back_to_the_torch_scan_with_one_warning(seeds, monkeypatch, restore_backends):
    """Without a working compiler, "auto" runs the chunked scan on CPU tensors and warns once, naming why; forcing
    the kernel raises with that reason."""
    from dartmamba.ops import _jit

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions\nerror: c++: command not found")

    monkeypatch.setattr(_jit, "cpu_kernels", no_compiler)
    monkeypatch.delenv("DARTMAMBA_BUILD_CPU_KERNELS", raising=False)
    reason = _jit._check()
    assert reason.startswith("building the C++ CPU kernels failed (RuntimeError: ") and "command not found" in reason
    monkeypatch.setenv("DARTMAMBA_BUILD_CPU_KERNELS", "0")
    assert _jit._check() == "DARTMAMBA_BUILD_CPU_KERNELS=0"
    for op in ("scan", "conv1d"):
        kernel = next(b for b in backends.implementations(op) if b.name == "cpp")
        monkeypatch.setattr(kernel, "available", lambda: reason)
    monkeypatch.setattr(backends, "_WARNED", set())
    inputs = make_inputs(2, 3, 9, 2, torch.float64, seeds[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert backends.resolve("scan", "cpu", *inputs).name == "torch"
            assert backends.resolve("conv1d", "cpu", inputs[0], torch.zeros(3, 4), None, "silu").name == "torch"
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 2 and all("could not be built" in m and "command not found" in m for m in runtime), runtime
    with pytest.raises(BackendUnavailableError, match="scan backend 'cpp' is not available: building the C"):
        selective_scan(*inputs, backend="cpp")


def test_extension_names_follow_the_sources_flags_and_torch(tmp_path, monkeypatch):
    """A changed source or header, ISA, torch version or torch install directory is a different library (never a
    stale or ABI-incompatible binary, never two environments rebuilding one library in turn)."""
    from dartmamba.ops import _jit

    monkeypatch.setattr(_jit, "CSRC", tmp_path)
    (tmp_path / "k.cpp").write_text("int a;")
    (tmp_path / "k.h").write_text("int b;")
    base = _jit.extension_name("AVX2")
    assert base.startswith("dartmamba_cpu_avx2_") and base == _jit.extension_name("AVX2")
    (tmp_path / "k.h").write_text("int c;")
    changed = _jit.extension_name("AVX2")
    assert changed != base
    assert _jit.extension_name("AVX512") != changed
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    other_torch = _jit.extension_name("AVX2")
    assert other_torch != changed
    # another environment (torch installed elsewhere): its own build, so the two never rebuild each other's
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "another_env" / "torch" / "__init__.py"))
    assert _jit.extension_name("AVX2") != other_torch


def test_a_second_checkout_loads_the_built_kernels_without_rebuilding(tmp_path):
    """The same sources in another directory (another clone, same environment) load the library already built:
    its file is not rewritten (the build files name a copy of the sources in the build directory, not the
    checkout's paths; before, every first run from a fresh clone rebuilt silently for ~15 s)."""
    cpp_or_skip()
    import shutil
    import subprocess
    import sys

    from dartmamba.ops import _jit

    library = next(Path(_jit._build_directory(_jit.extension_name())).glob("*.so"))
    stamp = library.stat().st_mtime_ns
    clone = tmp_path / "csrc"
    shutil.copytree(_jit.CSRC, clone)
    probe = ("import pathlib, sys; from dartmamba.ops import _jit; _jit.CSRC = pathlib.Path(sys.argv[1]); "
             "print(_jit.cpu_kernels())")
    result = subprocess.run([sys.executable, "-c", probe, str(clone)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr
    assert library.stat().st_mtime_ns == stamp, "the second checkout rebuilt the library"


@pytest.mark.parametrize("bad, message", [
    (dict(u=torch.zeros(2, 3)), "u must have shape"),
    (dict(delta=torch.zeros(2, 3, 6)), "delta must have"),
    (dict(A=torch.zeros(4, 2)), "A must have shape"),
    (dict(B=torch.zeros(2, 2, 6)), "B must have shape"),
    (dict(C=torch.zeros(2, 2, 1, 5)), "C must have shape"),
    (dict(B=torch.zeros(2, 2, 2, 5), C=torch.zeros(2, 2, 2, 5)), r"B must have shape .* G dividing dim = 3"),
    (dict(B=torch.zeros(2, 3, 2, 5)), "B and C must have the same layout"),
    (dict(D=torch.zeros(4)), "D must have shape"),
    (dict(z=torch.zeros(2, 3, 4)), "z must have"),
    (dict(delta_bias=torch.zeros(3, 1)), "delta_bias must have shape"),
    (dict(A=torch.zeros(3, 2, dtype=torch.complex64)), "A must be real"),
    (dict(u=torch.zeros(2, 3, 5, dtype=torch.long)), "u must be a floating-point"),
    (dict(delta_proj=torch.zeros(4, 2)), r"delta_proj must have shape \(dim, R\) with dim = 3"),
    (dict(delta_proj=torch.zeros(3, 2)), r"delta must be its \(batch, R, L\) = \(2, 2, 5\) factor"),
    (dict(delta_proj=torch.zeros(3, 2, dtype=torch.long)), "delta_proj must be a floating-point"),
])
def test_bad_arguments_are_named(bad, message):
    args = dict(u=torch.zeros(2, 3, 5), delta=torch.zeros(2, 3, 5), A=torch.zeros(3, 2), B=torch.zeros(2, 2, 5),
                C=torch.zeros(2, 2, 5), D=torch.zeros(3), z=torch.zeros(2, 3, 5), delta_bias=torch.zeros(3))
    args.update(bad)
    for fn in (selective_scan, selective_scan_torch, selective_scan_cpp, selective_scan_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_ops_pass_opcheck(seeds):
    """The torch scan's custom op and the C++-registered op (its fake, autograd and schema registered from Python
    once the library loads) pass torch's op checks, grouped, reversed, low-rank and with absent inputs."""
    u, delta, A, B, C, D, z, bias = make_inputs(2, 3, 10, 2, torch.float64, seeds[0])
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    torch.library.opcheck(torch.ops.dartmamba.selective_scan_torch_fwd.default, (*leaves, True, 4))
    torch.library.opcheck(torch.ops.dartmamba.selective_scan_torch_fwd.default, (u, delta, A, B, C, None, None,
                                                                                 None, False, 8))
    cpp_or_skip()
    op = cpu_kernels().scan_fwd.default
    none = torch.empty(0, dtype=torch.float64)
    grouped = [t.float().requires_grad_() for t in make_inputs(2, 4, 10, 2, torch.float32, seeds[1], groups=2)]
    torch.library.opcheck(op, (*leaves[:3], B[:, None], C[:, None], *leaves[5:], True, False, none))
    torch.library.opcheck(op, (*grouped, True, True, torch.empty(0)))                                  # reverse
    torch.library.opcheck(op, (u, delta, A, B[:, None], C[:, None], none, none, none, False, False, none))
    factor, proj = torch.randn(2, 2, 10, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():                                                            # the low-rank mode: no grad
        torch.library.opcheck(op, (u, factor, A, B[:, None], C[:, None], D, z, bias, True, False, proj),
                              test_utils=("test_schema", "test_faketensor"))


def test_cpp_kernel_results_do_not_depend_on_the_thread_count(seeds):
    """Tasks are handed out dynamically, but every partial sum has one writer and is reduced in a fixed order: the
    forward and every gradient are bitwise the same on 1 and 2 threads (so a resumed run replays its losses)."""
    cpp_or_skip()
    inputs = make_inputs(3, 40, 29, 8, torch.float32, seeds[0], groups=2)
    grad_last = torch.randn(3, 40, 8, dtype=torch.float64)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grads, _, last = run(selective_scan_cpp, inputs, True, torch.ones(3, 40, 29), grad_last)
            results.append((out, last, grads))
    finally:
        torch.set_num_threads(saved)
    (o1, l1, g1), (o2, l2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for name, a, b in zip(NAMES, g1, g2):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "G2"])
@pytest.mark.parametrize("options", OPTION_SETS[:2], ids=["vim", "bare"])
def test_cpp_one_path_eager_compiled_and_inference_agree(groups, options, seeds):
    """Every call runs the one C++-registered op: eager with autograd, compiled (fullgraph, no graph break) and
    inference give the same output, last state and gradients (the reference agrees to rounding)."""
    cpp_or_skip()
    inputs = make_inputs(2, 36, 23, 8, torch.float32, seeds[0], groups=groups, **options)
    grad_out = torch.randn(2, 36, 23, generator=torch.Generator().manual_seed(seeds[1]))
    grad_last = torch.randn(2, 36, 8, dtype=torch.float64)

    def scan(*args, **kwargs):
        return selective_scan(*args, **kwargs, backend="cpp")

    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")
    for last in (None, grad_last):
        eager = run(scan, inputs, options["softplus"], grad_out, last)
        traced = run(compiled, inputs, options["softplus"], grad_out, last)
        reference = run(selective_scan_reference, inputs, options["softplus"], grad_out, last)
        assert torch.equal(eager[0], traced[0])
        assert_rel_close(eager[0], reference[0], TOLERANCE[torch.float32], "out")
        if last is not None:
            assert torch.equal(eager[3], traced[3])
        for name, a, b, r in zip(NAMES, eager[1], traced[1], reference[1]):
            assert (a is None and b is None) or torch.equal(a, b), name
            if r is not None:
                assert_rel_close(a, r, TOLERANCE[torch.float32], f"d{name}")
    with torch.inference_mode():
        out, last_state = scan(*inputs[:6], z=inputs[6], delta_bias=inputs[7], delta_softplus=options["softplus"],
                               return_last_state=True)
    assert out.grad_fn is None and torch.equal(out, eager[0]) and torch.equal(last_state, eager[3])


def test_cpp_kernel_flops_are_its_registered_formula(seeds):
    """The kernel's custom ops count as the scan formula, forward and backward (grouped B/C cost the same)."""
    cpp_or_skip()
    batch, dim, length, dstate = 2, 6, 7, 3
    inputs = [t.requires_grad_() for t in make_inputs(batch, dim, length, dstate, torch.float32, seeds[0], groups=2)]
    with FlopCounterMode(display=False) as counter:
        out = selective_scan_cpp(*inputs, delta_softplus=True)
    assert counter.get_total_flops() == 2 * ss.scan_forward_macs(batch, dim, length, dstate)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * ss.scan_backward_macs(batch, dim, length, dstate)


# ----------------------------------------------------------------------------------------------------------------
# mamba-ssm wrapper, against a stand-in for its compiled extension
# ----------------------------------------------------------------------------------------------------------------
def fake_mamba_extension(calls):
    """Implements the ``selective_scan_cuda.fwd/bwd`` contract of mamba-ssm 2.3 (argument order, dtypes, the
    (batch, G, N, L) B/C layout, the x checkpoint tensor whose odd entries of the last chunk hold the last state,
    the return tuples) with the reference and the chunked scan's hand-written backward on CPU."""

    def check(u, delta, A, B, C, D, z, delta_bias):
        assert u.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert delta.dtype == u.dtype and B.dtype == u.dtype and C.dtype == u.dtype
        assert A.dtype == torch.float32 and B.dim() == 4 and C.shape == B.shape and u.shape[1] % B.shape[1] == 0
        assert u.stride(-1) == 1 and delta.stride(-1) == 1 and B.stride(-1) == 1 and C.stride(-1) == 1
        for t in (D, delta_bias):
            assert t is None or t.dtype == torch.float32
        assert z is None or (z.dtype == u.dtype and z.stride(-1) == 1)

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        check(u, delta, A, B, C, D, z, delta_bias)
        calls.append(("fwd", B.shape[1]))
        out, last = selective_scan_reference(u, delta, A, B, C, D, None, delta_bias, delta_softplus,
                                             return_last_state=True)
        batch, dim, length = u.shape
        x = torch.zeros(batch, dim, -(-length // 2048), 2 * A.shape[1])
        x[:, :, -1, 1::2] = last
        return [out, x] + ([out * F.silu(z.float()).to(out.dtype)] if z is not None else [])

    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
        check(u, delta, A, B, C, D, z, delta_bias)
        assert dout.dtype == u.dtype and x.shape[2] == -(-u.shape[2] // 2048)
        assert (out is not None) == (z is not None) and dz is None and recompute_out_z is False
        calls.append(("bwd", B.shape[1]))
        # autograd is off inside a custom op's kernel: the chunked scan's hand-written backward, group by group
        D_, z_, bias_ = (None if t is None else t.float() for t in (D, z, delta_bias))
        per_group = u.shape[1] // B.shape[1]
        parts = []
        for g in range(B.shape[1]):
            args = scan_torch._group_args(g, per_group, u, delta, A, B, C, D_, z_, bias_)
            _, states, _ = scan_torch._scan_torch_forward(*args, delta_softplus, 4096)
            sl = slice(g * per_group, (g + 1) * per_group)
            parts.append(scan_torch._scan_torch_backward(dout[:, sl], *args, states, None, delta_softplus, 4096))
        du, ddelta, dA, dB, dC, dD, dz_, dbias = (torch.cat([p[i] for p in parts], dim=0 if i in (2, 5, 7) else 1)
                                                  if i not in (3, 4) else torch.stack([p[i] for p in parts], 1)
                                                  for i in range(8))
        return [du, ddelta, dA, dB, dC, dD if D is not None else None,
                dbias if delta_bias is not None else None] + ([dz_.to(z.dtype)] if z is not None else [])

    return types.SimpleNamespace(fwd=fwd, bwd=bwd)


@pytest.fixture
def fake_mamba(monkeypatch):
    calls = []
    monkeypatch.setitem(compat_mamba._LOADED, "ext", fake_mamba_extension(calls))
    monkeypatch.setitem(compat_mamba._LOADED, "extra", {"fwd": 0, "bwd": 0})   # the arity of mamba-ssm 2.3
    monkeypatch.setattr(scan_cuda, "mamba_unavailable", lambda: None)
    return calls


@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "G2"])
@pytest.mark.parametrize("options", OPTION_SETS[:2], ids=["vim", "bare"])
def test_mamba_wrapper_plumbing(options, groups, seeds, fake_mamba):
    """Grouped B/C go to the kernel as (batch, G, N, L), ungrouped as (batch, 1, N, L); gradients come back in the
    inputs' layout; the last state is read from the kernel's checkpoints (without gradient, as in mamba-ssm)."""
    inputs = make_inputs(2, 4, 12, 4, torch.float32, seeds[0], groups=groups, **options)
    out_r, grads_r, grad_out, _ = run(selective_scan_reference, inputs, options["softplus"])
    out_c, grads_c, _, _ = run(ss.selective_scan_mamba_cuda, inputs, options["softplus"], grad_out)
    assert fake_mamba == [("fwd", groups or 1), ("bwd", groups or 1)]
    assert_rel_close(out_c, out_r, 1e-6, "out")
    for name, gc, gr in zip(NAMES, grads_c, grads_r):
        if gr is not None:
            assert_rel_close(gc, gr, 1e-5, f"d{name}")
    _, last = ss.selective_scan_mamba_cuda(*inputs, delta_softplus=options["softplus"], return_last_state=True)
    _, last_r = selective_scan_reference(*inputs, delta_softplus=options["softplus"], return_last_state=True)
    assert_rel_close(last, last_r, 1e-6, "last state")
    assert not last.requires_grad


def test_mamba_wrapper_casts_for_the_kernel(seeds, fake_mamba):
    """bf16 activations with fp32 A/D/bias (Vim under autocast), fp64 B: cast as the kernel wants, grads come
    back in each input's dtype."""
    inputs = make_inputs(2, 3, 12, 4, torch.float32, seeds[0])
    inputs[0], inputs[1], inputs[6] = (inputs[i].bfloat16() for i in (0, 1, 6))
    inputs[3] = inputs[3].double()
    out, grads, _, _ = run(ss.selective_scan_mamba_cuda, inputs, True)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]


def test_mamba_missing_raises_when_called_directly():
    if scan_cuda.mamba_unavailable() is None:
        pytest.skip("mamba-ssm is installed here")
    inputs = make_inputs(1, 2, 3, 2, torch.float32, 0)
    with pytest.raises(BackendUnavailableError, match="scan backend 'cuda' is not available"):
        ss.selective_scan_mamba_cuda(*inputs)


# ----------------------------------------------------------------------------------------------------------------
# On a GPU with mamba-ssm
# ----------------------------------------------------------------------------------------------------------------
def _mamba_ready():
    return torch.cuda.is_available() and scan_cuda.mamba_unavailable() is None


@pytest.mark.gpu
@pytest.mark.skipif(not _mamba_ready(), reason="needs CUDA and mamba-ssm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 197, 2500])
@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "G2"])
def test_cuda_kernel_matches_cpu_scan(dtype, length, groups, seeds):
    """mamba-ssm's kernel against the chunked scan on the GPU, grouped B/C and the last state included."""
    inputs = make_inputs(2, 64, length, 16, torch.float32, seeds[0], groups=groups)
    for i in (0, 1, 3, 4, 6):
        inputs[i] = inputs[i].to(dtype)
    cuda_inputs = [t.cuda() for t in inputs]
    out_c, grads_c, grad_out, _ = run(lambda *a, **k: selective_scan(*a, **k, backend="cuda"), cuda_inputs,
                                      True)
    out_f, grads_f, _, _ = run(selective_scan_torch, cuda_inputs, True, grad_out)
    rtol_out, rtol_grad = (1e-4, 1e-3) if dtype == torch.float32 else (3e-2, 3e-2)
    assert out_c.dtype == dtype
    assert_rel_close(out_c.float(), out_f.float(), rtol_out, "out")
    for name, gc, gf in zip(NAMES, grads_c, grads_f):
        assert gc.dtype == gf.dtype
        assert_rel_close(gc.float(), gf.float(), rtol_grad, f"d{name}")
    _, last_c = selective_scan(*cuda_inputs, delta_softplus=True, return_last_state=True, backend="cuda")
    _, last_f = selective_scan_torch(*cuda_inputs, delta_softplus=True, return_last_state=True)
    assert_rel_close(last_c.float(), last_f.float(), rtol_out, "last state")


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


# The tolerance of a 16-bit output against the float64 reference on the same 16-bit inputs: the kernel's float32
# error (below 1e-5 of the scale) plus one rounding to the output dtype (half an ulp: 2^-9 of a value in bfloat16,
# 2^-11 in float16), taken relative to the output's largest value.
HALF_RTOL = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["l2r", "r2l"])
def test_cpp_16bit_inference_reads_and_writes_its_dtype(dtype, reverse, seeds):
    """Without autograd the kernel takes 16-bit sequences (u, delta, B, C, z) as they are, computes in float32 (A,
    D, delta_bias, delta_proj in float32, as Vim keeps them) and rounds its output once: no cast of a sequence, the
    same bits as the float32 kernel on the same 16-bit values rounded, and the float64 reference on those values
    within HALF_RTOL. Channel-last u (as in_proj's output), grouped B/C, a low-rank delta, dim 40 (a partial block),
    both directions."""
    cpp_or_skip()
    dim, length, dstate, rank = 40, 37, 16, 3
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0):
            return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

        u = rand(2, length, dim).to(dtype).transpose(1, 2)
        factor, proj = rand(2, rank, length, scale=0.5).to(dtype), rand(dim, rank).float()
        A = -torch.exp(rand(dim, dstate)).float()
        B, C, z = rand(2, 2, dstate, length).to(dtype), rand(2, 2, dstate, length).to(dtype), rand(2, dim, length).to(dtype)
        D, bias = rand(dim).float(), rand(dim, scale=0.3).float()
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            out, last = selective_scan_cpp(u, factor, A, B, C, D, z, bias, True, True, reverse=reverse,
                                           delta_proj=proj)
        casts = [e.input_shapes for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
        assert casts == [], f"the kernel's inputs were copied: {casts}"
        assert out.dtype == dtype and out.stride() == u.stride() and last.dtype == torch.float32
        with torch.no_grad():
            out32, last32 = selective_scan_cpp(u.float(), factor.float(), A, B.float(), C.float(), D, z.float(), bias,
                                               True, True, reverse=reverse, delta_proj=proj)
        assert torch.equal(out, out32.to(dtype)) and torch.equal(last, last32), f"seed {seed}"
        # the float64 reference on the same values: right to left is the scan of the flipped sequences
        wide = [t.double() for t in (u, proj.double() @ factor.double(), A, B, C, D, z, bias)]
        flip = (0, 1, 3, 4, 6)        # u, delta, B, C, z
        if reverse:
            wide = [t.flip(-1) if i in flip else t for i, t in enumerate(wide)]
        ref, ref_last = selective_scan_reference(*wide, delta_softplus=True, return_last_state=True)
        ref = ref.flip(-1) if reverse else ref
        assert_rel_close(out.double(), ref, HALF_RTOL[dtype], f"{dtype} out, seed {seed}")
        assert_rel_close(last.double(), ref_last, 1e-5, f"{dtype} last state, seed {seed}")


def test_cpp_16bit_op_schema_fake_and_dtype_errors(seeds):
    """The op with 16-bit sequences passes torch's schema and fake-tensor checks (its output in u's dtype, the
    last state in float32); parameters in another dtype than the compute dtype, and a 16-bit backward, are
    refused naming the rule."""
    cpp_or_skip()
    u, delta, A, B, C, D, z, bias = make_inputs(2, 20, 9, 4, torch.float32, seeds[0])
    half = [t.bfloat16() for t in (u, delta, B[:, None], C[:, None], z)]
    op = cpu_kernels().scan_fwd.default
    args = (half[0], half[1], A, half[2], half[3], D, half[4], bias, True, False, torch.empty(0))
    with torch.no_grad():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="A, D, delta_bias and delta_proj must be CPU tensors of u's compute dtype"):
        op(half[0], half[1], A.bfloat16(), *args[3:])
    with pytest.raises(RuntimeError, match="u, delta, B, C and z must be CPU tensors of one floating dtype"):
        op(half[0], delta, *args[2:])
    with pytest.raises(RuntimeError, match="scan_bwd computes float32 and float64 inputs"):
        cpu_kernels().scan_bwd(half[0], *args[:8], torch.empty(0), True, False)
