"""The Triton resampling kernel against the torch path (values and gradients w.r.t. image, band bounds and token
edges), gradcheck, the out= contract, half precision, determinism, torch.library registration, and an offline
compile for sm_90 (real Triton compiler + ptxas, no GPU needed).

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py). The ``gpu`` tests need the compiled kernels:
run them on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m gpu tests/kernels``.
"""
import textwrap

import pytest
import torch
from einops import rearrange

pytest.importorskip("triton")

from dartmamba.tokenizer import DartGeometry, partition, resample_torch  # noqa: E402
from dartmamba_kernels.resample import interpreted, resample_triton  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreted(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        interpreted(), reason="compiled kernels needed: run with TRITON_INTERPRET=0")]),
]

CASES = [  # (B, C, H, W, G, N, R, p)
    (1, 3, 24, 32, (3, 4), 6, None, 4),
    (1, 3, 64, 64, (8, 8), 30, None, 8),
    (2, 2, 40, 48, (5, 6), 13, 3, 5),       # p not a power of two, batch > 1
    (3, 1, 32, 40, (4, 5), 20, None, 6),
    (1, 2, 32, 32, (4, 4), 6, 6, 4),        # as many bands as tokens: skewed tokens span several bands
]


def make_geometry(batch, grid, num_tokens, num_rows, size, skew, device, dtype=torch.float32):
    scores = torch.exp(skew * torch.rand(batch, *grid, dtype=torch.float64))
    geometry = partition(scores, num_tokens, num_rows, img_size=size).to(device=device, dtype=dtype)
    bounds = geometry.band_bounds.clone().requires_grad_()
    edges = geometry.token_edges.clone().requires_grad_()
    return DartGeometry(bounds, edges, geometry.grid_size, geometry.img_size)


def assert_close_scaled(actual, expected, rtol=1e-5, msg=""):
    """Relative error w.r.t. the tensor's scale (sums of mixed-sign terms have no meaningful per-entry error)."""
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{msg}: {m}")


