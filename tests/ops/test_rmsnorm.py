"""RMSNorm with fused residual: the torch backend against the reference, mamba-ssm's dtype semantics, the
module's checkpoint layout, and the Triton wrapper's plumbing against stand-in kernels."""

import pytest
import torch

from dartmamba import backends
from dartmamba.backends import BackendUnavailableError
from dartmamba.ops import RMSNorm, rms_norm, rms_norm_cpp, rms_norm_reference, rms_norm_triton
from dartmamba.compat import mamba_ssm as compat_mamba
from dartmamba.ops._jit import cpu_kernels_unavailable
from dartmamba.ops.rmsnorm import triton as rn_triton


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def backward_all(outputs, grads):
    torch.autograd.backward([o for o in outputs], [g for g in grads])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "noresidual"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("prenorm", [True, False], ids=["prenorm", "postnorm"])
def test_torch_backend_matches_reference(dtype, with_residual, with_bias, prenorm, seeds):
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 7, 24, generator=g, dtype=dtype)
        w = torch.rand(24, generator=g, dtype=dtype) + 0.5
        b = torch.randn(24, generator=g, dtype=dtype) if with_bias else None
        r = torch.randn(2, 7, 24, generator=g, dtype=dtype) if with_residual else None
        args_r, args_t = leaves(x, w, b, r), leaves(x, w, b, r)
        kw = dict(eps=1e-5, prenorm=prenorm)
        out_r = rms_norm_reference(args_r[0], args_r[1], args_r[2], args_r[3], **kw)
        out_t = rms_norm(args_t[0], args_t[1], args_t[2], args_t[3], backend="torch", **kw)
        out_r, out_t = (out_r if prenorm else (out_r,)), (out_t if prenorm else (out_t,))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out_r]
        for a, e in zip(out_t, out_r):
            torch.testing.assert_close(a, e, **tol, msg=lambda m: f"seed {seed}: {m}")
        backward_all(out_r, grads)
        backward_all(out_t, grads)
        for name, a, e in zip(("x", "weight", "bias", "residual"), args_t, args_r):
            if e is not None:
                torch.testing.assert_close(a.grad, e.grad, **tol, msg=lambda m: f"seed {seed}, d{name}: {m}")


def cpp_or_skip():
    reason = cpu_kernels_unavailable()
    if reason is not None:
        pytest.skip(f"the C++ CPU kernels are not available here: {reason}")


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float64), (torch.bfloat16,) * 2, (torch.float16, torch.float32)],
                         ids=["fp32", "fp64", "bf16-fp32res", "fp64res", "bf16", "fp16-fp32res"])
@pytest.mark.parametrize("dim", [37, 192])
@pytest.mark.parametrize("options", [dict(residual=True, prenorm=True, residual_in_fp32=True),
                                     dict(residual=True, prenorm=True), dict(bias=True), dict()],
                         ids=["vim-block", "prenorm", "bias", "plain"])
def test_cpp_backend_matches_reference(dtypes, dim, options, seeds):
    """The C++ forward (calls without autograd) against the reference: values and dtypes of both outputs, rows of
    any stride (x a strided slice), a partial vector at the end of the row, mixed input dtypes."""
    cpp_or_skip()
    x_dtype, res_dtype = dtypes
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 9, dim + 4, generator=g, dtype=torch.float64)[..., 2:2 + dim].to(x_dtype)
        w = (torch.rand(dim, generator=g, dtype=torch.float64) + 0.5).to(x_dtype)
        b = torch.randn(dim, generator=g, dtype=torch.float64).to(x_dtype) if options.get("bias") else None
        r = torch.randn(3, 9, dim, generator=g, dtype=torch.float64).to(res_dtype) if options.get("residual") else None
        kw = dict(eps=1e-5, prenorm=options.get("prenorm", False),
                  residual_in_fp32=options.get("residual_in_fp32", False))
        expected = rms_norm_reference(x, w, b, r, **kw)
        with torch.no_grad():
            actual = rms_norm(x, w, b, r, backend="cpp", **kw)
        expected, actual = (expected, actual) if kw["prenorm"] else ((expected,), (actual,))
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype and a.shape == e.shape
            tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[e.dtype]
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"seed {seed}: {m}")


def test_cpp_backend_takes_the_calls_without_autograd(monkeypatch):
    """"auto" on CPU: the C++ kernel for calls that need no gradient (no_grad, inference_mode, inputs that do not
    require one), the torch ops for calls that need a gradient; forcing "cpp" on one raises, naming why."""
    cpp_or_skip()
    ran = []
    for impl in backends.implementations("rmsnorm"):
        monkeypatch.setattr(impl, "fn", lambda *a, _fn=impl.fn, _name=impl.name, **k: ran.append(_name) or _fn(*a, **k))
    x, w = torch.randn(2, 5, 16), torch.rand(16) + 0.5
    with torch.no_grad():
        rms_norm(x, w.requires_grad_())
    with torch.inference_mode():
        rms_norm(x, w)
    rms_norm(x, w.detach())
    out = rms_norm(x.requires_grad_(), w)
    assert ran == ["cpp", "cpp", "cpp", "torch"]
    out.sum().backward()
    assert x.grad is not None
    with pytest.raises(BackendUnavailableError, match="'cpp'.*no backward"):
        rms_norm(x, w, backend="cpp")


