"""The fast tokenizer paths end to end: backend dispatch of the partition and positional embeddings, the fused Triton
geometry inside the tokenizer (same tokens and gradients as the torch path), torch.compile(fullgraph=True) equal to
eager for training and inference (tokenizer and models), the scorer's channels-last / low-precision options, and
the CUDA-graph capture (GPU tests; on CPU only its refusal is checked).

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); the registry only offers them for CUDA
tensors, so the ``triton_on_cpu`` fixture lets CPU tensors use them for the duration of a test.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import dartmamba.models  # noqa: F401  (registers the models)
from dartmamba import backends
from dartmamba.tokenizer import (CapturedTokenizer, DartTokenizer, capture_tokenizer, partition, partition_scores,
                                 partition_scores_torch, resample_pos_embed, resample_pos_embed_torch,
                                 uniform_geometry)

OPS = ("partition", "posembed", "resample")
# CUDA-graph tests need the compiled kernels (the interpreter copies through the host, which a capture forbids)
compiled_kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                      reason="needs compiled Triton kernels: run with TRITON_INTERPRET=0")


def small_tokenizer(**overrides):
    cfg = dict(img_size=64, patch_size=8, grid_size=8, num_tokens=40, embed_dim=32, trunk="tiny_cnn")
    cfg.update(overrides)
    return DartTokenizer(**cfg)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Drop dynamo's compiled frames after each test, so compiles here never count against another test's
    recompile limit."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def triton_on_cpu():
    """Offer the Triton backends for CPU tensors (interpreter) while the test runs; restores the registry after."""
    kernels = pytest.importorskip("dartmamba_kernels.geometry")
    pytest.importorskip("dartmamba_kernels.resample")
    if not kernels.interpreted():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    with contextlib.ExitStack() as offers:
        for op in OPS:
            offers.enter_context(backends.allow_device(op, "triton", "cpu"))
        yield


def fast(**overrides):
    """The fused kernels forced for the partition and the resampling; the positional embeddings on "auto", which
    takes the inference-only kernel whenever no gradient is needed (forcing it in training is an error)."""
    return small_tokenizer(partition_backend="triton", resample_backend="triton", **overrides)


def loss_and_grads(tokenizer, images, pos):
    out = tokenizer(images, pos)
    loss = out.tokens.square().mean() + out.pos_embed.sin().mean()
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, [pos, *params]), out


def assert_grads_close(got, want, rtol=1e-4, msg=""):
    """Per tensor, relative to its own scale, plus an absolute floor of 1e-5 of the largest gradient: some
    parameters (the last bias of a head whose output is standardised) have an exactly-zero gradient, computed as a
    sum of cancelling terms, i.e. rounding noise."""
    overall = max(w.abs().max().item() for w in want) or 1.0
    for i, (g, w) in enumerate(zip(got, want)):
        atol = rtol * w.abs().max().item() + 1e-5 * overall
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{msg} grad {i}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def test_partition_dispatch_on_cpu(seed, monkeypatch):
    scores = torch.rand(2, 6, 7) + 0.1
    want = partition_scores_torch(scores, 20, 4)
    for got in (partition_scores(scores, 20, 4), partition_scores(scores, 20, 4, backend="torch"),
                (partition(scores, 20, 4).band_bounds, partition(scores, 20, 4).token_edges)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(backends.BackendUnavailableError, match="partition backend 'triton' runs on cuda"):
        partition_scores(scores, 20, backend="triton")
    monkeypatch.setenv("DARTMAMBA_PARTITION_BACKEND", "triton")
    with pytest.raises(backends.BackendUnavailableError):
        partition_scores(scores, 20)
    monkeypatch.setenv("DARTMAMBA_PARTITION_BACKEND", "nope")
    with pytest.raises(ValueError, match="DARTMAMBA_PARTITION_BACKEND must be one of"):
        partition_scores(scores, 20)


def test_partition_validation_is_kept_in_front_of_every_backend():
    bad = torch.rand(1, 4, 4) + 0.1
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores must be finite and > 0; scores\[0, 1, 2\] = nan"):
        partition_scores(bad, 6)
    with pytest.raises(ValueError, match="num_rows must be an int"):
        partition_scores(torch.rand(1, 4, 4) + 0.1, 6, 7, backend="torch")


def test_kernels_give_the_same_tokens_and_gradients_in_the_tokenizer(triton_on_cpu, seed):
    torch.manual_seed(seed)
    reference = small_tokenizer()
    fused = fast()
    fused.load_state_dict(reference.state_dict())
    images, pos = torch.randn(2, 3, 64, 64), torch.randn(1, 64, 32, requires_grad=True)
    loss_ref, grads_ref, out_ref = loss_and_grads(reference, images, pos)
    loss, grads, out = loss_and_grads(fused, images, pos)
    # training: the fused partition and resampling run, the positional embeddings need a gradient -> torch path
    torch.testing.assert_close(out.geometry.token_edges, out_ref.geometry.token_edges, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.tokens, out_ref.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, grads_ref, msg=f"seed={seed}")
    # inference: all three kernels
    fused.eval(), reference.eval()
    fused.posembed_backend = "triton"
    with torch.no_grad():
        a, b = fused(images, pos), reference(images, pos)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.pos_embed, b.pos_embed, rtol=1e-5, atol=1e-6)


def test_pos_embed_kernel_refuses_inputs_that_need_a_gradient(triton_on_cpu, seed, monkeypatch):
    """The kernel has no backward: forced, it is an error naming the reason; "auto" takes the torch path then, and
    the kernel when no gradient is needed (same values)."""
    geometry = partition(torch.rand(2, 4, 4) + 0.1, 10)
    pe = torch.randn(1, 16, 5, requires_grad=True)
    with pytest.raises(backends.BackendUnavailableError,
                       match="posembed backend 'triton' cannot take these inputs: the kernel is inference-only"):
        resample_pos_embed(pe, geometry, backend="triton")
    with backends.allow_device("posembed", "triton", "cpu", prefer=True):
        assert backends.resolve("posembed", "cpu", pe, geometry).name == "torch"
        with torch.no_grad():
            assert backends.resolve("posembed", "cpu", pe, geometry).name == "triton"
        out = resample_pos_embed(pe, geometry)
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), pe)
    (want,) = torch.autograd.grad(resample_pos_embed_torch(pe, geometry).sum(), pe)
    torch.testing.assert_close(grad, want)
    with torch.no_grad():
        torch.testing.assert_close(resample_pos_embed(pe, geometry, backend="triton"), out.detach(), rtol=2e-6,
                                   atol=1e-7)


def test_uniform_identity_holds_with_the_kernels(triton_on_cpu):
    """Constant scores, paper geometry: the tokens are the patch embedding of the stride-2 image, the positions the
    grid embeddings, bit for bit in the geometry and the positions."""
    torch.manual_seed(0)
    tokenizer = fast(img_size=128, patch_size=8, grid_size=8, num_tokens=64, uniform_scores=True,
                     posembed_backend="triton").eval()
    images, pos = torch.randn(2, 3, 128, 128), torch.randn(1, 64, 32)
    with torch.no_grad():
        out = tokenizer(images, pos)
        expected = tokenizer.proj(images[:, :, ::2, ::2]).flatten(2).transpose(1, 2)
    assert torch.equal(out.geometry.token_edges, uniform_geometry(2, 8, 64).token_edges)
    assert torch.equal(out.pos_embed, pos.expand(2, -1, -1))
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
def test_compiled_tokenizer_equals_eager_training_and_inference(kernels, request, seed):
    if kernels:
        request.getfixturevalue("triton_on_cpu")
    torch.manual_seed(seed)
    tokenizer = fast() if kernels else small_tokenizer()
    images, pos = torch.randn(2, 3, 64, 64), torch.randn(1, 64, 32, requires_grad=True)

    def step(x, p):
        out = tokenizer(x, p)
        return out.tokens.square().mean() + out.pos_embed.sin().mean()

    params = [p for p in tokenizer.parameters() if p.requires_grad]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)   # fullgraph: any graph break raises
    loss = compiled(images, pos)
    grads = torch.autograd.grad(loss, [pos, *params])
    loss_eager = step(images, pos)
    grads_eager = torch.autograd.grad(loss_eager, [pos, *params])
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads, grads_eager, rtol=1e-5, msg=f"seed={seed}")

    tokenizer.eval()
    if kernels:
        tokenizer.posembed_backend = "triton"      # inference: the positional-embedding kernel too
    with torch.no_grad():
        out = torch.compile(tokenizer, backend="aot_eager", fullgraph=True)(images, pos)
        want = tokenizer(images, pos)
    for name in ("tokens", "pos_embed", "scores"):
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.geometry.token_edges, want.geometry.token_edges, rtol=0, atol=0)


@pytest.mark.parametrize("model_name", ["deit_tiny_dart"])   # Vim-DART: tests/models/test_vim.py (same tokenizer)
def test_models_compile_fullgraph_with_the_fast_tokenizer(model_name, triton_on_cpu, seed):
    torch.manual_seed(seed)
    dart_cfg = dict(trunk="tiny_cnn", partition_backend="triton", resample_backend="triton")
    kwargs = dict(img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32, depth=1, num_classes=5,
                  dart_cfg=dart_cfg)
    if model_name.startswith("deit"):
        kwargs["num_heads"] = 2
    model = timm.create_model(model_name, **kwargs)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(images, labels)
    grads = torch.autograd.grad(loss, params)
    loss_eager = loss_fn(images, labels)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, torch.autograd.grad(loss_eager, params), rtol=1e-4, msg=model_name)
    model.eval()
    model.patch_embed.posembed_backend = "triton"    # inference: the positional-embedding kernel too
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(images), model(images),
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Scorer options
# ----------------------------------------------------------------------------------------------------------------
def test_scorer_channels_last_and_dtype_options(seed):
    torch.manual_seed(seed)
    base = small_tokenizer().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = base.scores(images)
        for overrides in (dict(scorer_channels_last=True), dict(scorer_dtype="float32"),
                          dict(scorer_channels_last=True, scorer_dtype=torch.bfloat16)):
            other = small_tokenizer(**overrides).eval()
            other.load_state_dict(base.state_dict())
            if overrides.get("scorer_channels_last"):
                conv = other.scorer.trunk.layers[0].weight
                assert conv.is_contiguous(memory_format=torch.channels_last)
            got = other.scores(images)
            assert got.dtype == torch.float32
            tol = 5e-2 if overrides.get("scorer_dtype") == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=str(overrides))
    with pytest.raises(ValueError, match="trunk_dtype must be None, a floating torch.dtype or one of"):
        small_tokenizer(scorer_dtype="int8")


# ----------------------------------------------------------------------------------------------------------------
# CUDA graph capture
# ----------------------------------------------------------------------------------------------------------------
def test_capture_needs_cuda():
    tokenizer = small_tokenizer()
    with pytest.raises(RuntimeError, match="needs a tokenizer on a CUDA device"):
        CapturedTokenizer(tokenizer, 2)
    with pytest.raises(RuntimeError, match="needs a tokenizer on a CUDA device"):
        tokenizer.capture(2)
    assert tokenizer._captured is None
    with pytest.raises(TypeError, match="has no DartTokenizer patch_embed"):
        capture_tokenizer(torch.nn.Linear(2, 2), 2)


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("compile_forward", [False, True], ids=["eager", "compiled"])
def test_captured_tokenizer_equals_eager_on_cuda(compile_forward, seed):
    import copy

    torch.manual_seed(seed)
    tokenizer = small_tokenizer(trunk="mobilenetv3_small", scorer_input_size=32).cuda().eval()
    images, pos = torch.randn(4, 3, 64, 64, device="cuda"), torch.randn(1, 64, 32, device="cuda")
    with torch.no_grad():
        want = tokenizer(images, pos)
        runner = tokenizer.capture(4, compile=compile_forward)
        for _ in range(2):     # first call records, second replays
            got = tokenizer(images, pos)
        assert runner.graph is not None and got.tokens.data_ptr() == runner.outputs.tokens.data_ptr()
        for name in ("tokens", "pos_embed", "scores"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.geometry.token_edges, want.geometry.token_edges, rtol=0, atol=1e-5)
        # new inputs through the same graph
        other = torch.randn_like(images)
        torch.testing.assert_close(tokenizer(other, pos).tokens, tokenizer.forward_eager(other, pos).tokens,
                                   rtol=1e-5, atol=1e-5)
        # anything the graph was not recorded for runs eagerly
        assert tokenizer(images[:3], pos).tokens.data_ptr() != runner.outputs.tokens.data_ptr()
    assert tokenizer(images, pos).tokens.data_ptr() != runner.outputs.tokens.data_ptr()   # grad mode on
    assert copy.deepcopy(tokenizer)._captured is None
    tokenizer.release_capture()
    assert tokenizer._captured is None


@pytest.mark.gpu
@compiled_kernels
def test_tokenizer_forward_has_no_host_sync_on_cuda(seed):
    tokenizer = small_tokenizer(trunk="mobilenetv3_small").cuda().eval()
    images, pos = torch.randn(2, 3, 64, 64, device="cuda"), torch.randn(1, 64, 32, device="cuda")
    with torch.no_grad():
        tokenizer(images, pos)          # kernels compiled, lazy imports done
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tokenizer(images, pos)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@compiled_kernels
def test_captured_model_inference_equals_eager_on_cuda(seed):
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_dart", img_size=64, patch_size=8, grid_size=4, num_tokens=12, depth=1,
                              num_classes=5, dart_cfg=dict(trunk="tiny_cnn")).cuda().eval()
    images = torch.randn(3, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        want = model(images)
        runner = capture_tokenizer(model, 3)
        torch.testing.assert_close(model(images), want, rtol=1e-2, atol=1e-2)      # records, then replays
        assert runner.graph is not None
    # a new autocast block: casts cached in the first one are freed (and the memory reused below); the graph must
    # not have kept reading them
    scratch = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(8)]
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        got = model(images)
    del scratch
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark script (benchmarks/bench_tokenizer.py): its CPU smoke path
# ----------------------------------------------------------------------------------------------------------------
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_tokenizer.py"


@pytest.mark.slow
def test_benchmark_script_help_refusal_and_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = lambda *a: subprocess.run([sys.executable, str(BENCH), *a], env=env, capture_output=True, text=True,
                                    timeout=300)
    result = run("--help")
    assert result.returncode == 0 and "--smoke" in result.stdout and "--json" in result.stdout
    if not torch.cuda.is_available():
        result = run()
        assert result.returncode == 2 and "no CUDA device" in result.stderr
    result = run("--smoke", "--sections", "parts", "--no-compile", "--json", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    timed = {r["name"] for r in rows if r["ms"] is not None}
    for part in ("scorer: trunk + head (eager)", "geometry: partition (triton)", "resample (triton)",
                 "positional embeddings (triton)", "patch embedding (GEMM)"):
        assert part in timed, (part, result.stdout[-2000:])
    assert "### DART tokenizer speed" in result.stdout
