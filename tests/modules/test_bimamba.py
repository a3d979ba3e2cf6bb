"""The one-pass bidirectional mixer equals the two-pass one it replaces: forward, the input's and every parameter's
gradient in float64, on every CPU scan backend; the stacked weights are never stored; Vim passes the option on."""
import warnings

import pytest
import timm
import torch

import dartmamba.models  # noqa: F401  (registers the models)
from dartmamba import backends
from dartmamba.flops import count_flops
from dartmamba.modules.bimamba import BiMambaMixer, resolve_bimamba_impl
from dartmamba.ops._jit import cpu_kernels_unavailable


def scan_backends():
    names = ["torch", "reference"]
    if cpu_kernels_unavailable() is None:
        names.insert(0, "cpp")
    return names


def random_mixer(dim, d_state, seed, **kwargs):
    """A mixer whose two branches hold different random parameters (an untrained mixer's A_log and D are the same
    in both branches, which would hide a swapped branch)."""
    torch.manual_seed(seed)
    mixer = BiMambaMixer(dim, d_state=d_state, **kwargs).double()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            p.add_(0.3 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    return mixer


def run(mixer, hidden, impl, grad_out):
    mixer.zero_grad(set_to_none=True)
    mixer.bimamba_impl = impl
    x = hidden.detach().clone().requires_grad_()
    out = mixer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}


@pytest.mark.parametrize("scan_backend", scan_backends())
@pytest.mark.parametrize("shape", [(2, 17, 32, 8, 2), (3, 9, 24, 16, 1), (1, 1, 16, 4, 2)],
                         ids=["b2L17", "b3L9-expand1", "L1"])
