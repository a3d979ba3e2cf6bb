"""bimamba_scan (both scan directions of a Vim layer, gated and averaged): the C++ one-pass kernel against the
definition (two sequential reference scans in float64), in every layout the mixer uses and in 16-bit storage; the
dispatch (gradients take the two scans); argument checks; the op's fake implementation and FLOP count."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dartmamba import backends
from dartmamba.backends import BackendUnavailableError
from dartmamba.ops import ScanBranch, bimamba_scan, bimamba_scan_cpp, bimamba_scan_torch, selective_scan_reference
from dartmamba.ops._jit import cpu_kernels, cpu_kernels_unavailable
from dartmamba.ops.bimamba.cpp import branch_kernel_arguments


def cpp_or_skip():
    reason = cpu_kernels_unavailable()
    if reason is not None:
        pytest.skip(f"the C++ scan kernel is not available here: {reason}")


def make_branch(g, batch, dim, length, dstate, *, rank=None, D=True, delta_bias=True, channel_last=False):
    """One direction's random inputs in float64, shaped as the mixer makes them: ``rank``: delta as a low-rank
    factor (batch, R, L) with delta_proj (dim, R); ``channel_last``: u a strided view of a (batch, L, dim) tensor."""
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = rand(batch, length, dim).transpose(1, 2) if channel_last else rand(batch, dim, length)
    if rank is None:
        delta, delta_proj = 0.5 * rand(batch, dim, length) - 1.0, None
    else:
        delta, delta_proj = rand(batch, rank, length), 0.3 * rand(dim, rank)
    return ScanBranch(u, delta, -torch.exp(rand(dim, dstate)), rand(batch, dstate, length),
                      rand(batch, dstate, length), rand(dim) if D else None, 0.3 * rand(dim) if delta_bias else None,
                      delta_proj)


def reference(forward, backward, z, softplus):
    """The definition in float64: 0.5 * (scan(forward, z) + scan(backward, z, right to left)), each scan the
    sequential reference; the right-to-left scan as the scan of the flipped sequences, flipped back."""
    def full(branch):
        if branch.delta_proj is None:
            return branch.delta
        return torch.einsum("dr,brl->bdl", branch.delta_proj, branch.delta)

    def scan(branch, flip):
        f = (lambda t: t.flip(-1)) if flip else (lambda t: t)
        out = selective_scan_reference(f(branch.u), f(full(branch)), branch.A, f(branch.B), f(branch.C), branch.D,
                                       f(z), branch.delta_bias, softplus)
        return f(out)

    return 0.5 * (scan(forward, False) + scan(backward, True))


def cast(branch, dtype):
    """Sequences (u, delta, B, C) in ``dtype``, parameters in float32 (the mixer's 16-bit storage); else all."""
    params = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    seq = {"u", "delta", "B", "C"}
    return ScanBranch(*[None if t is None else t.to(dtype if name in seq else params)
                        for name, t in zip(ScanBranch._fields, branch)])


def rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


# float32: the scans' own error (below 2e-5 of the scale, as the scan's tests) plus the sum and the gate's
# rounding; bfloat16 / float16: the inputs are rounded before both computations, so the only extra error is the
# output's rounding, half an ulp (2^-9 bf16, 2^-12 fp16) of the largest value, and the float32 math below that
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("case", [
    dict(dim=40, length=37, dstate=16, rank=3, channel_last=True),            # the mixer's call: a partial block
    dict(dim=16, length=9, dstate=8, rank=None),                               # full delta, N compiled in
    dict(dim=35, length=50, dstate=5, rank=2, D=False, delta_bias=False),     # N at run time, no D or bias
    dict(dim=64, length=1, dstate=16, rank=None, channel_last=True),           # one step
], ids=["mixer", "full-delta", "runtime-N", "one-step"])
def test_cpp_matches_the_two_reference_scans(seeds, dtype, case):
    cpp_or_skip()
    case = dict(case)
    dim, length, dstate = case.pop("dim"), case.pop("length"), case.pop("dstate")
    g = torch.Generator().manual_seed(seeds[0])
    batch = 3
    forward = make_branch(g, batch, dim, length, dstate, **case)
    backward = make_branch(g, batch, dim, length, dstate, **case)
    z = torch.randn(batch, length, dim, generator=g, dtype=torch.float64).transpose(1, 2)
    low = dtype in (torch.bfloat16, torch.float16)
    # the reference sees the inputs the kernel sees: rounded to the storage dtype
    fwd_in, bwd_in, z_in = cast(forward, dtype), cast(backward, dtype), z.to(dtype)
    expected = reference(cast(fwd_in, torch.float64), cast(bwd_in, torch.float64), z_in.double(), True)
    with torch.no_grad():
        out = bimamba_scan_cpp(fwd_in, bwd_in, z_in, delta_softplus=True)
    assert out.dtype == dtype and out.shape == (batch, dim, length)
    assert torch.isfinite(out).all()
    err = rel_err(out, expected)
    assert err <= TOLERANCE[dtype], f"max error {err:.3e} of the scale (tolerance {TOLERANCE[dtype]:.1e})"
    if not low:
        # the definition through the "torch" backend (two scans of the "scan" op) agrees as well
        torch_out = bimamba_scan_torch(fwd_in, bwd_in, z_in, delta_softplus=True)
        assert rel_err(torch_out, expected) <= TOLERANCE[dtype]


def test_cpp_without_softplus_and_on_two_threads(seeds):
    """delta used as given (positive steps), and the result bitwise the same on 1 and 2 threads."""
    cpp_or_skip()
    g = torch.Generator().manual_seed(seeds[0])
    forward, backward = (make_branch(g, 2, 48, 33, 16, rank=None) for _ in range(2))
    forward, backward = (b._replace(delta=F.softplus(b.delta), delta_bias=b.delta_bias.abs()) for b in
                         (forward, backward))
    z = torch.randn(2, 48, 33, generator=g, dtype=torch.float64)
    expected = reference(forward, backward, z, False)
    f32 = [cast(b, torch.float32) for b in (forward, backward)]
    saved = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(bimamba_scan_cpp(*f32, z.float(), delta_softplus=False))
    finally:
        torch.set_num_threads(saved)
    assert rel_err(outs[0], expected) <= TOLERANCE[torch.float32]
    assert torch.equal(outs[0], outs[1])


def test_dispatch_takes_the_kernel_without_autograd_and_the_two_scans_with_it(seeds):
    cpp_or_skip()
    g = torch.Generator().manual_seed(seeds[0])
    forward, backward = (cast(make_branch(g, 2, 24, 11, 16, rank=2), torch.float32) for _ in range(2))
    z = torch.randn(2, 24, 11, generator=g)
    assert backends.resolve("bimamba_scan", "cpu", forward, backward, z, True).name == "cpp"
    leaf = forward.u.clone().requires_grad_()
    with_grad = forward._replace(u=leaf)
    assert backends.resolve("bimamba_scan", "cpu", with_grad, backward, z, True).name == "torch"
    out = bimamba_scan(with_grad, backward, z, delta_softplus=True)
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    with torch.no_grad():
        fast = bimamba_scan(forward, backward, z, delta_softplus=True)
    assert rel_err(fast, out.detach().double()) <= TOLERANCE[torch.float32]
    with pytest.raises(BackendUnavailableError, match="no backward"):
        bimamba_scan(with_grad, backward, z, delta_softplus=True, backend="cpp")


@pytest.mark.parametrize("change, message", [
    (dict(u=torch.zeros(2, 3, 6)), r"forward.u and backward.u must match in shape and dtype, got \(2, 3, 5\)"),
    (dict(D=None), "forward.D and backward.D must both be given or both be None"),
    (dict(B=torch.zeros(2, 2, 5, dtype=torch.float64)), "forward.B and backward.B must match in shape and dtype"),
    (dict(A=torch.zeros(4, 2)), r"forward.A and backward.A must match in shape and dtype, got \(3, 2\)"),
])
def test_bad_branches_are_named(change, message):
    forward = ScanBranch(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), torch.zeros(3, 2), torch.zeros(2, 2, 5),
                         torch.zeros(2, 2, 5), torch.zeros(3), torch.zeros(3), None)
    backward = forward._replace(**change)
    with pytest.raises(ValueError, match=message):
        bimamba_scan(forward, backward, torch.zeros(2, 3, 5))
    with pytest.raises(TypeError, match="backward must be a ScanBranch, got tuple"):
        bimamba_scan(forward, tuple(forward), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"z must .*\(2, 3, 5\)"):      # each branch checked as the scan's
        bimamba_scan(forward, forward, torch.zeros(2, 3, 4))


def test_kernel_op_passes_opcheck_and_counts_the_two_scans_flops(seeds):
    cpp_or_skip()
    g = torch.Generator().manual_seed(seeds[0])
    forward, backward = (cast(make_branch(g, 2, 20, 9, 4, rank=2), torch.float32) for _ in range(2))
    z = torch.randn(2, 20, 9, generator=g)
    op = cpu_kernels().bimamba_scan_fwd.default
    f, b = branch_kernel_arguments(forward, z), branch_kernel_arguments(backward, z)
    args = (*f[:8], *b[:8], f[8], True)
    with torch.no_grad():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        with FlopCounterMode(display=False) as fast:
            bimamba_scan(forward, backward, z, delta_softplus=True)
        with backends.use_backend("bimamba_scan", "torch"), FlopCounterMode(display=False) as two:
            bimamba_scan(forward, backward, z, delta_softplus=True)
    assert fast.get_total_flops() == two.get_total_flops() > 0
