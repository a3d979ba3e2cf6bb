"""``prune_intermediate_layers`` leaves nothing stale: no module of the pruned model is reached by an attribute
outside its module tree or by a second path (an alias keeps an old layer's module alive after pruning), the last
residual add uses the kept last layer's drop path, and the kept layers compute what they computed before."""
import pytest
import timm
import torch
import torch.nn as nn

import dartmamba.models  # noqa: F401  (registers the models)

from .small_configs import SMALL
from .videomamba_cases import VIDEO_SMALL

CASES = {
    "vim_tiny_patch16_224": (SMALL["vim_tiny_patch16_224"], (2, 3, 32, 32)),
    "vim_tiny_dart": (SMALL["vim_tiny_dart"], (2, 3, 64, 64)),
    "deit_tiny_dart": (SMALL["deit_tiny_dart"], (2, 3, 64, 64)),
    "videomamba_tiny": (VIDEO_SMALL["videomamba_tiny"], (2, 3, 3, 32, 32)),
    "videomamba_tiny_dart": (VIDEO_SMALL["videomamba_tiny_dart"], (2, 3, 3, 32, 32)),
}


def stale_references(model: nn.Module) -> list[str]:
    """Every module reached from a module of ``model`` other than through its own tree (a plain attribute, a list
    or dict attribute) or reached by two paths of the tree: what could outlive pruning."""
    tree = {id(m) for m in model.modules()}
    problems = []
    paths: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in paths:
            problems.append(f"{name or '<root>'} is also {paths[id(module)] or '<root>'}")
        paths.setdefault(id(module), name)
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_modules", "_parameters", "_buffers"):
                continue
            values = (value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple))
                      else [value])
            for item in values:
                if isinstance(item, nn.Module) and id(item) not in tree:
                    problems.append(f"{name or '<root>'}.{attr} -> a {type(item).__name__} outside the model")
    return problems


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_model_has_no_stale_references_and_keeps_its_intermediates(name, seed):
    cfg, shape = CASES[name]
    model = timm.create_model(name, drop_path_rate=0.5, **cfg).eval()
    x = torch.randn(*shape)
    depth = len(model.layers if hasattr(model, "layers") else model.blocks)
    assert depth == 2 and stale_references(model) == []
    if hasattr(model, "layers"):
        assert model.final_drop_path.drop_prob == 0.5           # layer 1's: the rate rises linearly to 0.5
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0], intermediates_only=True, output_fmt="NLC")
        kept = model.prune_intermediate_layers(indices=[0], prune_norm=False, prune_head=True)
        after = model.forward_intermediates(x, indices=kept, intermediates_only=True, output_fmt="NLC")
    assert kept == [0]
    assert stale_references(model) == []
    blocks = model.layers if hasattr(model, "layers") else model.blocks
    assert len(blocks) == 1 and isinstance(model.head, nn.Identity)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    if hasattr(model, "layers"):
        # the last residual add now uses layer 0's drop path (rate 0), not the pruned layer 1's (rate 0.5)
        assert model.final_drop_path is model.layers[-1].drop_path
        assert getattr(model.final_drop_path, "drop_prob", 0.0) == 0.0
        assert [info["module"] for info in model.feature_info] == ["layers.0"]
        # train mode: with the kept layer's drop rate 0 the pruned model is deterministic
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), model.forward_features(x), rtol=0, atol=0)


def test_stale_reference_check_sees_an_alias_and_an_outside_module():
    """The check above is not blind: a second path to a layer and a plain attribute holding a module outside the
    tree are both reported."""
    model = timm.create_model("vim_tiny_patch16_224", **SMALL["vim_tiny_patch16_224"])
    model.old_last = model.layers[-1].drop_path                   # registered: a second path
    assert stale_references(model) == ["old_last is also layers.1.drop_path"]
    del model.old_last
    object.__setattr__(model, "kept", [nn.Linear(2, 2)])           # not registered: outside the tree
    assert stale_references(model) == ["<root>.kept -> a Linear outside the model"]
