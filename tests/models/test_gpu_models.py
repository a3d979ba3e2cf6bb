"""Whole-model checks on a CUDA machine with mamba-ssm (skipped elsewhere, with the reason).

- The CUDA path (mamba-ssm's scan, its Triton RMSNorm, the Triton resampler, causal-conv1d when installed) against
  the CPU path (the exact chunked scan and plain torch ops on CPU tensors): logits and every parameter gradient of
  a small Vim and a small Vim-DART, fp32 (tight; TF32 off) and bf16 autocast (loose, both paths on the GPU); the
  one-pass bidirectional mixer against the two-pass one on the CUDA kernels.
- Zero graph breaks under torch.compile (``torch._dynamo.explain`` of forward + loss, fp32 and bf16), and an
  inductor-compiled training step that matches eager.
- The throughput table of the Vim issue (Vim-S, Vim-S-DART, DeiT-S; 196 and 784 tokens; inference and training),
  printed in a quick form (``pytest -s``); ``DARTMAMBA_GPU_TABLE=0`` skips it (benchmarks/gpu_check.sh runs the
  full table separately).

Run on the GPU machine with compiled Triton kernels (tests/conftest.py turns the interpreter on unless told):
    TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/models/test_gpu_models.py -s
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import dartmamba.models  # noqa: F401  (registers the models)
from dartmamba import backends
from dartmamba.backends import BackendUnavailableError

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]

VIM = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_classes=10)                  # 64 tokens
VIM_DART = dict(img_size=128, patch_size=8, grid_size=8, num_tokens=64, embed_dim=64, depth=2, num_classes=10,
                dart_cfg=dict(trunk="mobilenetv3_small"))                                      # 64 DART tokens
MODELS = {"vim": ("vim_tiny_patch16_224", VIM), "vim_dart": ("vim_tiny_dart", VIM_DART)}


def _portable_backends() -> dict:
    """The CPU path: every op with several backends on its portable pure-torch one ("torch": the chunked scan,
    plain torch for the rest); on CPU tensors these are the only ones anyway."""
    choice = {}
    for op in sorted(getattr(backends, "_OPS", {})) or ["scan", "conv1d", "rmsnorm", "resample"]:
        names = backends.backend_names(op)
        if "torch" in names:
            choice[op] = "torch"
    return choice


PORTABLE = _portable_backends()


def _mamba_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    try:
        backends.choose("scan", "cuda", "cuda")
    except BackendUnavailableError as exc:
        return f"mamba-ssm's CUDA selective scan is not importable here: {exc}"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is on (tests/conftest.py sets it unless exported): run with TRITON_INTERPRET=0"
    return None


_REASON = _mamba_unavailable()
needs_mamba = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture
def no_tf32():
    """fp32 comparisons need true fp32 matmuls and convolutions on the GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(kind: str, seed: int = 0):
    name, kwargs = MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    size = model.patch_embed.img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed + 1)
    # smooth images: DART moves its sample points with the scores, and on white noise a shift of 1e-6 pixel
    # already changes a patch by ~1e-6 * (noise gradient); smooth content keeps the comparison about the kernels
    coarse = torch.randn(4, 3, size[0] // 8, size[1] // 8, generator=gen)
    images = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    labels = torch.randint(0, kwargs["num_classes"], (4,), generator=gen)
    return model, images, labels


def forward_backward(model, images, labels, forced: dict | None = None, amp: bool = False, runner=None):
    """Logits (fp32) and every parameter gradient (fp32) of one cross-entropy step; ``runner`` (e.g. the compiled
    model) is what is called, ``model`` whose gradients are read."""
    model.zero_grad(set_to_none=True)
    device_type = images.device.type
    with contextlib.ExitStack() as stack:
        for op, name in (forced or {}).items():
            stack.enter_context(backends.use_backend(op, name))
        if amp:
            stack.enter_context(torch.autocast(device_type=device_type, dtype=torch.bfloat16))
        logits = (model if runner is None else runner)(images)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), grads


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.norm().item()
    diff = (got - want).norm().item()
    if scale < 1e-20:
        return 0.0 if diff < 1e-20 else float("inf")
    return diff / scale


def assert_close_models(got, want, tol_logits: float, tol_grads: float, what: str):
    logits_g, grads_g = got
    logits_w, grads_w = want
    assert set(grads_g) == set(grads_w), f"{what}: different parameters got gradients"
    errors = {"logits": rel_err(logits_g, logits_w)}
    errors.update({name: rel_err(grads_g[name], grads_w[name]) for name in grads_w})
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    print(f"\n{what}: worst relative errors " + ", ".join(f"{k} {v:.2e}" for k, v in worst))
    assert errors["logits"] <= tol_logits, f"{what}: logits relative error {errors['logits']:.3e} > {tol_logits}"
    bad = {k: v for k, v in errors.items() if k != "logits" and v > tol_grads}
    assert not bad, f"{what}: gradients off by more than {tol_grads}: {bad}"