def test_normalises_to_unit_rms():
    x = torch.randn(3, 5, 64, dtype=torch.float64) * 7
    out = rms_norm(x, torch.ones(64, dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(out.square().mean(-1), torch.ones(3, 5, dtype=torch.float64))


def test_residual_dtypes_follow_mamba_ssm():
    x = torch.randn(2, 3, 16).bfloat16()
    w = torch.ones(16)
    out, res = rms_norm(x, w, prenorm=True, residual_in_fp32=True)        # first Vim block: no residual yet
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float32
    out2, res2 = rms_norm(x, w, residual=res, prenorm=True, residual_in_fp32=True)
    assert out2.dtype == torch.bfloat16 and res2.dtype == torch.float32
    torch.testing.assert_close(res2, res + x.float())
    _, res3 = rms_norm(x, w, residual=x, prenorm=True)                    # no fp32 request: residual's dtype
    assert res3.dtype == torch.bfloat16
    _, res4 = rms_norm(x, w, residual=x, prenorm=True, residual_in_fp32=True)
    assert res4.dtype == torch.float32                                    # always fp32 when asked (see module doc)
    # the normalisation uses the unrounded fp32 sum, not the rounded residual
    r = torch.randn(2, 3, 16).bfloat16()
    expected = rms_norm_reference(x.float() + r.float(), w)
    torch.testing.assert_close(rms_norm(x, w, residual=r).float(), expected, rtol=1e-2, atol=1e-2)


def test_module_layout_and_checkpoint_loading():
    norm = RMSNorm(12, eps=1e-6)
    assert list(norm.state_dict()) == ["weight"] and norm.eps == 1e-6
    torch.testing.assert_close(norm.weight.detach(), torch.ones(12))
    w = torch.rand(12) + 0.5
    norm.load_state_dict({"weight": w})                   # as hustvl/Vim's norm_f.weight
    x, r = torch.randn(2, 4, 12), torch.randn(2, 4, 12)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, w, eps=1e-6))
    out, res = norm(x, residual=r, prenorm=True, residual_in_fp32=True)
    torch.testing.assert_close(out, rms_norm_reference(x + r, w, eps=1e-6))
    torch.testing.assert_close(res, x + r)
    assert "12" in repr(norm)


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.ones(5)), "weight must have shape"),
    (dict(bias=torch.ones(3)), "bias must have shape"),
    (dict(residual=torch.ones(2, 7)), "residual must have"),
    (dict(x=torch.ones(2, 8, dtype=torch.long)), "x must be a floating-point"),
])
def test_bad_arguments_are_named(bad, message):
    args = dict(x=torch.ones(2, 8), weight=torch.ones(8))
    args.update(bad)
    for fn in (rms_norm, rms_norm_reference, rms_norm_cpp):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_triton_backend_refuses_cpu_tensors():
    with pytest.raises(BackendUnavailableError, match="'triton'"):
        rms_norm(torch.ones(2, 8), torch.ones(8), backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# The Triton wrapper, against stand-ins with the signatures of mamba-ssm 2.x's _layer_norm_fwd / _layer_norm_bwd
# ----------------------------------------------------------------------------------------------------------------
def fake_layer_norm_fwd(x, weight, bias, eps, residual=None, x1=None, weight1=None, bias1=None, dropout_p=0.0,
                        rowscale=None, out_dtype=None, residual_dtype=None, is_rms_norm=False,
                        return_dropout_mask=False):
    assert is_rms_norm and x.dim() == 2 and x.stride(-1) == 1
    if residual is not None:
        residual_dtype = residual.dtype
    total = x.float() if residual is None else x.float() + residual.float()
    rstd = torch.rsqrt(total.square().mean(-1) + eps)
    y = total * rstd[:, None] * weight.float()
    if bias is not None:
        y = y + bias.float()
    stored = residual is not None or (residual_dtype is not None and residual_dtype != x.dtype)
    res_out = total.to(residual_dtype if residual_dtype is not None else x.dtype) if stored else x
    return y.to(x.dtype), None, None, rstd, res_out, None, None, None


def fake_layer_norm_bwd(dy, x, weight, bias, eps, mean, rstd, dresidual=None, dy1=None, weight1=None, bias1=None,
                        seeds=None, dropout_p=0.0, rowscale=None, has_residual=False, has_x1=False,
                        is_rms_norm=False, x_dtype=None, recompute_output=False):
    assert is_rms_norm and mean is None and x.dim() == 2 and dy.shape == x.shape
    xf, dyf = x.float(), dy.float()
    xhat = xf * rstd[:, None]
    g = dyf * weight.float()
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dresidual is not None:
        dx = dx + dresidual.float()
    dx = dx.to(x.dtype if x_dtype is None else x_dtype)
    dw = (dyf * xhat).sum(0).to(weight.dtype)
    db = dyf.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, (dx if has_residual else None), None, None, None


@pytest.fixture
def fake_triton(monkeypatch):
    compat_mamba.check_layer_norm(fake_layer_norm_fwd, fake_layer_norm_bwd)     # the stand-ins fit the shim
    monkeypatch.setitem(compat_mamba._LOADED, "layer_norm", (fake_layer_norm_fwd, fake_layer_norm_bwd))
    monkeypatch.setattr(rn_triton, "triton_unavailable", lambda: None)


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "noresidual"])
@pytest.mark.parametrize("prenorm", [True, False], ids=["prenorm", "postnorm"])
@pytest.mark.parametrize("residual_in_fp32", [True, False], ids=["fp32res", "samedtype"])
def test_triton_wrapper_plumbing(with_residual, prenorm, residual_in_fp32, seeds, fake_triton):
    g = torch.Generator().manual_seed(seeds[0])
    x = torch.randn(2, 5, 16, generator=g)
    w = torch.rand(16, generator=g) + 0.5
    b = torch.randn(16, generator=g)
    r = torch.randn(2, 5, 16, generator=g) if with_residual else None
    args_t, args_r = leaves(x, w, b, r), leaves(x, w, b, r)
    kw = dict(prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    out_t = rms_norm_triton(*args_t, **kw)
    out_r = rms_norm_reference(*args_r, **kw)
    out_t, out_r = (out_t if prenorm else (out_t,)), (out_r if prenorm else (out_r,))
    grads = [torch.randn(o.shape, generator=g) for o in out_r]
    for a, e in zip(out_t, out_r):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e)
    if prenorm and not with_residual:                      # the residual output must not alias the input x
        assert out_t[1].data_ptr() != args_t[0].data_ptr()
    backward_all(out_t, grads)
    backward_all(out_r, grads)
    for name, a, e in zip(("x", "weight", "bias", "residual"), args_t, args_r):
        if e is not None:
            torch.testing.assert_close(a.grad, e.grad, msg=lambda m: f"d{name}: {m}")