def grads(out, geometry, images, grad_out):
    return torch.autograd.grad(out, (images, geometry.band_bounds, geometry.token_edges), grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampling", ["paper", "center"])
@pytest.mark.parametrize("skew", [0.0, 8.0])
def test_matches_torch_values_and_gradients(device, case, sampling, skew, seed):
    batch, chans, height, width, grid, num_tokens, num_rows, p = case
    images = torch.randn(batch, chans, height, width, device=device, requires_grad=True)
    geometry = make_geometry(batch, grid, num_tokens, num_rows, (height, width), skew, device)
    out = resample_triton(images, geometry, p, sampling)
    ref = resample_torch(images, geometry, p, sampling)
    assert out.shape == (batch, num_tokens, chans, p, p) and out.dtype == images.dtype
    info = f"seed={seed} case={case} {sampling} skew={skew}"
    assert_close_scaled(out, ref, msg=info)
    grad_out = torch.randn_like(ref)
    for name, got, want in zip(("image", "band_bounds", "token_edges"), grads(out, geometry, images, grad_out),
                               grads(ref, geometry, images, grad_out)):
        assert_close_scaled(got, want, msg=f"{info} d/d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_paper_mode_is_stride2_patchify_exactly(device, seed):
    images = torch.randn(2, 3, 64, 64, device=device)
    scores = torch.ones(2, 4, 4)
    geometry = partition(scores, 16, img_size=64).to(device)
    expected = rearrange(images[:, :, ::2, ::2], "b c (gh p) (gw q) -> b (gh gw) c p q", p=8, q=8)
    assert torch.equal(resample_triton(images, geometry, 8, "paper"), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", ["paper", "center"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gradcheck_float64(device, sampling, deterministic, seed):
    images = torch.randn(1, 2, 12, 16, dtype=torch.float64, device=device, requires_grad=True)
    scores = torch.exp(3 * torch.rand(1, 3, 4, dtype=torch.float64))
    geometry = partition(scores, 5, img_size=(12, 16))
    # Keep every sample off the clamp boundary y = 0 / strip start, where the derivative is one-sided.
    bounds = geometry.band_bounds.clone()
    edges = geometry.token_edges.clone()
    bounds[:, 0] = 0.1
    edges[:, 0] = 0.1
    bounds = bounds.to(device).requires_grad_()
    edges = edges.to(device).requires_grad_()

    def fn(img, bb, te):
        geo = DartGeometry(bb, te, geometry.grid_size, geometry.img_size)
        return resample_triton(img, geo, 3, sampling, deterministic=deterministic)

    assert torch.autograd.gradcheck(fn, (images, bounds, edges), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    # and the float64 gradients agree with the torch path's
    geo = DartGeometry(bounds, edges, geometry.grid_size, geometry.img_size)
    grad_out = torch.randn(1, 5, 2, 3, 3, dtype=torch.float64, device=device)
    for got, want in zip(grads(fn(images, bounds, edges), geo, images, grad_out),
                         grads(resample_torch(images, geo, 3, sampling), geo, images, grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", ["paper", "center"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_out_buffer_poisoned_with_nan_is_fully_written(device, sampling, dtype, seed):
    images = torch.randn(2, 3, 40, 48, device=device).to(dtype)
    geometry = make_geometry(2, (5, 6), 13, 3, (40, 48), 6.0, device).detach()
    out = torch.full((2, 13, 3, 5, 5), float("nan"), device=device, dtype=dtype)
    result = resample_triton(images, geometry, 5, sampling, out=out)
    assert result is out
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, resample_triton(images, geometry, 5, sampling), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_out_rejects_autograd_and_bad_buffers(device):
    images = torch.randn(1, 3, 24, 32, device=device, requires_grad=True)
    geometry = make_geometry(1, (3, 4), 6, None, (24, 32), 0.0, device).detach()
    with pytest.raises(RuntimeError, match="out="):
        resample_triton(images, geometry, 4, out=torch.empty(1, 6, 3, 4, 4, device=device))
    with torch.no_grad():
        resample_triton(images, geometry, 4, out=torch.empty(1, 6, 3, 4, 4, device=device))
        with pytest.raises(ValueError, match="shape"):
            resample_triton(images, geometry, 4, out=torch.empty(1, 6, 3, 4, 5, device=device))
        with pytest.raises(ValueError, match="contiguous"):
            resample_triton(images, geometry, 4, out=torch.empty(1, 6, 3, 4, 4, 2, device=device)[..., 0])
    with pytest.raises(ValueError, match="size"):
        resample_triton(images[:, :, :20], geometry, 4)
    with pytest.raises(ValueError, match="sampling"):
        resample_triton(images, geometry, 4, "nearest")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", ["paper", "center"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images(device, sampling, dtype, seed):
    images = torch.randn(2, 3, 40, 48, device=device, requires_grad=True)
    geometry = make_geometry(2, (5, 6), 13, 3, (40, 48), 6.0, device)
    low = images.detach().to(dtype).requires_grad_()
    out = resample_triton(low, geometry, 5, sampling)
    assert out.dtype == dtype
    # same fp32 arithmetic on the same (rounded) inputs as the torch path, one rounding at the end
    torch.testing.assert_close(out, resample_torch(low, geometry, 5, sampling), rtol=0, atol=0)
    ref32 = resample_triton(images, geometry, 5, sampling)
    torch.testing.assert_close(out.float(), ref32, rtol=2e-2, atol=2e-2)
    grad_out = torch.randn_like(ref32)
    got, want = grads(out, geometry, low, grad_out.to(dtype)), grads(ref32, geometry, images, grad_out)
    assert [g.dtype for g in got] == [dtype, torch.float32, torch.float32]
    for g, w in zip(got, want):
        assert_close_scaled(g.float(), w, rtol=3e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", ["paper", "center"])
def test_deterministic_backward_is_bitwise_reproducible(device, sampling, seed):
    # on a GPU: paper shapes, so that thousands of atomics race for the same pixels and bounds
    shape, grid, num_tokens, p = ((4, 3, 448, 448), (14, 14), 196, 16) if device == "cuda" else \
        ((2, 3, 40, 48), (5, 6), 13, 5)
    images = torch.randn(*shape, device=device, requires_grad=True)
    geometry = make_geometry(shape[0], grid, num_tokens, None, shape[-2:], 6.0, device)
    grad_out = torch.randn(shape[0], num_tokens, shape[1], p, p, device=device)
    runs = [grads(resample_triton(images, geometry, p, sampling, deterministic=True), geometry, images, grad_out)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    atomic = grads(resample_triton(images, geometry, p, sampling), geometry, images, grad_out)
    for det, fast in zip(runs[0], atomic):
        assert_close_scaled(det, fast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the interpreter casting NaN to int64
def test_deterministic_backward_propagates_non_finite_gradients(device):
    """Fixed-point sums cannot carry a NaN: the whole image / band-bound gradient becomes NaN instead (token edges
    need no atomics and propagate NaN like the torch path)."""
    images = torch.randn(1, 2, 24, 32, device=device, requires_grad=True)
    geometry = make_geometry(1, (3, 4), 6, None, (24, 32), 4.0, device)
    grad_out = torch.randn(1, 6, 2, 4, 4, device=device)
    grad_out[0, 2, 1, 0, 0] = float("nan")
    out = resample_triton(images, geometry, 4, deterministic=True)
    g_image, g_bounds, g_edges = grads(out, geometry, images, grad_out)
    assert torch.isnan(g_image).all() and torch.isnan(g_bounds).all()
    assert torch.isnan(g_edges[0, 2:4]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_partial_gradients_and_scores_chain(device, seed):
    """Only some inputs need gradients; the chain through partition() reaches the scores."""
    images = torch.randn(1, 3, 24, 32, device=device)
    scores = torch.exp(4 * torch.rand(1, 3, 4, device=device)).requires_grad_()
    geometry = partition(scores, 6, img_size=(24, 32))
    grad_out = torch.randn(1, 6, 3, 4, 4, device=device)
    (got,) = torch.autograd.grad(resample_triton(images, geometry, 4), scores, grad_out, retain_graph=True)
    (want,) = torch.autograd.grad(resample_torch(images, geometry, 4), scores, grad_out)
    assert_close_scaled(got, want)
    images.requires_grad_()
    (got,) = torch.autograd.grad(resample_triton(images, geometry.detach(), 4), images, grad_out)
    (want,) = torch.autograd.grad(resample_torch(images, geometry.detach(), 4), images, grad_out)
    assert_close_scaled(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_registration_and_compile(device, seed):
    from dartmamba_kernels.resample import _resample_op

    images = torch.randn(1, 2, 24, 32, device=device, requires_grad=True)
    geometry = make_geometry(1, (3, 4), 6, None, (24, 32), 4.0, device)
    args = (images, geometry.band_bounds_px.detach().requires_grad_(),
            geometry.token_edges_px.detach().requires_grad_(), 4, True, False)
    torch.library.opcheck(_resample_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                          "test_faketensor"))

    def loss(img, bb, te):
        geo = DartGeometry(bb, te, geometry.grid_size, geometry.img_size)
        return resample_triton(img, geo, 4, "center").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    inputs = (images, geometry.band_bounds, geometry.token_edges)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(loss(*inputs), inputs)
    for g, w in zip(got, want):
        assert_close_scaled(g, w)


_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import dartmamba_kernels.resample as K

    target = GPUTarget("cuda", 90, 32)
    common = dict(C=3, P=16, BLOCK_T=2, BLOCK_P=16, CLAMP_LO_INCL=False)
    ints = {"N": "i32", "H": "i32", "W": "i32", "R": "i32"}

    def build(kernel, ptrs, constexprs, warps):
        sig = {**{k: "*" + v for k, v in ptrs.items()}, **ints, **{k: "constexpr" for k in constexprs}}
        src = ASTSource(kernel, sig, constexprs=constexprs)
        return triton.compile(src, target=target, options={"num_warps": warps, "enable_fp_fusion": False})

    for img, geo, paper in [("fp32", "fp32", True), ("bf16", "fp32", False), ("fp16", "fp64", True),
                            ("fp64", "fp64", False)]:
        build(K._resample_fwd_kernel, dict(img_ptr=img, bb_ptr=geo, te_ptr=geo, out_ptr=img),
              dict(common, PAPER=paper, GEOM_F64=geo == "fp64", WORK_F64=img == "fp64"), 4)
    variants = [("fp32", True, False, True, True), ("bf16", False, True, True, True),
                ("fp64", True, True, False, True), ("fp32", False, False, True, False)]
    for img, paper, fixed, need_img, need_geom in variants:
        work = "fp64" if img == "fp64" else "fp32"
        acc = "i64" if fixed else work
        build(K._resample_bwd_kernel, dict(go_ptr=img, img_ptr=img, bb_ptr="fp32", te_ptr="fp32", gimg_ptr=acc,
                                           gbb_ptr=acc, glo_ptr=work, ghi_ptr=work, scale_ptr=work),
              dict(common, PAPER=paper, GEOM_F64=False, WORK_F64=img == "fp64", NEED_IMG=need_img,
                   NEED_GEOM=need_geom, FIXED=fixed), 4)
    print("compiled")
""")


def test_kernels_compile_for_sm90_offline(compile_offline_for_sm90):
    """The real Triton compiler (TTIR -> PTX -> cubin with the bundled ptxas) accepts every kernel variant: catches
    what the interpreter lets through. No GPU needed."""
    compile_offline_for_sm90(_COMPILE_SCRIPT)
