"""FLOP counting (dartmamba.flops): published figures, the tokenizer's parts, the scan formula, token scaling."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dartmamba.flops import (DART_EXTRA_PARTS, MissingFlopFormulaError, count_flops, count_model_flops,
                             custom_op_formulas, fit_exponent, resample_macs, scan_backward_macs, scan_forward_macs)
from dartmamba.ops import selective_scan, selective_scan_reference, selective_scan_torch

DEPTH = dict(depth=4)   # token scaling of a 4-layer stack is the scaling of the 24-layer one, and 6x cheaper


def scan_inputs(batch=2, dim=5, length=7, dstate=3, grad=False):
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(batch, dim, length, generator=g), 0.1 * torch.randn(batch, dim, length, generator=g),
         -torch.rand(dim, dstate, generator=g) - 0.1, torch.randn(batch, dstate, length, generator=g),
         torch.randn(batch, dstate, length, generator=g), torch.randn(dim, generator=g),
         torch.randn(batch, dim, length, generator=g), torch.randn(dim, generator=g)]
    return [x.requires_grad_(grad) for x in t]


class CountMultiplies(TorchDispatchMode):
    """Output elements of every elementwise multiplication (aten.mul): one per multiply."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.mul_):
            self.count += out.numel()
        return out


def test_deit_small_matches_the_published_4_6_gflops():
    report = count_model_flops("deit_small_patch16_224")
    assert report.num_tokens == 196
    assert abs(report.gflops - 4.6) / 4.6 < 0.03, report.gflops
    assert report.dart_extra == 0 and report.scan == 0


@pytest.mark.parametrize("dart, grid", [("vim_tiny_dart", "vim_tiny_patch16_224"),
                                        ("deit_tiny_dart", "deit_tiny_patch16_224")])
def test_dart_costs_exactly_its_tokenizer_parts_more_than_its_fixed_grid_twin(dart, grid):
    """Same backbone, same 196 tokens, same patch projection: the difference is the scorer, the resampling and the
    positional-embedding re-binning, each counted."""
    d, f = count_model_flops(dart), count_model_flops(grid)
    assert d.num_tokens == f.num_tokens == 196
    for part in ("embed", "backbone", "head"):
        assert d.parts[part] == f.parts[part], part
    assert d.total - f.total == d.dart_extra == sum(d.parts[p] for p in DART_EXTRA_PARTS)
    assert d.parts["scorer_trunk"] > 0 and d.parts["scorer_head"] > 0
    assert d.parts["resample"] == resample_macs(1, 196, 3, 16)          # 4 taps x 196 x 3 x 16 x 16
    assert d.parts["posembed"] > 0


def test_scan_formula_matches_an_analytic_count_of_the_reference():
    """The registered formula == the multiplies the literal reference scan performs, counted op by op."""
    batch, dim, length, dstate = 2, 5, 7, 3
    args = scan_inputs(batch, dim, length, dstate)
    with CountMultiplies() as mults:
        selective_scan_reference(*args[:6], z=args[6], delta_bias=args[7], delta_softplus=True)
    assert mults.count == scan_forward_macs(batch, dim, length, dstate, has_D=True, has_z=True)
    with CountMultiplies() as mults:
        selective_scan_reference(*args[:5])
    assert mults.count == scan_forward_macs(batch, dim, length, dstate, has_D=False, has_z=False)
    # each backend's op, as FlopCounterMode sees it (2 FLOPs per multiply-add), forward and backward
    from dartmamba.ops._jit import cpu_kernels_unavailable

    scans = [selective_scan_torch]
    if cpu_kernels_unavailable() is None:                   # the C++-registered op, its formula registered at load
        scans.append(lambda *a, **k: selective_scan(*a, **k, backend="cpp"))
    for scan in scans:
        args = scan_inputs(batch, dim, length, dstate, grad=True)
        with FlopCounterMode(display=False) as counter:
            out = scan(*args[:6], z=args[6], delta_bias=args[7], delta_softplus=True)
        assert counter.get_total_flops() == 2 * scan_forward_macs(batch, dim, length, dstate)
        with FlopCounterMode(display=False) as counter:
            out.sum().backward()
        assert counter.get_total_flops() == 2 * scan_backward_macs(batch, dim, length, dstate)


def test_custom_op_formulas_are_registered():
    names = custom_op_formulas()
    assert {"selective_scan_torch_fwd", "selective_scan_cuda_fwd", "selective_scan_torch_bwd",
            "selective_scan_cuda_bwd"} <= set(names)


