"""Causal depthwise conv1d: the F.conv1d and C++ backends against the explicit tap loop (any layout for the C++
kernel, whose output is laid out as its input), dtypes, argument checks."""

import pytest
import torch

from dartmamba.backends import BackendUnavailableError
from dartmamba.ops import causal_conv1d, causal_conv1d_cpp, causal_conv1d_reference
from dartmamba.ops._jit import cpu_kernels, cpu_kernels_unavailable
from dartmamba.ops.conv1d import cuda as conv_cuda


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def backend_or_skip(name):
    if name == "cpp" and cpu_kernels_unavailable() is not None:
        pytest.skip(f"the C++ CPU kernels are not available here: {cpu_kernels_unavailable()}")
    return name


def channel_last(x):
    """The same values laid out (batch, L, dim), as the fused mixer keeps them."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("activation", ["silu", None, "swish"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("length", [1, 3, 50])
def test_backends_match_reference(backend, dtype, kernel, activation, with_bias, length, seeds):
    backend_or_skip(backend)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        # 37 channels: several vector blocks and a partial one; every third seed channel-last
        x = torch.randn(2, 37, length, generator=g, dtype=dtype)
        if seed % 3 == 0:
            x = channel_last(x)
        w = torch.randn(37, kernel, generator=g, dtype=dtype)
        b = torch.randn(37, generator=g, dtype=dtype) if with_bias else None
        grad = torch.randn(2, 37, length, generator=g, dtype=dtype)
        args_r, args_t = leaves(x, w, b), leaves(x, w, b)
        out_r = causal_conv1d_reference(*args_r, activation=activation)
        out_t = causal_conv1d(*args_t, activation=activation, backend=backend)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_t, out_r, **tol, msg=lambda m: f"seed {seed}: {m}")
        out_r.backward(grad)
        out_t.backward(grad)
        for name, a, r in zip(("x", "weight", "bias"), args_t, args_r):
            if r is not None:
                torch.testing.assert_close(a.grad, r.grad, **tol, msg=lambda m: f"seed {seed}, d{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_saturated_silu_matches_reference(backend, dtype, seeds):
    """Pre-activations far outside randn's range (|value| up to ~1000: exp(-x) overflows to inf in the sigmoid
    below -88.7 in float), as an untrained or diverging model makes them: finite, and the reference's values,
    gradients included."""
    backend_or_skip(backend)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(2, 37, 30, generator=g, dtype=dtype) * 200.0)
        w, b = torch.randn(37, 4, generator=g, dtype=dtype), torch.randn(37, generator=g, dtype=dtype)
        grad = torch.randn(2, 37, 30, generator=g, dtype=dtype)
        # the reference in float64 on the same values: an fp32 reference rounds too, and on one element in ~10^4 its
        # rounding and the backend's added up past the tolerance (a fresh-seed CI failure, dx 1.17x the tolerance)
        args_r, args_t = leaves(x.double(), w.double(), b.double()), leaves(x, w, b)
        out_r = causal_conv1d_reference(*args_r, activation="silu")
        out_t = causal_conv1d(*args_t, activation="silu", backend=backend)
        assert torch.isfinite(out_t).all(), f"seed {seed}: non-finite outputs"
        scale = dict(rtol=1e-5, atol=1e-5 * out_r.abs().max().item()) if dtype == torch.float32 else \
            dict(rtol=1e-12, atol=1e-12 * out_r.abs().max().item())
        torch.testing.assert_close(out_t.double(), out_r, **scale, msg=lambda m: f"seed {seed}: {m}")
        out_r.backward(grad.double())
        out_t.backward(grad)
        for name, a, r in zip(("x", "weight", "bias"), args_t, args_r):
            tol = dict(rtol=scale["rtol"], atol=scale["rtol"] * r.grad.abs().max().item())
            torch.testing.assert_close(a.grad.double(), r.grad, **tol, msg=lambda m: f"seed {seed}, d{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_is_causal_and_matches_a_hand_computed_case(backend):
    backend_or_skip(backend)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    w = torch.tensor([[0.5, -1.0, 2.0]])                      # taps for t-2, t-1, t
    expected = torch.tensor([[[2.0, 3.0, 4.5, 6.0]]]) + 0.25  # e.g. t=2: 0.5*1 - 1*2 + 2*3
    for fn in (causal_conv1d_reference, lambda *a, **k: causal_conv1d(*a, **k, backend=backend)):
        torch.testing.assert_close(fn(x, w, torch.tensor([0.25]), activation=None), expected)
    # perturbing the future never changes the past
    x2 = x.clone()
    x2[..., 3] = 100.0
    assert torch.equal(causal_conv1d(x2, w, backend=backend)[..., :3], causal_conv1d(x, w, backend=backend)[..., :3])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kernel", [2, 4])
def test_reverse_is_the_conv_of_the_flipped_sequence(backend, dtype, kernel, seeds):
    """reverse=True (right to left, as the backward branch of Vim's mixer runs) equals the causal conv of x flipped
    along L, flipped back, forward and every gradient, in both layouts of x; and a hand-computed anti-causal case."""
    backend_or_skip(backend)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 37, 45, generator=g, dtype=dtype)
        if seed % 2 == 0:
            x = channel_last(x)
        w, b = torch.randn(37, kernel, generator=g, dtype=dtype), torch.randn(37, generator=g, dtype=dtype)
        grad = torch.randn(3, 37, 45, generator=g, dtype=dtype)
        args_r, args_t = leaves(x, w, b), leaves(x, w, b)
        out_r = causal_conv1d_reference(args_r[0].flip(-1), *args_r[1:], activation="silu").flip(-1)
        out_t = causal_conv1d(*args_t, activation="silu", backend=backend, reverse=True)
        torch.testing.assert_close(out_t, out_r, **tol, msg=lambda m: f"seed {seed}: {m}")
        out_r.backward(grad)
        out_t.backward(grad)
        for name, a, r in zip(("x", "weight", "bias"), args_t, args_r):
            torch.testing.assert_close(a.grad, r.grad, **tol, msg=lambda m: f"seed {seed}, d{name}: {m}")
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=dtype)
    w = torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype)        # right to left: taps for t+2, t+1, t
    expected = torch.tensor([[[2.0 - 2.0 + 1.5, 4.0 - 3.0 + 2.0, 6.0 - 4.0, 8.0]]], dtype=dtype)
    torch.testing.assert_close(causal_conv1d(x, w, activation=None, backend=backend, reverse=True), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anti-causal"])
def test_cpp_channel_last_forward_equals_the_gathered_one(dtype, kernel, reverse, seeds):
    """Inputs whose channels are adjacent (a slice of a (B, L, 2C) projection) take the kernel's row-streaming
    forward; a contiguous copy of the same values takes the gathering one. Same terms in the same order: the same
    bits, for sequences shorter than the kernel, longer than the kernel's runs of steps, and a partial vector of
    channels; and the reference's values."""
    backend_or_skip("cpp")
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for length in (1, 3, 70):
            x = torch.randn(3, length, 2 * 37 + 5, generator=g, dtype=dtype).transpose(1, 2)[:, 5:42]
            w, b = torch.randn(37, kernel, generator=g, dtype=dtype), torch.randn(37, generator=g, dtype=dtype)
            for activation, bias in (("silu", b), (None, None)):
                streamed = causal_conv1d(x, w, bias, activation=activation, backend="cpp", reverse=reverse)
                gathered = causal_conv1d(x.contiguous(), w, bias, activation=activation, backend="cpp",
                                         reverse=reverse)
                assert torch.equal(streamed, gathered), f"seed {seed}, L {length}, {activation}"
                flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
                expected = flip(causal_conv1d_reference(flip(x), w, bias, activation=activation))
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(streamed, expected, **tol)


def test_cpp_output_layout_and_opcheck(seeds):
    backend_or_skip("cpp")
    g = torch.Generator().manual_seed(seeds[0])
    x = channel_last(torch.randn(2, 20, 9, generator=g))
    w, b = torch.randn(20, 4, generator=g), torch.randn(20, generator=g)
    out = causal_conv1d(x, w, b, backend="cpp")
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, causal_conv1d_reference(x, w, b))
    # a slice of a (B, L, 2C) projection (channels adjacent, not dense): channel-last out, so (B*L, C) is a view
    xz = torch.randn(2, 9, 40, generator=g).transpose(1, 2)
    out = causal_conv1d(xz[:, :20], w, b, backend="cpp")
    assert out.stride() == (9 * 20, 1, 20) and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, causal_conv1d_reference(xz[:, :20], w, b))
    contiguous = torch.randn(2, 20, 9, generator=g)
    assert causal_conv1d(contiguous, w, b, backend="cpp").is_contiguous()
    # the C++-registered op with the fake, autograd and schema registered from Python when the library loads
    op = cpu_kernels().causal_conv1d_fwd.default
    args = [t.requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(op, (*args, True, False))
    torch.library.opcheck(op, (*args, True, True))   # right to left
    torch.library.opcheck(op, (args[0], args[1], torch.empty(0), False, False))
    sliced = [xz[:, :20].detach().requires_grad_(), w, b]
    torch.library.opcheck(op, (*sliced, True, True))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_cpp_one_path_eager_compiled_and_inference_agree(with_bias, seeds):
    """Every call (parameters included) runs the one C++-registered op: eager with autograd, compiled (fullgraph)
    and inference give the same output, layout and gradients bit for bit, and match the reference."""
    backend_or_skip("cpp")
    g = torch.Generator().manual_seed(seeds[0])
    x = torch.randn(3, 64, 80, generator=g).transpose(1, 2)[:, :37]       # a channel-adjacent slice, as in Vim
    w = torch.nn.Parameter(torch.randn(37, 4, generator=g))
    b = torch.nn.Parameter(torch.randn(37, generator=g)) if with_bias else None
    grad = torch.randn(3, 37, 64, generator=g)

    def forward_backward(fn):
        args = leaves(x, w, b)
        out = fn(args[0], w, b)
        out.backward(grad)
        grads = [args[0].grad, w.grad.clone(), None if b is None else b.grad.clone()]
        w.grad = None
        if b is not None:
            b.grad = None
        return out.detach(), grads

    def conv(x, w, b):
        return causal_conv1d(x, w, b, backend="cpp")

    eager = forward_backward(conv)
    traced = forward_backward(torch.compile(conv, fullgraph=True, backend="aot_eager"))
    reference = forward_backward(causal_conv1d_reference)
    with torch.inference_mode():
        direct = conv(x, w, b)
    assert direct.grad_fn is None
    assert torch.equal(direct, eager[0]) and direct.stride() == eager[0].stride()
    assert torch.equal(eager[0], traced[0]) and eager[0].stride() == traced[0].stride()
    torch.testing.assert_close(eager[0], reference[0])
    for a, t, r in zip(eager[1], traced[1], reference[1]):
        assert (a is None and t is None) or torch.equal(a, t)
        if r is not None:
            torch.testing.assert_close(a, r)


def test_cpp_gradients_do_not_depend_on_the_thread_count(seeds):
    backend_or_skip("cpp")
    g = torch.Generator().manual_seed(seeds[0])
    x, w, b = torch.randn(5, 40, 23, generator=g), torch.randn(40, 4, generator=g), torch.randn(40, generator=g)
    grad = torch.randn(5, 40, 23, generator=g)
    saved, grads = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            args = leaves(x, w, b)
            causal_conv1d(*args, backend="cpp").backward(grad)
            grads.append([a.grad for a in args])
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_mixed_dtypes_compute_in_the_wider_one(backend, seeds):
    backend_or_skip(backend)
    g = torch.Generator().manual_seed(seeds[0])
    x = torch.randn(2, 8, 20, generator=g).bfloat16()
    w = torch.randn(8, 4, generator=g)
    b = torch.randn(8, generator=g)
    out = causal_conv1d(x, w, b, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, causal_conv1d_reference(x, w, b))
    torch.testing.assert_close(out.float(), causal_conv1d_reference(x.float(), w, b), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros(3, 5)), "x must have shape"),
    (dict(weight=torch.zeros(3, 1, 4)), "weight must have shape"),
    (dict(weight=torch.zeros(2, 4)), "weight must have shape"),
    (dict(bias=torch.zeros(4)), "bias must have shape"),
    (dict(activation="relu"), "activation must be one of"),
])
def test_bad_arguments_are_named(bad, message):
    args = dict(x=torch.zeros(2, 3, 5), weight=torch.zeros(3, 4), bias=torch.zeros(3), activation="silu")
    args.update(bad)
    for fn in (causal_conv1d, causal_conv1d_cpp, causal_conv1d_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4), backend="cuda")


