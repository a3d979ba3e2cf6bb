"""The backend registry and its one dispatch rule: forcing (argument > set_backend > environment), "auto", input
support checks, errors that name the op, the backend and the reason, CUDA fallback warnings. Every registered op is
read from the registry, so a new op or backend is covered without editing this file."""
import warnings

import pytest
import torch

import dartmamba.tokenizer  # noqa: F401  (registers partition, resample, posembed)
from dartmamba import backends
from dartmamba.backends import BackendUnavailableError
from dartmamba.ops import causal_conv1d, selective_scan
from dartmamba.ops.scan import cuda as scan_cuda

OPS = backends.ops()
DEVICES = ("cpu", "cuda", "mps", "xpu")


def scan_inputs():
    g = torch.Generator().manual_seed(0)
    u, delta = (torch.randn(1, 2, 5, generator=g) for _ in range(2))
    A = -torch.rand(2, 3, generator=g)
    B, C = (torch.randn(1, 3, 5, generator=g) for _ in range(2))
    return u, delta, A, B, C


@pytest.fixture
def toy_op():
    """A registered op "toy" with three backends: "fast" (CUDA only, missing here), "picky" (any device, refuses
    inputs with a negative first value), "plain" (any device). Each returns its name and the arguments it got."""
    def backend(name):
        return lambda x, scale=1: (name, x, scale)

    backends.register("toy", "fast", backend("fast"), devices=("cuda",), available=lambda: "not built here",
                      fallback_warning="the fast toy is missing")
    backends.register("toy", "picky", backend("picky"), devices=backends.ANY_DEVICE,
                      supports=lambda x, scale=1: "negative input" if x < 0 else None)
    backends.register("toy", "plain", backend("plain"), devices=backends.ANY_DEVICE)
    yield "toy"
    del backends._OPS["toy"]


def test_registry_holds_every_op_and_its_implementations():
    assert {"scan", "conv1d", "rmsnorm", "partition", "resample", "posembed"} <= set(OPS)
    for op in OPS:
        impls = backends.implementations(op)
        assert impls and all(callable(b.fn) and b.op == op for b in impls), op
        assert [b.name for b in impls] == backends.backend_names(op)
        assert any("cpu" in b.devices for b in impls), f"{op} has no CPU backend"


def test_auto_takes_the_first_backend_that_can_run(toy_op, restore_backends, monkeypatch):
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="the fast toy is missing \\(not built here\\)"):
        assert backends.dispatch("toy", "cuda", 3, scale=2) == ("picky", 3, 2)     # fast: unavailable
    assert backends.dispatch("toy", "cpu", 3) == ("picky", 3, 1)                   # fast: wrong device
    assert backends.dispatch("toy", "cpu", -3) == ("plain", -3, 1)                 # picky: refuses the input
    assert backends.resolve("toy", "cpu", -3).name == "plain"
    assert backends.choose("toy", "cpu") == "picky"                                # inputs not considered


def test_a_forced_backend_runs_or_raises_naming_op_backend_and_reason(toy_op, restore_backends, monkeypatch):
    assert backends.dispatch("toy", "cpu", -3, backend="plain") == ("plain", -3, 1)
    with pytest.raises(BackendUnavailableError, match="toy backend 'picky' cannot take these inputs: negative input"):
        backends.dispatch("toy", "cpu", -3, backend="picky")
    with pytest.raises(BackendUnavailableError, match="toy backend 'fast' runs on cuda tensors, got a cpu tensor"):
        backends.dispatch("toy", "cpu", 3, backend="fast")
    with pytest.raises(BackendUnavailableError, match="toy backend 'fast' is not available: not built here"):
        backends.dispatch("toy", "cuda", 3, backend="fast")
    # precedence: argument > set_backend > environment
    monkeypatch.setenv("DARTMAMBA_TOY_BACKEND", "picky")
    assert backends.dispatch("toy", "cpu", 3)[0] == "picky"
    with backends.use_backend("toy", "plain"):
        assert backends.dispatch("toy", "cpu", 3)[0] == "plain"
        assert backends.dispatch("toy", "cpu", 3, backend="picky")[0] == "picky"
    assert backends.get_backend("toy") == "picky"


