"""torch.export of the inference forward: the exported program computes what the eager model computes, on inputs
it was not traced with (DART's geometry depends on the pixels: nothing may be baked in)."""
import pytest
import timm
import torch

import dartmamba.models  # noqa: F401  (registers the models)

SMALL = {"embed_dim": 32, "depth": 2, "num_classes": 5}
CASES = {
    "vim_fixed": ("vim_tiny_patch16_224", dict(SMALL, img_size=32, patch_size=8)),
    "vim_dart": ("vim_tiny_dart", dict(SMALL, img_size=64, patch_size=8, grid_size=4, num_tokens=12,
                                       dart_cfg=dict(trunk="tiny_cnn"))),
    "deit_dart": ("deit_tiny_dart", dict(SMALL, num_heads=2, img_size=64, patch_size=8, grid_size=4, num_tokens=12,
                                         dart_cfg=dict(trunk="tiny_cnn"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_program_equals_eager(case, seed):
    name, kwargs = CASES[case]
    model = timm.create_model(name, **kwargs).eval()
    size = kwargs["img_size"]
    traced_with = torch.randn(2, 3, size, size)
    with torch.no_grad():
        program = torch.export.export(model, (traced_with,), strict=False)
        exported = program.module()
        for images in (traced_with, torch.randn(2, 3, size, size) * 2 + 0.5):
            torch.testing.assert_close(exported(images), model(images), rtol=1e-5, atol=1e-5)
    if "dart" in case:   # the data-dependent partition is in the graph, not a constant
        ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert any("searchsorted" in op for op in ops), sorted(ops)