def _conv_ready():
    return torch.cuda.is_available() and conv_cuda.cuda_unavailable() is None


@pytest.mark.gpu
@pytest.mark.skipif(not _conv_ready(), reason="needs CUDA and causal-conv1d")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernel_matches_torch(dtype, seeds):
    g = torch.Generator().manual_seed(seeds[0])
    x, w, b = torch.randn(2, 64, 197, generator=g), torch.randn(64, 4, generator=g), torch.randn(64, generator=g)
    grad = torch.randn(2, 64, 197, generator=g)
    args_c = leaves(x.to(dtype).cuda(), w.cuda(), b.cuda())
    args_t = leaves(x.to(dtype).cuda(), w.cuda(), b.cuda())
    out_c = causal_conv1d(*args_c, backend="cuda")
    out_t = causal_conv1d(*args_t, backend="torch")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_c, out_t, **tol)
    out_c.backward(grad.to(dtype).cuda())
    out_t.backward(grad.to(dtype).cuda())
    for a, r in zip(args_c, args_t):
        torch.testing.assert_close(a.grad, r.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anti-causal"])
def test_cpp_16bit_inference_reads_and_writes_its_dtype(dtype, reverse, seeds):
    """Without autograd a 16-bit x is read and the output written in its dtype (float32 weight and bias, math in
    float32, as under CPU autocast): no cast of x, the same bits as the float32 kernel on the same values rounded
    once, and the float64 reference within half an ulp of the output dtype (2^-8 of each value in bfloat16, 2^-10
    in float16, plus 1e-6). Channel-last (a slice of a (B, L, 2C) projection) and contiguous x, 37 channels.
    With autograd the call computes in float32 and the gradient reaches x in its dtype."""
    backend_or_skip("cpp")
    rtol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}[dtype]
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        w, b = torch.randn(37, 4, generator=g), torch.randn(37, generator=g)
        xz = torch.randn(2, 29, 74, generator=g).to(dtype).transpose(1, 2)
        for x in (xz[:, :37], xz[:, :37].contiguous()):
            with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
                out = causal_conv1d(x, w, b, backend="cpp", reverse=reverse)
            casts = [e.input_shapes for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
            assert casts == [], f"x was copied: {casts}"
            assert out.dtype == dtype and out.stride(1) == (1 if x.stride(1) == 1 else 29)
            with torch.no_grad():
                out32 = causal_conv1d(x.float(), w, b, backend="cpp", reverse=reverse)
            assert torch.equal(out, out32.to(dtype)), f"seed {seed}"
            xd = x.double().flip(-1) if reverse else x.double()
            ref = causal_conv1d_reference(xd, w.double(), b.double())
            ref = ref.flip(-1) if reverse else ref
            torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=1e-6)
        x = xz[:, :37].detach().requires_grad_()
        out = causal_conv1d(x, w, b, backend="cpp", reverse=reverse)
        out.backward(torch.ones_like(out))
        assert out.dtype == dtype and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_cpp_16bit_dtype_rules_are_named():
    backend_or_skip("cpp")
    x = torch.randn(1, 8, 5).bfloat16()
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(dim, K\\) tensor of x's compute dtype"):
        cpu_kernels().causal_conv1d_fwd(x, torch.randn(8, 4).bfloat16(), torch.empty(0), True, False)
    with pytest.raises(RuntimeError, match="causal_conv1d_bwd computes float32 and float64 inputs"):
        cpu_kernels().causal_conv1d_bwd(x, x, torch.randn(8, 4), torch.empty(0), True, False)
