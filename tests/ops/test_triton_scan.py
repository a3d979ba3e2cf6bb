"""The Triton selective scan (backend "triton") against the sequential reference: forward, every gradient (the last
state's included), every dtype, grouped B/C, tile boundaries, saturated gates and large steps in fp16, strided
inputs read in place, the custom ops under opcheck and torch.compile, the sm_80 / sm_90 compiles, and a whole tiny
Vim-DART with every op on its Triton backend against the C++ and torch backends.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with small tiles (16 steps), so L = 37 crosses
two tile boundaries. The ``gpu`` cases run the compiled kernels: ``TRITON_INTERPRET=0 pytest -m gpu <this file>``.
"""
import contextlib
import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dartmamba import backends  # noqa: E402
from dartmamba.ops import scan_backward_macs, scan_forward_macs, selective_scan, selective_scan_reference  # noqa
from dartmamba.ops.scan import triton as scan_triton  # noqa: E402
from tests.ops.test_selective_scan import NAMES, make_inputs  # noqa: E402


def _interpreted() -> bool:
    try:
        return scan_triton.interpreted()
    except Exception:  # pragma: no cover - no triton
        return False


@triton.jit
def _loop_probe(out_ptr, n):
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr, acc)


def _interpreter_loops_to_runtime_bounds() -> bool:
    """The scan's kernels loop over a runtime tile count; triton 3.6's interpreter turns a scalar argument into a
    one-element array whose ``__index__`` numpy 2 refuses (compiled kernels are unaffected)."""
    if not _interpreted():
        return True
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception:
        return False
    return int(out.item()) == 3


INTERPRETER_LOOPS = _interpreter_loops_to_runtime_bounds()
CPU_SKIP = ("CPU tensors need TRITON_INTERPRET=1" if not _interpreted() else
            f"triton {triton.__version__}'s interpreter cannot loop to a runtime bound (the compiled kernels can)")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not (_interpreted() and INTERPRETER_LOOPS), reason=CPU_SKIP)),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _interpreted(), reason="compiled kernels needed: run with TRITON_INTERPRET=0")]),
]

# Relative to the largest reference value (the reference in float64 on the same rounded inputs). Low-precision
# results differ by their own rounding (out, du, ...: one ulp of the result dtype); the last state is float32.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
STATE_TOLERANCE = 2e-6


@contextlib.contextmanager
def on_triton(device: str):
    """The Triton backends offered for ``device`` (CPU tensors: the interpreter)."""
    with contextlib.ExitStack() as stack:
        if device == "cpu":
            for op in ("scan", "conv1d"):
                stack.enter_context(backends.allow_device(op, "triton", "cpu"))
        yield


def scan_run(inputs, softplus, grad_out, grad_last, backend, device="cpu", reverse=False):
    """Forward + backward through the public op: (out, last, grads) on the CPU in float64 (grads None where absent)."""
    leaves = [t.detach().to(device).clone().requires_grad_() if t is not None else None for t in inputs]
    with on_triton(device):
        out, last = selective_scan(*leaves, delta_softplus=softplus, return_last_state=True, backend=backend,
                                   reverse=reverse)
    torch.autograd.backward([out, last], [grad_out.to(device, out.dtype), grad_last.to(device, last.dtype)])
    grads = [t.grad.cpu() if t is not None else None for t in leaves]
    return out.detach().cpu(), last.detach().cpu(), grads, (out.dtype, [t.dtype if t is not None else None
                                                                         for t in leaves])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def check_against_reference(inputs, softplus, device, seed, tol, state_tol=STATE_TOLERANCE, reverse=False):
    """The Triton scan on ``inputs`` (their dtypes) against the reference in float64 on the same values."""
    g = torch.Generator().manual_seed(seed + 7)
    u, A = inputs[0], inputs[2]
    grad_out = torch.randn(u.shape, generator=g, dtype=torch.float64).to(u.dtype)
    grad_last = torch.randn(u.shape[0], u.shape[1], A.shape[1], generator=g, dtype=torch.float64).float()
    want = scan_run([t.double() if t is not None else None for t in inputs], softplus, grad_out.double(),
                    grad_last.double(), "reference", reverse=reverse)
    got = scan_run(inputs, softplus, grad_out, grad_last, "triton", device, reverse=reverse)
    out_dtype, grad_dtypes = got[3]
    assert out_dtype == u.dtype and got[1].dtype == torch.float32
    errors = {"out": rel_err(got[0], want[0]), "last state": rel_err(got[1], want[1])}
    for name, t, gf, gr, dt in zip(NAMES, inputs, got[2], want[2], grad_dtypes):
        if t is None:
            assert gf is None
            continue
        assert gf.dtype == dt == t.dtype, f"d{name}: {gf.dtype} vs {t.dtype}"
        assert torch.isfinite(gf).all(), f"d{name}: non-finite"
        errors[f"d{name}"] = rel_err(gf, gr)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    limits = {k: state_tol if k == "last state" else tol for k in errors}
    bad = {k: f"{v:.2e}" for k, v in errors.items() if v > limits[k]}
    assert not bad, f"seed {seed}: relative errors above {tol:g} (state {state_tol:g}): {bad}"
    return errors


