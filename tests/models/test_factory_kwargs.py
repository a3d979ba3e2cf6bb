"""timm's factory kwargs on every model dartmamba registers: ``device`` / ``dtype`` reach every tensor, the meta
device allocates nothing, and torch.fx traces the models with the fused ops and the DART tokenizer as leaves."""
import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dartmamba.models  # noqa: F401  (registers the models)
from tests.models.small_configs import SMALL

OURS = sorted(name for name in timm.list_models()
              if timm.models.model_entrypoint(name).__module__.startswith("dartmamba."))


class RealAllocations(TorchDispatchMode):
    """Records every tensor an op produces on a real (non-meta) device."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("name", OURS)
def test_meta_device_allocates_nothing(name, monkeypatch):
    """Full-size models (Vim-B-DART included): every parameter and buffer on meta, no tensor of real memory made
    while building (timm's VisionTransformer makes its drop-path schedule, one float per block, with
    torch.linspace on the CPU: the only exception), the pretrained scorer trunk not fetched (this test runs with
    DARTMAMBA_TRUNK_WEIGHTS unset: the trunks ask for their pretrained weights)."""
    monkeypatch.delenv("DARTMAMBA_TRUNK_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")             # a fetch would fail loudly
    with RealAllocations() as recorder:
        model = timm.create_model(name, device="meta")
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    real = [(op, shape) for op, shape in recorder.seen      # (and the scalars it is unbound into)
            if not (op == "aten.linspace.default" and len(shape) == 1) and shape != ()]
    assert real == [], real[:5]


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_tiny_dart", "deit_tiny_dart"])
def test_dtype_reaches_every_floating_tensor(name):
    model = timm.create_model(name, dtype=torch.float64, device="cpu", **SMALL[name])
    floating = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float64 for t in floating)
    size = SMALL[name]["img_size"]
    assert model(torch.randn(2, 3, size, size, dtype=torch.float64)).dtype == torch.float64


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = timm.create_model("vim_tiny_patch16_224", **SMALL["vim_tiny_patch16_224"]).eval()
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(3)
    assert model.head.weight.is_meta and model.head.weight.dtype == torch.float64 and not model.head.training


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "vim_tiny_dart", "deit_tiny_dart"])
def test_fx_traces_and_the_graph_equals_eager(name, seed):
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = timm.create_model(name, **SMALL[name]).eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    assert nodes[-1] == "head" and any(n.startswith("patch_embed") for n in nodes)
    graph = create_feature_extractor(model, [nodes[-1]], tracer_kwargs=tracer_kwargs)
    size = SMALL[name]["img_size"]
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(graph(images)[nodes[-1]], model(images), rtol=1e-5, atol=1e-5)
    features = timm.create_model(name, features_only=True, feature_cls="fx", out_indices=(-1,), **SMALL[name])
    with torch.no_grad():
        out = features.eval()(images)
    assert len(out) == 1