def test_every_cpp_kernel_op_has_a_formula():
    """The C++-registered ops get their formulas once, when the library loads (dartmamba.ops._jit.after_load)."""
    from torch.utils.flop_counter import flop_registry

    from dartmamba.ops._jit import cpu_kernels, cpu_kernels_unavailable, extension_name

    if cpu_kernels_unavailable() is not None:
        pytest.skip("the C++ CPU kernels are not available here")
    namespace = cpu_kernels()
    prefix = extension_name() + "::"
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)]
    assert sorted(names) == ["bimamba_scan_fwd", "causal_conv1d_bwd", "causal_conv1d_fwd", "rms_norm_fwd",
                             "scan_bwd", "scan_fwd"]
    assert all(getattr(namespace, n) in flop_registry for n in names), names


def test_every_dartmamba_custom_op_has_a_formula():
    """Each op registers its formula beside its fake implementation: none of ours is left without one."""
    pytest.importorskip("triton")
    import dartmamba_kernels.geometry  # noqa: F401  (registers the kernels' ops)
    import dartmamba_kernels.resample  # noqa: F401

    ours = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dartmamba::")}
    assert ours and ours <= set(custom_op_formulas()), sorted(ours - set(custom_op_formulas()))


def test_a_custom_op_without_a_formula_is_an_error():
    @torch.library.custom_op("dartmamba_test::uncounted", mutates_args=())
    def uncounted(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @uncounted.register_fake
    def _(x):
        return torch.empty_like(x)

    class Model(nn.Module):
        def forward(self, x):
            return uncounted(x).sum()

    with pytest.raises(MissingFlopFormulaError, match="dartmamba_test.uncounted"):
        count_flops(Model(), input_size=(3, 4, 4))


def test_triton_resampler_is_counted_once(monkeypatch):
    """The Triton custom op has a formula; counting a DART model through it gives the analytic (gather) count."""
    pytest.importorskip("triton")
    from dartmamba_kernels.resample import interpreted, resample_triton   # registers the op
    if not interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 to take CPU tensors")
    assert "resample_patches_triton" in custom_op_formulas()
    import timm

    import dartmamba.models  # noqa: F401
    import dartmamba.tokenizer.dart as dart_module
    model = timm.create_model("vim_tiny_dart", img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32,
                              depth=1, dart_cfg=dict(trunk="tiny_cnn"))
    torch_path = count_flops(model)
    # the Triton backend is registered for CUDA tensors only: call the kernel's op directly on the CPU
    def via_triton(images, geometry, p, sampling, backend=None):
        return resample_triton(images, geometry, p, sampling)

    monkeypatch.setattr(dart_module, "resample_patches", via_triton)
    triton_path = count_flops(model)
    assert triton_path.parts == torch_path.parts
    assert triton_path.parts["resample"] == resample_macs(1, 12, 3, 8)
    assert "resample_patches_triton" in triton_path.by_op


def test_grid_sample_and_bilinear_resize_are_counted():
    class Sampler(nn.Module):
        def forward(self, x):
            grid = torch.zeros(x.shape[0], 5, 7, 2, dtype=x.dtype, device=x.device)
            sampled = F.grid_sample(x, grid, align_corners=True)
            return sampled.sum() + F.interpolate(x, size=(9, 9), mode="bilinear").sum()

    report = count_flops(Sampler(), input_size=(3, 16, 16), batch_size=2)
    assert report.total == 4 * 3 * (5 * 7 + 9 * 9)


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_tiny_dart"])
def test_vim_flops_grow_linearly_in_tokens(name):
    counts = [196, 392, 784, 1568]
    total, token_part = [], []
    for n in counts:
        kwargs = dict(DEPTH, num_tokens=n) if "dart" in name else dict(DEPTH, img_size={196: 224, 392: (224, 448),
                                                                                        784: 448, 1568: (448, 896)}[n])
        report = count_model_flops(name, **kwargs)
        assert report.num_tokens == n
        total.append(report.gflops)
        token_part.append(report.total - report.dart_extra)      # embedding, backbone, head
    assert 0.95 <= fit_exponent(counts, token_part, 196, 1568) <= 1.1
    # DART's scorer sees the 448 input at every N, a fixed cost: the total grows slower still
    exponent = fit_exponent(counts, total, 196, 1568)
    assert (0.95 if "dart" not in name else 0.5) <= exponent <= 1.1, exponent


def test_deit_flops_grow_faster_than_linear():
    sizes = {196: 224, 392: (224, 448), 784: 448, 1568: (448, 896)}
    gflops = [count_model_flops("deit_tiny_patch16_224", img_size=s, **DEPTH).gflops for s in sizes.values()]
    assert fit_exponent(list(sizes), gflops, 196, 1568) > 1.1


def test_fit_exponent():
    assert math.isclose(fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]), 2.0)
    assert math.isclose(fit_exponent([100, 196, 1568, 5000], [5, 1, 8, 99], 196, 1568), 1.0)
    with pytest.raises(ValueError):
        fit_exponent([196], [1.0])