def cast(inputs, dtype):
    """Sequences and B/C in ``dtype``; A, D, delta_bias float32 (as Vim keeps them)."""
    return [None if t is None else t.float() if i in (2, 5, 7) else t.to(dtype) for i, t in enumerate(inputs)]


# mamba-ssm's test grid (has_D, has_z, has_delta_bias, delta_softplus, return_last_state, every dtype), reduced:
# each dtype meets two option sets, grouped and ungrouped B/C; together the four option sets of
# tests/ops/test_selective_scan.py.
CASES = [
    (torch.float32, dict(D=True, z=True, delta_bias=True, softplus=True), 2),
    (torch.float32, dict(D=False, z=False, delta_bias=False, softplus=False), None),
    (torch.float16, dict(D=True, z=False, delta_bias=True, softplus=False), 2),
    (torch.float16, dict(D=False, z=True, delta_bias=False, softplus=True), None),
    (torch.bfloat16, dict(D=True, z=True, delta_bias=True, softplus=True), None),
    (torch.bfloat16, dict(D=False, z=False, delta_bias=False, softplus=False), 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, options, groups", CASES,
                         ids=[f"{str(d)[6:]}-{'-'.join(k for k, v in o.items() if v) or 'bare'}-G{g}"
                              for d, o, g in CASES])
def test_matches_reference_every_gradient(device, dtype, options, groups, seed):
    inputs = make_inputs(2, 8, 37, 4, torch.float64, seed, groups=groups, **options)
    check_against_reference(cast(inputs, dtype), options["softplus"], device, seed, TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_saturated_gates_and_large_steps_stay_finite(device, seed):
    """The inputs behind Vim users' fp16 NaNs, in float16: in sample 0 gates |z| up to ~400 (sigmoid saturates,
    exp(-z) overflows float32); in sample 1 pre-softplus steps up to ~150 and 200 at every fifth step (softplus
    passes them through, exp(200) overflows float32, every decay underflows to 0). Finite, and the reference.
    (Each in its own sample: together their true gradients leave float16's range.)"""
    inputs = make_inputs(2, 8, 37, 4, torch.float64, seed, groups=2)
    inputs[6][0] = inputs[6][0] * 100.0
    inputs[1][1] = inputs[1][1] * 50.0 + 3.0 * torch.sign(inputs[1][1])
    inputs[1][1, :, ::5] = 200.0
    check_against_reference(cast(inputs, torch.float16), True, device, seed, TOLERANCE[torch.float16])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_are_read_in_place(device, seed, monkeypatch):
    """The mixer's layout (u channel-last, dt / B / C strided views of one (batch * L, R + 2N) projection) gives
    bit for bit what contiguous copies give, and no copy is made on the way (capability "any_strides")."""
    batch, dim, length, dstate = 2, 8, 21, 4
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(batch * length, dim + 2 * dstate, generator=g).to(device)
    delta = rows[:, :dim].reshape(batch, length, dim).transpose(1, 2)
    B = rows[:, dim:dim + dstate].reshape(batch, length, dstate).transpose(1, 2)
    C = rows[:, dim + dstate:].reshape(batch, length, dstate).transpose(1, 2)
    u = torch.randn(batch, length, dim, generator=g).to(device).transpose(1, 2)
    A = -torch.rand(dim, dstate, generator=g).to(device)
    args = (u, delta, A, B, C)
    seen = []
    real = scan_triton._fwd_op
    monkeypatch.setattr(scan_triton, "_fwd_op", lambda *a: seen.append([t.stride() for t in a[:5]]) or real(*a))
    with on_triton(device):
        strided = selective_scan(*args, delta_softplus=True, backend="triton")
        dense = selective_scan(*(t.contiguous() for t in args), delta_softplus=True, backend="triton")
    assert seen[0][0] == u.stride() and seen[0][1] == delta.stride() and seen[0][3][-1] == B.stride(-1)
    assert torch.equal(strided, dense)
    want = selective_scan_reference(*(t.double() for t in args), delta_softplus=True)
    assert rel_err(strided, want) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_reverse_and_low_rank_delta_through_the_adapters(device, seed):
    """``reverse`` and ``delta_proj`` are adapted around the kernel (no native modes but strides): the scan of the
    flipped sequences and of the product, gradients included, through the public op."""
    inputs = make_inputs(1, 8, 23, 4, torch.float64, seed, groups=2)
    check_against_reference(cast(inputs, torch.float32), True, device, seed, TOLERANCE[torch.float32], reverse=True)
    g = torch.Generator().manual_seed(seed)
    factor, proj = torch.randn(1, 3, 23, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g,
                                                                                       dtype=torch.float64)
    results = []
    for backend, dtype, dev in (("reference", torch.float64, "cpu"), ("triton", torch.float32, device)):
        leaves = [t.to(dev, dtype).requires_grad_() for t in (inputs[0], factor, proj)]
        rest = [t.to(dev, torch.float32 if dtype == torch.float32 else dtype) for t in inputs[2:]]
        with on_triton(dev):
            out = selective_scan(leaves[0], leaves[1], *rest, delta_softplus=True, backend=backend, reverse=True,
                                 delta_proj=leaves[2])
        results.append([out.detach().cpu(), *(x.cpu() for x in torch.autograd.grad(out.square().sum(), leaves))])
    for what, a, b in zip(("out", "du", "dfactor", "ddelta_proj"), results[1], results[0]):
        assert rel_err(a, b) < TOLERANCE[torch.float32], what
    assert backends.implementations("scan")[1].name == "triton"
    assert {b.name: b.capabilities for b in backends.implementations("scan")}["triton"] == {"any_strides"}


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck_and_compile_in_one_graph(device, seed):
    """The forward and backward custom ops: schema, autograd registration and fakes (opcheck); the public op under
    torch.compile(fullgraph=True) equals eager, gradients included."""
    inputs = make_inputs(1, 4, 20, 4, torch.float32, seed, groups=2)
    u, delta, A, B, C, D, z, bias = [t.to(device) for t in inputs]
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    torch.library.opcheck(scan_triton._fwd_op, (u, delta, A, B, C, D, z, bias, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, last, ckpt = scan_triton._fwd_op(u, delta, A, B, C, D, z, bias, True)
    torch.library.opcheck(scan_triton._bwd_op, (torch.randn_like(out), u, delta, A, B, C, D, z, bias, ckpt.detach(),
                                                torch.randn_like(last), True),
                          test_utils=("test_schema", "test_faketensor"))

    def loss(*args):
        y, h = selective_scan(*args, delta_softplus=True, return_last_state=True, backend="triton")
        return y.square().sum() + h.sum()

    with on_triton(device):
        with FlopCounterMode(display=False) as counter:
            want = torch.autograd.grad(loss(*leaves), leaves)
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(*leaves), leaves)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"d{name}: {m}")
    torch._dynamo.reset()
    # the FLOP counter counts the ops by their registered formulas (2 per multiply-add), forward and backward
    batch, dim, length = u.shape
    scan_flops = 2 * (scan_forward_macs(batch, dim, length, 4) + scan_backward_macs(batch, dim, length, 4))
    assert counter.get_total_flops() == scan_flops


def test_unsupported_inputs_are_refused_by_name(restore_backends):
    """float64 and N > 256 are not the kernels' (auto passes them over); forcing names the reason."""
    inputs = make_inputs(1, 2, 5, 3, torch.float64, 0)
    reason = scan_triton.unsupported(*inputs)
    assert reason == "its kernels compute float16/bfloat16/float32 inputs, got torch.float64"
    with backends.allow_device("scan", "triton", "cpu"):
        if _interpreted():
            with pytest.raises(backends.BackendUnavailableError,
                               match="scan backend 'triton' cannot take these inputs: its kernels compute float16"):
                selective_scan(*inputs, backend="triton")
    big = make_inputs(1, 2, 5, 257, torch.float32, 0)
    assert "N <= 256" in scan_triton.unsupported(*big)


# ----------------------------------------------------------------------------------------------------------------
# The real compiler, no GPU: sm_80 and sm_90
# ----------------------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import dartmamba.ops.scan._triton_kernels as S
    import dartmamba.ops.conv1d._triton_kernels as K

    SEQ = ["L", "DIM", "N", "PER_GROUP", "n_chunks", "su_b", "su_d", "su_l", "sdt_b", "sdt_d", "sdt_l", "sb_b",
           "sb_g", "sb_n", "sb_l", "sc_b", "sc_g", "sc_n", "sc_l", "sz_b", "sz_d", "sz_l"]
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=4, BLOCK_N=16, BLOCK_L=32)

    def build(target, kernel, ptrs, ints, constexprs):
        sig = {**{k: "*" + v for k, v in ptrs.items()}, **{k: "i32" for k in ints},
               **{k: "constexpr" for k in constexprs}}
        triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=target, options={"num_warps": 4})

    # each kernel once per architecture, the dtypes alternating (Vim's bf16 on sm_90)
    for arch, io in ((80, "fp16"), (90, "bf16")):
        target = GPUTarget("cuda", arch, 32)
        f32 = "fp32"
        build(target, S.scan_fwd_kernel, dict(u_ptr=io, dt_ptr=io, a_ptr=f32, b_ptr=io, c_ptr=io, dd_ptr=f32,
              z_ptr=io, bias_ptr=f32, out_ptr=io, ckpt_ptr=f32, last_ptr=f32), SEQ, flags)
        build(target, S.scan_bwd_kernel, dict(u_ptr=io, dt_ptr=io, a_ptr=f32, b_ptr=io, c_ptr=io, dd_ptr=f32,
              z_ptr=io, bias_ptr=f32, ckpt_ptr=f32, dout_ptr=io, dlast_ptr=f32, du_ptr=io, ddt_ptr=io, da_ptr=f32,
              db_ptr=f32, dc_ptr=f32, ddd_ptr=f32, dz_ptr=io, dbias_ptr=f32), SEQ + ["G"],
              dict(flags, HAS_DLAST=arch == 80))
        conv = dict(KW=4 if arch == 90 else 3, HAS_BIAS=True, SILU=True, BLOCK_D=32, BLOCK_L=64)
        build(target, K.conv_fwd_kernel, dict(x_ptr=io, w_ptr=f32, b_ptr=f32, out_ptr=io),
              ["L", "DIM", "sx_b", "sx_d", "sx_l", "so_b", "so_d", "so_l"], conv)
        build(target, K.conv_bwd_kernel, dict(x_ptr=io, w_ptr=f32, b_ptr=f32, dout_ptr=io, dx_ptr=io, dw_ptr=f32,
              db_ptr=f32), ["L", "DIM", "sx_b", "sx_d", "sx_l", "sg_b", "sg_d", "sg_l", "sdx_b", "sdx_d", "sdx_l"],
              conv)
        print(f"sm_{arch} ok")
    print("compiled")