@pytest.mark.parametrize("op", OPS)
def test_every_backend_of_every_op_refuses_devices_it_does_not_serve(op, restore_backends):
    for backend in backends.implementations(op):
        for device in DEVICES:
            if device in backend.devices:
                continue
            with pytest.raises(BackendUnavailableError, match=f"{op} backend '{backend.name}' runs on "):
                backends.resolve(op, device, backend=backend.name, check_inputs=False)


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_is_the_first_available_cpu_backend(op, restore_backends):
    cpu = [b for b in backends.implementations(op) if "cpu" in b.devices and b.available() is None]
    assert backends.choose(op, "cpu") == cpu[0].name


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_names_list_the_registered_ones(op, monkeypatch, restore_backends):
    valid = str(["auto", *backends.backend_names(op)]).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match=valid):
        backends.resolve(op, "cpu", backend="bogus", check_inputs=False)
    with pytest.raises(ValueError, match=valid):
        backends.set_backend(op, "bogus")
    monkeypatch.setenv(f"DARTMAMBA_{op.upper()}_BACKEND", "bogus")
    with pytest.raises(ValueError, match=f"DARTMAMBA_{op.upper()}_BACKEND must be one of {valid}"):
        backends.resolve(op, "cpu", check_inputs=False)


def test_entry_points_dispatch_through_the_registry(monkeypatch, restore_backends):
    """The public ops call whatever the registry holds (a spy replaces the registered callable)."""
    calls = []
    for impl in backends.implementations("scan"):
        monkeypatch.setattr(impl, "fn", lambda *a, _real=impl.fn, _name=impl.name, **k: calls.append(_name)
                            or _real(*a, **k))
    monkeypatch.setenv("DARTMAMBA_SCAN_BACKEND", "reference")
    selective_scan(*scan_inputs())
    monkeypatch.setenv("DARTMAMBA_SCAN_BACKEND", "torch")
    selective_scan(*scan_inputs())
    selective_scan(*scan_inputs(), backend="reference")        # the argument wins over the environment
    assert calls == ["reference", "torch", "reference"]
    monkeypatch.setenv("DARTMAMBA_SCAN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        selective_scan(*scan_inputs())
    monkeypatch.setenv("DARTMAMBA_CONV1D_BACKEND", "cuda")
    causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4), backend="torch")
    with pytest.raises(BackendUnavailableError):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4))


def test_forcing_cuda_on_cpu_tensors_names_the_backend(restore_backends):
    with pytest.raises(BackendUnavailableError, match=r"scan backend 'cuda' runs on cuda tensors, got a cpu tensor"):
        selective_scan(*scan_inputs(), backend="cuda")
    with backends.use_backend("scan", "cuda"):
        with pytest.raises(BackendUnavailableError, match="'cuda'"):
            selective_scan(*scan_inputs())


def test_cpu_tensors_default_to_the_cpu_kernels_or_the_portable_backends(restore_backends):
    """dartmamba's C++ kernels for CPU tensors where they build, else the portable torch implementations."""
    from dartmamba.ops._jit import cpu_kernels_unavailable

    built = cpu_kernels_unavailable() is None
    assert backends.choose("scan", "cpu") == ("cpp" if built else "torch")
    assert backends.choose("conv1d", "cpu") == ("cpp" if built else "torch")
    assert backends.choose("rmsnorm", "cpu") == ("cpp" if built else "torch")


def _backend(op, name):
    return next(b for b in backends.implementations(op) if b.name == name)


@pytest.mark.parametrize("op, fallback, package", [("scan", "triton", "mamba-ssm"),
                                                   ("conv1d", "triton", "causal-conv1d"),
                                                   ("rmsnorm", "torch", "mamba-ssm")])