@needs_mamba
def test_auto_backends_pick_the_cuda_kernels():
    chosen = {op: backends.choose(op, "cuda") for op in ("scan", "conv1d", "rmsnorm", "resample")}
    print(f"\nbackends on CUDA: {chosen}")
    assert chosen["scan"] == "cuda"
    assert chosen["resample"] == "triton"


@needs_mamba
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cuda_path_matches_cpu_path_fp32(kind, no_tf32):
    model, images, labels = build(kind)
    cpu_model = copy.deepcopy(model)
    want = forward_backward(cpu_model, images, labels, forced=PORTABLE)              # CPU tensors, CPU path
    model = model.cuda()
    got = forward_backward(model, images.cuda(), labels.cuda(), forced={"scan": "cuda"})
    assert_close_models(got, want, tol_logits=1e-4, tol_grads=1e-3, what=f"{kind} fp32 CUDA vs CPU")


@needs_mamba
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cuda_path_matches_portable_path_bf16(kind):
    model, images, labels = build(kind)
    model = model.cuda()
    images, labels = images.cuda(), labels.cuda()
    want = forward_backward(model, images, labels, forced=PORTABLE, amp=True)
    got = forward_backward(model, images, labels, forced={"scan": "cuda"}, amp=True)
    assert_close_models(got, want, tol_logits=3e-2, tol_grads=8e-2, what=f"{kind} bf16 CUDA kernels vs portable")
    if kind == "vim":   # (DART's geometry follows bf16 rounding of the scorer's features: not comparable to fp32)
        fp32 = forward_backward(model, images, labels, forced={"scan": "cuda"})
        assert rel_err(got[0], fp32[0]) < 5e-2, "bf16 logits far from fp32 logits"


@needs_mamba
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_one_pass_mixer_matches_two_pass_on_the_gpu(amp, no_tf32):
    """The fused bidirectional mixer (grouped B/C through mamba-ssm's kernel, causal-conv1d over 2 * d_inner) against
    the two-pass reference, same weights, on the CUDA kernels: logits and every parameter gradient."""
    model, images, labels = build("vim")
    model = model.cuda()
    images, labels = images.cuda(), labels.cuda()
    for layer in model.layers:
        layer.mixer.bimamba_impl = "two_pass"
    want = forward_backward(model, images, labels, forced={"scan": "cuda"}, amp=amp)
    for layer in model.layers:
        layer.mixer.bimamba_impl = "fused"
    got = forward_backward(model, images, labels, forced={"scan": "cuda"}, amp=amp)
    tol = (3e-2, 8e-2) if amp else (1e-5, 1e-4)
    assert_close_models(got, want, tol_logits=tol[0], tol_grads=tol[1],
                        what=f"fused vs two-pass mixer {'bf16' if amp else 'fp32'}")


@needs_mamba
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_no_graph_breaks_under_compile(kind, amp):
    model, images, labels = build(kind)
    model = model.cuda()
    images, labels = images.cuda(), labels.cuda()

    def loss_fn(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return F.cross_entropy(model(x).float(), y)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss_fn)(images, labels)
    print(f"\n{kind} {'bf16' if amp else 'fp32'}: {explanation.graph_count} graph(s), "
          f"{explanation.graph_break_count} graph break(s)")
    for reason in explanation.break_reasons:
        print(f"  break: {reason.reason}")
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@needs_mamba
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_compiled_training_step_matches_eager(kind, no_tf32):
    model, images, labels = build(kind)
    model = model.cuda()
    images, labels = images.cuda(), labels.cuda()
    want = forward_backward(model, images, labels)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    got = forward_backward(model, images, labels, runner=compiled)
    assert_close_models(got, want, tol_logits=1e-4, tol_grads=2e-3, what=f"{kind} inductor vs eager")


@needs_mamba
def test_throughput_table_vim_dart_deit():
    """Prints the Vim issue's table in a quick form (run with -s); the full one: python -m benchmarks.model_table."""
    if os.environ.get("DARTMAMBA_GPU_TABLE", "1") == "0":
        pytest.skip("DARTMAMBA_GPU_TABLE=0: the table runs as its own benchmark (benchmarks/gpu_check.sh)")
    from benchmarks.common import environment
    from benchmarks.model_table import render, run_table

    rows = run_table("cuda", batch_size=64, amp="bf16", warmup=2, repeats=2, iters=2)
    print("\n" + render(rows, environment(torch.device("cuda")), "bf16"))
    assert all(r["status"] == "ok" for r in rows), [(r["label"], r["mode"], r["status"]) for r in rows]
    assert all(r["img_per_s"] > 0 for r in rows)