""")


def test_kernels_compile_for_sm80_and_sm90_offline(compile_offline_for_sm90):
    """The real Triton compiler (TTIR -> PTX -> cubin with the bundled ptxas) accepts the scan's and the conv's
    forward and backward kernels for sm_80 (A100) and sm_90 (H100): catches what the interpreter lets through."""
    compile_offline_for_sm90(_COMPILE_SCRIPT)


# ----------------------------------------------------------------------------------------------------------------
# A whole tiny Vim-DART
# ----------------------------------------------------------------------------------------------------------------
def _model_step(model, images, labels, forced: dict, offers: tuple = ()):
    model.zero_grad(set_to_none=True)
    with contextlib.ExitStack() as stack:
        for op in offers:
            stack.enter_context(backends.allow_device(op, "triton", "cpu"))
        for op, name in forced.items():
            stack.enter_context(backends.use_backend(op, name))
        logits = model(images)
        F.cross_entropy(logits, labels).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads


def test_whole_vim_dart_on_triton_equals_cpp_and_torch(restore_backends, seed):
    """Forward and backward of a tiny Vim-DART (1 block, 17 tokens, d_inner 16, N 4) with the scan, the conv and
    the tokenizer's partition and resampling forced to their Triton kernels (interpreted on CPU; the mixer then runs
    its one-pass form, both directions in one scan launch), against the C++ kernels (two-pass) and the portable
    torch backends: logits and every parameter gradient to float32 rounding."""
    if not _interpreted():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    if not INTERPRETER_LOOPS:
        pytest.skip(CPU_SKIP)
    import timm

    import dartmamba.models  # noqa: F401
    from dartmamba.ops._jit import cpu_kernels_unavailable

    torch.manual_seed(seed)
    model = timm.create_model("vim_tiny_dart", img_size=32, patch_size=4, grid_size=4, num_tokens=16, embed_dim=8,
                              d_state=4, depth=1, num_classes=3, dart_cfg=dict(trunk="tiny_cnn"))
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.randn(2, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear")
    labels = torch.tensor([0, 2])
    triton_ops = ("scan", "conv1d", "partition", "resample")
    got = _model_step(model, images, labels, {op: "triton" for op in triton_ops}, offers=triton_ops)
    runs = {"torch": {op: "torch" for op in ("scan", "conv1d", "rmsnorm", "partition", "resample")}}
    if cpu_kernels_unavailable() is None:
        runs["cpp"] = {"scan": "cpp", "conv1d": "cpp"}
    figures = {}
    for name, forced in runs.items():
        want = _model_step(copy.deepcopy(model), images, labels, forced)
        figures[name] = (rel_err(got[0], want[0]), (got[1] - want[1]).norm().item() / want[1].norm().item())
        assert figures[name][0] < 1e-5 and figures[name][1] < 1e-5, f"vs {name}: {figures[name]}"
    print(f"\nTriton vs (logits max rel, grads rel norm): {figures}")