def test_cuda_without_the_kernels_falls_back_with_one_warning(op, fallback, package, monkeypatch, restore_backends):
    """On a CUDA device whose extension does not import, "auto" takes the next backend (dartmamba's Triton kernels
    for the scan and the conv, where triton works; the portable torch RMSNorm) and warns once."""
    kernel = backends.implementations(op)[0]
    monkeypatch.setattr(kernel, "available", lambda: "cannot import it (ImportError: no module)")
    if fallback == "triton":
        monkeypatch.setattr(_backend(op, "triton"), "available", lambda: None)
    monkeypatch.setattr(backends, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.choose(op, "cuda") == fallback
        assert backends.choose(op, "cuda") == fallback
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert package in str(runtime[0].message)
    with pytest.raises(BackendUnavailableError, match="cannot import it"):
        backends.choose(op, "cuda", kernel.name)


@pytest.mark.parametrize("op, package", [("scan", "mamba-ssm"), ("conv1d", "causal-conv1d")])
def test_cuda_order_is_the_extension_then_triton_then_torch(op, package, monkeypatch, restore_backends):
    """The order on CUDA, with availability simulated through our own registry entries: mamba-ssm / causal-conv1d
    when they import (silently), else the Triton kernels with ONE warning naming the missing package, else the
    portable torch backend with one warning per missing backend. The mixer then runs one-pass on Triton (the kernel
    does not declare "reverse")."""
    extension, triton = _backend(op, "cuda"), _backend(op, "triton")
    assert [b.name for b in backends.implementations(op)][:2] == ["cuda", "triton"]
    cases = [(None, None, "cuda", []), ("not installed", None, "triton", [package]),
             ("not installed", "no triton", "torch", [package, "Triton"])]
    for ext_reason, triton_reason, chosen, warned in cases:
        monkeypatch.setattr(extension, "available", lambda r=ext_reason: r)
        monkeypatch.setattr(triton, "available", lambda r=triton_reason: r)
        monkeypatch.setattr(backends, "_WARNED", set())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert backends.choose(op, "cuda") == chosen
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == len(warned), messages
        for message, needle in zip(messages, warned):
            assert needle in message
    if op == "scan":
        from dartmamba.modules.bimamba import resolve_bimamba_impl

        monkeypatch.setattr(triton, "available", lambda: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert backends.choose("scan", "cuda") == "triton"
            assert resolve_bimamba_impl("auto", torch.device("cuda")) == "fused"


def test_cuda_kernels_that_refuse_an_input_fall_back_silently_or_raise_when_forced(monkeypatch, restore_backends):
    """conv1d's kernel takes widths 2..4 only: "auto" passes it over for a width-5 weight, forcing it raises."""
    kernel = backends.implementations("conv1d")[0]
    monkeypatch.setattr(kernel, "available", lambda: None)
    x, weight = torch.zeros(1, 2, 3), torch.zeros(2, 5)
    assert backends.resolve("conv1d", "cuda", x, weight, None, "silu").name == "torch"
    assert backends.resolve("conv1d", "cuda", x, torch.zeros(2, 4), None, "silu").name == "cuda"
    with pytest.raises(BackendUnavailableError, match="conv1d backend 'cuda' cannot take these inputs: its kernel "
                                                      "supports widths 2..4, got weight of width 5"):
        backends.resolve("conv1d", "cuda", x, weight, None, "silu", backend="cuda")


def test_availability_checks_are_cached_and_never_import_at_module_import():
    import sys
    for name in ("selective_scan_cuda", "causal_conv1d", "mamba_ssm"):
        if name in sys.modules and not torch.cuda.is_available():
            pytest.fail(f"{name} imported on a machine without CUDA")
    assert scan_cuda.mamba_unavailable() is scan_cuda.mamba_unavailable()  # cached: one import attempt
    calls = []
    check = backends.cached_check(lambda: calls.append(1))
    assert check() is None and check() is None and calls == [1]
    assert backends.cached_check(check) is check


# ----------------------------------------------------------------------------------------------------------------
# Capabilities and the generic adapters
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def bare_backends():
    """Registers backends under test names; removes them afterwards."""
    added = []

    def register(op, name, fn, **kwargs):
        added.append((op, name))
        return backends.register(op, name, fn, devices=backends.ANY_DEVICE, **kwargs)

    yield register
    for op, name in added:
        if op in backends._OPS:
            entry = backends._OPS[op]
            entry.backends = [b for b in entry.backends if b.name != name]


def test_capabilities_are_declared_and_the_rest_adapted(bare_backends):
    """A backend gets the op's adapter for each mode it does not declare, and none for those it does; an unknown
    capability is an error naming the op's modes."""
    seen = []

    def backend(x, *, flipped=False):
        seen.append(flipped)
        return x

    def flipping(fn):
        def run(x, *, flipped=False):
            return fn(-x) if flipped else fn(x)
        return run

    backends.declare_modes("toy_modes", {"flipped": flipping})
    try:
        bare_backends("toy_modes", "native", backend, capabilities={"flipped"})
        bare_backends("toy_modes", "adapted", backend)
        assert backends.dispatch("toy_modes", "cpu", 3, backend="native", flipped=True) == 3 and seen == [True]
        assert backends.dispatch("toy_modes", "cpu", 3, backend="adapted", flipped=True) == -3 and seen[1] is False
        assert backends.capabilities("toy_modes", "cpu") == frozenset({"flipped"})
        with pytest.raises(ValueError, match=r"toy_modes backend 'bad': capabilities must be among the op's modes "
                                             r"\['flipped'\], got \['other'\]"):
            backends.register("toy_modes", "bad", backend, devices=("cpu",), capabilities={"other"})
    finally:
        del backends._OPS["toy_modes"]


def _bare(op, name):
    """The raw callable of a registered backend (without its adapters)."""
    return next(b.raw for b in backends.implementations(op) if b.name == name)


@pytest.mark.parametrize("reverse", [False, True], ids=["l2r", "r2l"])
def test_scan_backend_without_modes_gets_the_adapters(reverse, bare_backends, seeds):
    """The reference registered again WITHOUT capabilities (as a GPU kernel without the modes is) gives what the C++
    kernel (which has them all) gives, for reverse=True and a low-rank delta with strided B/C, with gradients."""
    from dartmamba.ops._jit import cpu_kernels_unavailable

    if cpu_kernels_unavailable() is not None:
        pytest.skip("the C++ CPU kernels are not available here")
    bare_backends("scan", "bare", _bare("scan", "reference"))
    g = torch.Generator().manual_seed(seeds[0])
    batch, dim, length, rank, dstate = 2, 8, 11, 3, 4
    rows = torch.randn(batch * length, rank + 2 * dstate, generator=g, dtype=torch.float64)
    factor = rows[:, :rank].reshape(batch, length, rank).transpose(1, 2)          # strided, as in Vim's mixer
    B = rows[:, rank:rank + dstate].reshape(batch, length, dstate).transpose(1, 2)
    C = rows[:, rank + dstate:].reshape(batch, length, dstate).transpose(1, 2)
    u, z = (torch.randn(batch, dim, length, generator=g, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(dim, dstate, generator=g, dtype=torch.float64)
    D, bias = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    proj = 0.3 * torch.randn(dim, rank, generator=g, dtype=torch.float64)
    results = {}
    for name in ("cpp", "bare"):
        leaves = [t.detach().clone().requires_grad_() for t in (u, factor, proj)]
        with torch.no_grad():
            no_grad = selective_scan(leaves[0], leaves[1], A, B, C, D, z, bias, True, backend=name, reverse=reverse,
                                     delta_proj=leaves[2])
        out, last = selective_scan(leaves[0], leaves[1], A, B, C, D, z, bias, True, True, backend=name,
                                   reverse=reverse, delta_proj=leaves[2])
        (out.square().sum() + last.sum()).backward()
        results[name] = (no_grad, out.detach(), last.detach(), *(t.grad for t in leaves))
    for what, a, b in zip(("no-grad out", "out", "last", "du", "dfactor", "ddelta_proj"), results["cpp"],
                          results["bare"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("reverse", [False, True], ids=["l2r", "r2l"])
def test_conv1d_backend_without_modes_gets_the_adapters(reverse, bare_backends, seeds):
    """The reference conv registered again without capabilities runs right to left by the flip adapter, and a
    strided (channel-adjacent) input by the unit-stride adapter, as the C++ kernel does natively."""
    seen = []

    def bare(x, weight, bias=None, activation="silu"):
        seen.append(x.stride(-1))
        return _bare("conv1d", "reference")(x, weight, bias, activation)

    bare_backends("conv1d", "bare", bare)
    g = torch.Generator().manual_seed(seeds[0])
    x = torch.randn(2, 9, 12, generator=g, dtype=torch.float64).transpose(1, 2)     # (B, C, L), stride(-1) = C
    w, b = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    expected = causal_conv1d(x.flip(-1), w, b, backend="torch").flip(-1) if reverse else \
        causal_conv1d(x, w, b, backend="torch")
    torch.testing.assert_close(causal_conv1d(x, w, b, backend="bare", reverse=reverse), expected)
    assert seen == [1]
