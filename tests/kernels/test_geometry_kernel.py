"""The fused Triton geometry kernels against the torch references: the partition (values, invariants on random and
degenerate score maps, exact uniform identities, gradients w.r.t. the scores, gradcheck) and the positional-embedding
resampling (values, uniform identity), plus torch.library registration (opcheck) and torch.compile.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py). The ``gpu`` tests need the compiled kernels:
run them on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m gpu tests/kernels``.
"""
import math
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton")

from dartmamba import backends  # noqa: E402
from dartmamba.tokenizer import (DartGeometry, default_num_rows, partition, partition_scores_torch,  # noqa: E402
                                 resample_pos_embed_reference, resample_pos_embed_torch, uniform_geometry)
from dartmamba_kernels.geometry import (interpreted, partition_triton, resample_pos_embed_triton,  # noqa: E402
                                        supports_partition)

from tests.helpers import assert_valid_partition, degenerate_maps  # noqa: E402

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Drop dynamo's compiled frames after each test, so compiles here never count against another test's
    recompile limit."""
    yield
    torch._dynamo.reset()


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreted(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        interpreted(), reason="compiled kernels needed: run with TRITON_INTERPRET=0")]),
]

# (B, (Gh, Gw), N, R): paper shapes, other token counts, odd grids, R = N, R = 1, N = 1, and the largest N
SHAPES = [
    (3, (14, 14), 196, None),
    (2, (14, 14), 121, None),
    (2, (7, 9), 50, None),
    (2, (5, 6), 17, 4),
    (2, (4, 4), 6, 6),
    (2, (1, 5), 3, None),
    (2, (5, 1), 4, None),
    (2, (4, 4), 1, 1),
    (1, (14, 14), 1568, None),
]


def random_scores(batch, grid, generator, dtype=torch.float32, device="cpu"):
    """Several score distributions in one batch: mild, heavy-tailed, and the sigmoid range of the v1 head."""
    kinds = [lambda: torch.rand(*grid, generator=generator) + 1e-3,
             lambda: torch.exp(torch.randn(*grid, generator=generator) * 3),
             lambda: torch.sigmoid(torch.randn(*grid, generator=generator) * 3) + 0.1]
    maps = torch.stack([kinds[i % len(kinds)]() for i in range(batch)])
    return maps.to(device=device, dtype=dtype)


def edge_tolerance(num_rows, grid_w, ulps=4):
    """A few float32 ulps of the largest token edge (the edges live on [0, R Gw])."""
    return ulps * num_rows * grid_w * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_partition_matches_torch_on_random_scores(device, shape, dtype, seed):
    batch, grid, num_tokens, num_rows = shape
    num_rows = num_rows or default_num_rows(num_tokens)
    scores = random_scores(batch, grid, torch.Generator().manual_seed(seed), dtype, device)
    bounds, edges = partition_triton(scores, num_tokens, num_rows)
    ref_bounds, ref_edges = partition_scores_torch(scores, num_tokens, num_rows)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert bounds.dtype == edges.dtype == out_dtype
    assert bounds.shape == (batch, num_rows + 1) and edges.shape == (batch, num_tokens + 1)
    info = f"seed={seed} shape={shape} {dtype}"
    assert_valid_partition(bounds.cpu(), edges.cpu(), *grid, num_rows, num_tokens, info)
    if dtype == torch.float64:   # float64 out: agreement to rounding of the float64 arithmetic
        atol_bounds, atol_edges = 1e-11 * grid[0], 1e-11 * num_rows * grid[1]
    else:                        # float32 out of the same float64 values: a few float32 ulps at most
        atol_bounds, atol_edges = edge_tolerance(1, grid[0]), edge_tolerance(num_rows, grid[1])
    torch.testing.assert_close(bounds, ref_bounds, rtol=0, atol=atol_bounds, msg=info)
    torch.testing.assert_close(edges, ref_edges, rtol=0, atol=atol_edges, msg=info)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid,num_tokens", [((14, 14), 196), ((14, 14), 1568), ((7, 9), 50), ((1, 5), 3),
                                             ((5, 1), 4)])
def test_partition_on_degenerate_scores(device, grid, num_tokens, seed):
    """Spikes (1e6 vs 1e-6), constant maps at 1e-30 / 1 / 1e30, one hot row / column, log-uniform 1e-6..1e6.

    Both implementations are ill-conditioned on these (cdf differences of ~1e-12 masses), so they agree to 1e-5 of
    the strip length rather than to an ulp; both keep every invariant.
    """
    num_rows = default_num_rows(num_tokens)
    maps = degenerate_maps(*grid, torch.Generator().manual_seed(seed))
    for dtype in (torch.float32, torch.float64) if num_tokens < 1000 else (torch.float32,):   # (interpreter time)
        scores = maps.to(device=device, dtype=dtype)
        bounds, edges = partition_triton(scores, num_tokens, num_rows)
        info = f"seed={seed} grid={grid} N={num_tokens} {dtype}"
        assert_valid_partition(bounds.cpu(), edges.cpu(), *grid, num_rows, num_tokens, info)
        ref_bounds, ref_edges = partition_scores_torch(scores, num_tokens, num_rows)
        torch.testing.assert_close(bounds, ref_bounds, rtol=0, atol=1e-5 * grid[0], msg=info)
        torch.testing.assert_close(edges, ref_edges, rtol=0, atol=1e-5 * grid[1] * num_rows, msg=info)


@pytest.mark.skipif(not interpreted(), reason="CPU tensors need TRITON_INTERPRET=1")
@settings(max_examples=20, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 90), st.data())
def test_partition_matches_torch_on_random_shapes(grid_h, grid_w, num_tokens, data):
    """Any grid, token and band count (block sizes from 1 up, R = N, N = 1): same as torch, invariants kept."""
    log_scores = data.draw(st.lists(st.floats(-13.8, 13.8), min_size=grid_h * grid_w, max_size=grid_h * grid_w))
    scores = torch.tensor(log_scores, dtype=torch.float64).exp().view(1, grid_h, grid_w).float()
    num_rows = data.draw(st.integers(1, num_tokens))
    bounds, edges = partition_triton(scores, num_tokens, num_rows)
    assert_valid_partition(bounds, edges, grid_h, grid_w, num_rows, num_tokens)
    ref_bounds, ref_edges = partition_scores_torch(scores, num_tokens, num_rows)
    torch.testing.assert_close(bounds, ref_bounds, rtol=0, atol=1e-5 * grid_h)
    torch.testing.assert_close(edges, ref_edges, rtol=0, atol=1e-5 * grid_w * num_rows)


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_scores_land_exactly_on_the_grid(device):
    for grid, num_tokens in (((14, 14), 196), ((8, 8), 64), ((4, 6), 24)):
        scores = torch.full((2, *grid), 0.37, device=device)
        bounds, edges = partition_triton(scores, num_tokens, grid[0])
        assert torch.equal(bounds.cpu(), torch.arange(grid[0] + 1.0).expand(2, -1))
        assert torch.equal(edges.cpu(), torch.arange(num_tokens + 1.0).expand(2, -1))
    scores = torch.ones(1, 14, 14, device=device)
    ref = partition_scores_torch(scores, 392, 20)
    for got, want in zip(partition_triton(scores, 392, 20), ref):
        assert torch.equal(got, want)


def _grads(fn, scores, grad_bounds, grad_edges):
    bounds, edges = fn(scores)
    return torch.autograd.grad((bounds * grad_bounds).sum() + (edges * grad_edges).sum(), scores)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partition_gradients_match_torch(device, shape, dtype, seed):
    batch, grid, num_tokens, num_rows = shape
    num_rows = num_rows or default_num_rows(num_tokens)
    generator = torch.Generator().manual_seed(seed)
    scores = random_scores(batch, grid, generator, dtype, device).requires_grad_()
    grad_bounds = torch.randn(batch, num_rows + 1, generator=generator, dtype=dtype).to(device)
    grad_edges = torch.randn(batch, num_tokens + 1, generator=generator, dtype=dtype).to(device)
    got = _grads(lambda s: partition_triton(s, num_tokens, num_rows), scores, grad_bounds, grad_edges)
    want = _grads(lambda s: partition_scores_torch(s, num_tokens, num_rows), scores, grad_bounds, grad_edges)
    assert got.dtype == dtype
    scale = want.abs().max().item() or 1.0
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=f"seed={seed} shape={shape} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_partition_gradient_of_one_output_only(device, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = random_scores(2, (6, 5), generator, torch.float64, device).requires_grad_()
    for pick in (0, 1):
        got = torch.autograd.grad(partition_triton(scores, 20, 4)[pick].sin().sum(), scores)[0]
        want = torch.autograd.grad(partition_scores_torch(scores, 20, 4)[pick].sin().sum(), scores)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_partition_gradcheck(device, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.rand(2, 3, 4, generator=generator, dtype=torch.float64) + 0.2).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: partition_triton(s, 9, 3), (scores,))


@pytest.mark.parametrize("device", DEVICES)
def test_partition_op_registration(device, seed):
    """Fake implementation, schema, autograd registration: torch.library.opcheck."""
    scores = (torch.rand(2, 3, 4, dtype=torch.float64) + 0.2).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.dartmamba.partition_triton.default, (scores, 5, 2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_partition_compiles_without_graph_breaks(device, seed):
    scores = (torch.rand(2, 6, 6, dtype=torch.float64) + 0.1).to(device).requires_grad_()

    def fn(s):
        bounds, edges = partition_triton(s, 20, 4)
        return bounds.square().sum() + edges.sin().sum()

    explanation = torch._dynamo.explain(fn)(scores)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(scores)
    grad = torch.autograd.grad(loss, scores)[0]
    want_loss = fn(scores)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(want_loss, scores)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES[1:])
def test_partition_training_path_under_inductor(device, seed):
    """The real compiler: the custom op stays opaque, its registered backward (torch ops) is compiled by inductor.
    GPU only: on CPU inductor's C++ build takes ~30 s cold, and aot_eager above already traces the same joint graph
    (test_partition_compiles_without_graph_breaks)."""
    scores = (random_scores(2, (6, 6), torch.Generator().manual_seed(seed), device=device) + 0.05).requires_grad_()

    def loss(s, fn):
        bounds, edges = fn(s, 20, 4)
        return bounds.square().sum() + edges.sin().sum()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    got = compiled(scores, partition_triton)
    (grad,) = torch.autograd.grad(got, scores)
    want = loss(scores, partition_scores_torch)
    (want_grad,) = torch.autograd.grad(want, scores)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


def test_unsupported_shapes_are_refused_clearly():
    assert supports_partition((14, 14), 196, 14) is None
    assert "tile" in supports_partition((256, 256), 196, 14)
    with pytest.raises(ValueError, match="floating-point"):
        partition_triton(torch.ones(2, 4, 4, dtype=torch.int64), 6, 2)


# ----------------------------------------------------------------------------------------------------------------
# Positional embeddings
# ----------------------------------------------------------------------------------------------------------------
def random_geometry(batch, grid, num_tokens, skew, generator, device):
    scores = torch.exp(skew * torch.rand(batch, *grid, generator=generator, dtype=torch.float64))
    return partition(scores.float(), num_tokens).to(device)


PE_CASES = [  # (B, (Gh, Gw), N, D, skew, one embedding per sample)
    (2, (14, 14), 196, 48, 2.0, False),
    (2, (14, 14), 196, 24, 4.0, True),
    (2, (7, 9), 50, 20, 8.0, True),
    (1, (14, 14), 1568, 8, 3.0, False),
    (2, (5, 1), 4, 3, 5.0, False),
    (2, (4, 4), 6, 130, 20.0, True),     # D across two column blocks, very skewed (wide tokens over many cells)
    (3, (4, 4), 1, 7, 1.0, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pos_embed_matches_torch(device, case, dtype, seed):
    batch, grid, num_tokens, dim, skew, per_sample = case
    generator = torch.Generator().manual_seed(seed)
    geometry = random_geometry(batch, grid, num_tokens, skew, generator, device)
    pe = torch.randn(batch if per_sample else 1, grid[0] * grid[1], dim, generator=generator).to(device, dtype)
    out = resample_pos_embed_triton(pe, geometry)
    want = resample_pos_embed_torch(pe, geometry)
    assert out.shape == (batch, num_tokens, dim) and out.dtype == dtype
    info = f"seed={seed} case={case} {dtype} per_sample={per_sample}"
    if dtype == torch.bfloat16:   # both round the same float64/float32 value to bf16: at most one bf16 ulp apart
        torch.testing.assert_close(out.float(), want.float(), rtol=2 ** -7, atol=1e-6, msg=info)
    else:
        rtol = 1e-12 if dtype == torch.float64 else 2e-6
        scale = want.abs().max().item()
        torch.testing.assert_close(out, want, rtol=rtol, atol=rtol * scale, msg=info)
    if dtype == torch.float64:
        torch.testing.assert_close(out, resample_pos_embed_reference(pe, geometry), rtol=1e-12, atol=1e-12, msg=info)


@pytest.mark.parametrize("device", DEVICES)
def test_pos_embed_uniform_geometry_is_the_grid_exactly(device):
    pe = torch.randn(1, 196, 40, device=device)
    geometry = uniform_geometry(3, 14, 196, device=device)
    assert torch.equal(resample_pos_embed_triton(pe, geometry), pe.expand(3, -1, -1))


@pytest.mark.parametrize("device", DEVICES)
def test_pos_embed_kernel_is_inference_only(device):
    geometry = uniform_geometry(2, 4, 16, device=device)
    pe = torch.randn(1, 16, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        resample_pos_embed_triton(pe, geometry)
    with torch.no_grad():
        assert resample_pos_embed_triton(pe, geometry).shape == (2, 16, 8)
    with pytest.raises(ValueError, match="grid_pos_embed must have shape"):
        resample_pos_embed_triton(pe.detach()[:, :15], geometry)


@pytest.mark.parametrize("device", DEVICES)
def test_pos_embed_op_registration_and_compile(device, seed):
    geometry = random_geometry(2, (4, 5), 12, 2.0, torch.Generator().manual_seed(seed), device)
    pe = torch.randn(1, 20, 6, device=device)
    torch.library.opcheck(torch.ops.dartmamba.resample_pos_embed_triton.default,
                          (pe, geometry.band_bounds, geometry.token_edges, 4, 5),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda p, b, e: resample_pos_embed_triton(p, DartGeometry(b, e, (4, 5), (4, 5))),
                             backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(pe, geometry.band_bounds, geometry.token_edges)
    assert torch.equal(got, resample_pos_embed_triton(pe, geometry))


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def test_dispatch_registry():
    assert backends.backend_names("partition") == ["triton", "torch"]
    assert backends.backend_names("posembed") == ["triton", "torch"]
    assert backends.choose("partition", "cpu") == "torch"
    assert backends.choose("posembed", "cpu") == "torch"
    with pytest.raises(backends.BackendUnavailableError, match="runs on cuda tensors"):
        backends.choose("partition", "cpu", "triton")
    if torch.cuda.is_available() and not interpreted():
        assert backends.choose("partition", "cuda") == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(interpreted(), reason="compiled kernels needed: run with TRITON_INTERPRET=0")
def test_cuda_auto_dispatch_uses_the_kernels_and_matches_torch(seed):
    from dartmamba.tokenizer import partition_scores, resample_pos_embed

    scores = random_scores(8, (14, 14), torch.Generator().manual_seed(seed), device="cuda")
    bounds, edges = partition_scores(scores, 196)
    with backends.use_backend("partition", "torch"):
        ref_bounds, ref_edges = partition_scores(scores, 196)
    torch.testing.assert_close(edges, ref_edges, rtol=0, atol=edge_tolerance(14, 14))
    geometry = partition(scores, 196, img_size=448)
    pe = torch.randn(1, 196, 384, device="cuda")
    with torch.no_grad():
        got = resample_pos_embed(pe, geometry)
    torch.testing.assert_close(got, resample_pos_embed_torch(pe, geometry), rtol=2e-6, atol=2e-6 * pe.abs().max())
    assert math.isfinite(got.sum().item())


# ----------------------------------------------------------------------------------------------------------------
# Offline compile (real Triton compiler + ptxas for sm_90, no GPU): catches what the interpreter lets through
# ----------------------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import dartmamba_kernels.geometry as K

    target = GPUTarget("cuda", 90, 32)

    def build(kernel, sig, constexprs, warps):
        sig = {**sig, **{k: "constexpr" for k in constexprs}}
        return triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=target,
                              options={"num_warps": warps})

    for scores, out, (gh, gw, n, r) in [("fp32", "fp32", (14, 14, 196, 14)), ("bf16", "fp32", (14, 14, 1568, 40)),
                                        ("fp16", "fp32", (14, 14, 392, 20)), ("fp64", "fp64", (7, 9, 50, 7)),
                                        ("fp32", "fp32", (4, 4, 1, 1)), ("fp32", "fp32", (1, 5, 3, 2))]:
        blocks = K._partition_blocks(gh, gw, n, r)
        warps = 4 if blocks["BLOCK_L"] <= 1024 else 8
        build(K._partition_fwd_kernel, dict(scores_ptr="*" + scores, bb_ptr="*" + out, te_ptr="*" + out,
                                            bb64_ptr="*fp64", flow_ptr="*fp64", cdf_ptr="*fp64", rbin_ptr="*i32",
                                            tbin_ptr="*i32"), dict(GH=gh, GW=gw, R=r, N=n, **blocks), warps)
    for pe, geo in [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")]:
        block_t, block_d, warps = K._pos_embed_blocks(196, 384, pe == "fp64")
        build(K._pos_embed_fwd_kernel, dict(pe_ptr="*" + pe, bb_ptr="*" + geo, te_ptr="*" + geo, out_ptr="*" + pe,
                                            N="i32", D="i32", pe_batch_stride="i32"),
              dict(GH=14, GW=14, R=14, BLOCK_T=block_t, BLOCK_D=block_d, WORK_F64=pe == "fp64"), warps)
    print("compiled")
""")


def test_kernels_compile_for_sm90_offline(compile_offline_for_sm90):
    compile_offline_for_sm90(_COMPILE_SCRIPT)