def test_one_pass_equals_two_pass(scan_backend, shape, seeds, restore_backends):
    batch, length, dim, d_state, expand = shape
    for seed in seeds[:2]:
        mixer = random_mixer(dim, d_state, seed, expand=expand)
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(batch, length, dim, dtype=torch.float64, generator=g)
        grad_out = torch.randn(batch, length, dim, dtype=torch.float64, generator=g)
        with backends.use_backend("scan", scan_backend):
            out_f, dx_f, grads_f = run(mixer, hidden, "fused", grad_out)
            out_t, dx_t, grads_t = run(mixer, hidden, "two_pass", grad_out)
        torch.testing.assert_close(out_f, out_t, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(dx_f, dx_t, rtol=1e-12, atol=1e-13)
        assert set(grads_f) == set(grads_t) == {n for n, _ in mixer.named_parameters()}
        for name in grads_t:
            if length > 1 or "A" not in name:    # with one step the state starts at 0: the decays do not matter
                assert grads_t[name].abs().max() > 0, f"{name}: no gradient"
            torch.testing.assert_close(grads_f[name], grads_t[name], rtol=1e-11, atol=1e-13, msg=name)


@pytest.mark.parametrize("scan_backend", scan_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_inference_equals_the_autograd_forward(scan_backend, dtype, seeds, restore_backends):
    """Without autograd the two-pass mixer takes other routes (on CPU the scan forms delta = dt_proj(dt) step by
    step, and the two directions are summed in place): the same output as with autograd, which multiplies dt_proj
    out as a GEMM and sums into a new tensor, and as the one-pass mixer."""
    for seed in seeds[:2]:
        mixer = random_mixer(40, 16, seed).to(dtype)
        hidden = torch.randn(2, 23, 40, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
        with backends.use_backend("scan", scan_backend):
            mixer.bimamba_impl = "two_pass"
            with_grad = mixer(hidden.clone().requires_grad_()).detach()
            with torch.no_grad():
                no_grad = mixer(hidden)
            with torch.inference_mode():
                inference = mixer(hidden)
            mixer.bimamba_impl = "fused"
            with torch.no_grad():
                fused = mixer(hidden)
        for name, out in (("no_grad", no_grad), ("inference_mode", inference), ("fused", fused)):
            torch.testing.assert_close(out, with_grad, **tol, msg=lambda m: f"seed {seed}, {name}: {m}")


def test_stacked_weights_are_built_from_the_parameters_every_call(seed):
    """No second copy of the weights: same state dict for both implementations, and a parameter changed in place
    changes the fused output at once."""
    mixer = random_mixer(16, 4, seed)
    fused, two = dict(mixer.state_dict()), None
    mixer.bimamba_impl = "two_pass"
    two = dict(mixer.state_dict())
    assert fused.keys() == two.keys() and not list(mixer.buffers())
    mixer.bimamba_impl = "fused"
    hidden = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        before = mixer(hidden)
        mixer.x_proj_b.weight.mul_(1.5)
        after_fused = mixer(hidden)
        mixer.bimamba_impl = "two_pass"
        after_two = mixer(hidden)
    assert (after_fused - before).abs().max() > 1e-6
    torch.testing.assert_close(after_fused, after_two, rtol=1e-12, atol=1e-13)


def test_vim_passes_the_option_and_both_give_the_same_model(seed):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=5)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outs, flops = {}, {}
    for impl in ("fused", "two_pass"):
        torch.manual_seed(seed)
        model = timm.create_model("vim_tiny_patch16_224", bimamba_impl=impl, **kwargs).double().eval()
        assert all(layer.mixer.bimamba_impl == impl for layer in model.layers)
        outs[impl] = model(images)
        flops[impl] = count_flops(model.float(), input_size=(3, 32, 32)).total
    torch.testing.assert_close(outs["fused"], outs["two_pass"], rtol=1e-12, atol=1e-13)
    assert flops["fused"] == flops["two_pass"]          # the same work, batched differently
    with pytest.raises(ValueError, match=r"bimamba_impl must be one of \('auto', 'fused', 'two_pass'\), got 'both'"):
        timm.create_model("vim_tiny_patch16_224", bimamba_impl="both", **kwargs)
    assert timm.create_model("vim_tiny_patch16_224", **kwargs).layers[0].mixer.bimamba_impl == "auto"


def test_auto_follows_the_scan_backends_reverse_capability(monkeypatch, restore_backends):
    """"auto" is two-pass where the scan backend runs right to left natively, fused where reverse is adapted."""
    native = "reverse" in backends.capabilities("scan", "cpu")
    assert native == (cpu_kernels_unavailable() is None)              # the C++ kernel has it
    assert resolve_bimamba_impl("auto", torch.device("cpu")) == ("two_pass" if native else "fused")
    with backends.use_backend("scan", "torch"):                        # the torch scan flips: fused
        assert resolve_bimamba_impl("auto", torch.device("cpu")) == "fused"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                # no CUDA here: the fallback warns
        assert resolve_bimamba_impl("auto", torch.device("cuda")) == "fused"   # mamba-ssm, the Triton scan or the torch scan
    assert resolve_bimamba_impl("fused", torch.device("cpu")) == "fused"
    mixer = random_mixer(16, 4, 0)
    ran = []
    monkeypatch.setattr(mixer, "forward_fused", lambda h: ran.append("fused") or h)
    with backends.use_backend("scan", "reference"):
        mixer(torch.randn(1, 3, 16, dtype=torch.float64))              # auto, no native reverse: fused
    mixer.bimamba_impl = "two_pass"
    mixer(torch.randn(1, 3, 16, dtype=torch.float64))
    assert ran == ["fused"]


@pytest.fixture
def bare_backends():
    """The scan's and the conv's reference registered again as "bare" WITHOUT capabilities: what a GPU kernel
    without the layout modes (mamba-ssm, causal-conv1d) gets, the generic adapters included."""
    for op in ("scan", "conv1d"):
        raw = next(b.raw for b in backends.implementations(op) if b.name == "reference")
        backends.register(op, "bare", raw, devices=backends.ANY_DEVICE)
    yield
    for op in ("scan", "conv1d"):
        entry = backends._OPS[op]
        entry.backends = [b for b in entry.backends if b.name != "bare"]


@pytest.mark.parametrize("impl", ["two_pass", "fused"])
def test_mixer_on_backends_without_modes_equals_the_default_path(impl, bare_backends, seeds, restore_backends):
    """The mixer calls each op one way on every device: forced onto backends without reverse / low-rank delta /
    strided inputs (the path a GPU with mamba-ssm runs, adapted), it gives the default CPU path's output and
    gradients."""
    mixer = random_mixer(24, 4, seeds[0])
    g = torch.Generator().manual_seed(seeds[0])
    hidden = torch.randn(2, 9, 24, dtype=torch.float64, generator=g)
    grad_out = torch.randn(2, 9, 24, dtype=torch.float64, generator=g)
    default = run(mixer, hidden, impl, grad_out)
    with backends.use_backend("scan", "bare"), backends.use_backend("conv1d", "bare"):
        bare = run(mixer, hidden, impl, grad_out)
        with torch.no_grad():
            bare_no_grad = mixer(hidden)
    torch.testing.assert_close(bare[0], default[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(bare_no_grad, default[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(bare[1], default[1], rtol=1e-11, atol=1e-13)
    for name in default[2]:
        torch.testing.assert_close(bare[2][name], default[2][name], rtol=1e-11, atol=1e-13, msg=name)


@pytest.mark.parametrize("setting", ["bf16-model", "autocast"])
@pytest.mark.parametrize("impl", ["two_pass", "fused"])
def test_bf16_inference_makes_no_fp32_copy_of_an_activation(setting, impl, seeds):
    """A bfloat16 model, and a float32 model under CPU autocast, run the mixer (in_proj to out_proj) in bfloat16 on
    the C++ kernels: no dtype cast (aten::_to_copy) of a tensor with a dimension of L or batch * L, only of
    parameters; the output is bfloat16 and within 3 % of the float32 model's largest output value (weights and
    activations rounded to bfloat16's 8 bits)."""
    if cpu_kernels_unavailable() is not None:
        pytest.skip(f"the C++ CPU kernels are not available here: {cpu_kernels_unavailable()}")
    batch, length = 2, 37
    for seed in seeds[:2]:
        mixer = random_mixer(24, 8, seed, bimamba_impl=impl).float()
        hidden = torch.randn(batch, length, 24, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            expected = mixer(hidden)
        hidden = hidden.bfloat16()
        model = mixer.bfloat16() if setting == "bf16-model" else mixer
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=setting == "autocast"):
            with torch.profiler.profile(record_shapes=True) as prof:
                out = model(hidden)
        casts = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy"]
        assert casts, "the profiler recorded no cast at all (the parameters' are expected)"
        activations = [s for s in casts if length in s or batch * length in s]
        assert activations == [], f"{setting}, {impl}: activations cast: {activations}"
        assert out.dtype == torch.bfloat16
        err = (out.float() - expected).abs().max().item()
        assert err <= 0.03 * expected.abs().max().item(), f"{setting}, {impl}, seed {seed}: {err}"


def test_two_pass_inference_runs_both_directions_as_one_kernel_call(seed):
    """On CPU without autograd the two-pass mixer's two scans are one bimamba_scan_fwd call per layer (the C++
    pass over both directions), with the model's output that of the two scans through the "scan" op."""
    if cpu_kernels_unavailable() is not None:
        pytest.skip("the C++ CPU kernels are not available here")
    model = timm.create_model("vim_tiny_patch16_224", bimamba_impl="two_pass", img_size=32, patch_size=8,
                              embed_dim=40, depth=3, num_classes=5).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        with torch.profiler.profile() as prof:
            fast = model(images)
        with backends.use_backend("bimamba_scan", "torch"):
            two_scans = model(images)
    calls = {e.key.split("::")[-1]: e.count for e in prof.key_averages() if "::" in e.key}
    assert calls.get("bimamba_scan_fwd") == 3 and "scan_fwd" not in calls, calls
    torch.testing.assert_close(fast, two_scans, rtol=1e-12, atol=1e-13)