def test_triton_ops_trace_under_compile(fake_triton):
    x, w, r = leaves(torch.randn(2, 5, 16), torch.rand(16) + 0.5, torch.randn(2, 5, 16))

    def loss(x, w, r):
        out, res = rms_norm_triton(x, w, None, r, prenorm=True, residual_in_fp32=True)
        return out.square().sum() + res.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, r), [x, w, r])
    want = torch.autograd.grad(loss(x, w, r), [x, w, r])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def _triton_ready():
    return torch.cuda.is_available() and rn_triton.triton_unavailable() is None


@pytest.mark.gpu
@pytest.mark.skipif(not _triton_ready(), reason="needs CUDA and mamba-ssm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_matches_torch(dtype, seeds):
    g = torch.Generator().manual_seed(seeds[0])
    x = torch.randn(4, 197, 384, generator=g).to(dtype).cuda()
    r = torch.randn(4, 197, 384, generator=g).cuda()
    w = (torch.rand(384, generator=g) + 0.5).cuda()
    args_k, args_t = leaves(x, w, None, r), leaves(x, w, None, r)
    out_k = rms_norm(*args_k, prenorm=True, residual_in_fp32=True, backend="triton")
    out_t = rms_norm(*args_t, prenorm=True, residual_in_fp32=True, backend="torch")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    grads = [torch.randn_like(o) for o in out_t]
    for a, e in zip(out_k, out_t):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, **tol)
    backward_all(out_k, grads)
    backward_all(out_t, grads)
    for a, e in zip(args_k, args_t):
        if e is not None:
            torch.testing.assert_close(a.grad, e.grad, **tol)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual_in_fp32", [True, False], ids=["res-fp32", "res-as-is"])
def test_cpp_16bit_rows_are_converted_in_registers(x_dtype, residual_in_fp32, seeds):
    """A 16-bit x (the mixer's output under autocast) with a float32 residual stream (residual_in_fp32) or a residual
    of x's dtype, and a float32 weight: no cast of x or the residual; out in x's dtype, the same bits as the float32
    kernel on the same values rounded once; the residual out in its dtype, x + residual rounded once."""
    cpp_or_skip()
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 9, 40, generator=g).to(x_dtype)
        r = torch.randn(3, 9, 40, generator=g).to(torch.float32 if residual_in_fp32 else x_dtype)
        w = torch.rand(40, generator=g) + 0.5
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            out, res = rms_norm(x, w, None, r, prenorm=True, residual_in_fp32=residual_in_fp32, backend="cpp")
        casts = [e.input_shapes for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
        assert casts == [], f"an input was copied: {casts}"
        with torch.no_grad():
            out32, res32 = rms_norm(x.float(), w, None, r.float(), prenorm=True, backend="cpp")
        assert out.dtype == x_dtype and res.dtype == (torch.float32 if residual_in_fp32 else x_dtype)
        assert torch.equal(out, out32.to(x_dtype)) and torch.equal(res, res32.to(res.dtype)), f"seed {seed}"
