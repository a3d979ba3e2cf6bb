"""pytest plugin that runs timm's ``tests/test_models.py`` against dartmamba's models.

Loaded with ``-p dartmamba_timm_plugin`` with this folder on PYTHONPATH (scripts/test_timm_suite.sh; timm's own ``tests`` package shadows ours there). It imports dartmamba (registering its
models with timm) and registers small DART configurations, ``test_vim_dart`` and ``test_deit_dart`` (64 px inputs,
like timm's own ``test_*`` models), so timm's size-limited tests run a DART forward too; keeps only the tests
parametrised with one of our models; marks the exclusions below (each with its reason); and prints a table of
every test function x model with its outcome.
"""
from __future__ import annotations

import collections
import fnmatch
import os

import pytest
import timm
from timm.models import generate_default_cfgs, register_model

import dartmamba  # noqa: F401  (registers the models)
from dartmamba.models import deit as _deit, vim as _vim
from dartmamba.models._common import model_cfg

_SMALL_DART = dict(img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32, depth=3,
                   tokenizer_cfg=dict(trunk="tiny_cnn"))


def test_vim_dart(pretrained=False, **kwargs):
    """Vim-DART at test size (64 px, 12 tokens, depth 3, tiny CNN scorer)."""
    return _vim._dart_model("tiny", pretrained, {**_SMALL_DART, **kwargs}, name="test_vim_dart")


def test_deit_dart(pretrained=False, **kwargs):
    """DeiT-DART at test size (64 px, 12 tokens, depth 3, 2 heads, tiny CNN scorer)."""
    return _deit._create("tiny", pretrained, {**_SMALL_DART, "num_heads": 2, **kwargs}, name="test_deit_dart")


for _fn, _module in ((test_vim_dart, _vim), (test_deit_dart, _deit)):
    _fn.__module__ = _module.__name__          # timm files a model under the module that defines it
    _module.default_cfgs.update(generate_default_cfgs({_fn.__name__: model_cfg(64)}))
    register_model(_fn)

OURS = {name for name in timm.list_models()
        if timm.models.model_entrypoint(name).__module__.startswith("dartmamba.")}

# (timm test function, model pattern) -> why it does not run on those models
_TOKEN_MODEL = ("a token model, like timm's ViTs (which timm lists as non-standard by name, 'vit_*' / 'deit*'): "
                "forward_features returns (B, 1 + N, D) with no spatial axes, which this test's NCHW checks need; "
                "timm's non-standard variant of it runs on these models instead (tests/timm_suite/test_timm_functions"
                ".py)")
_TORCHSCRIPT = ("TorchScript cannot compile the op dispatch: each fused op (selective scan, causal conv, RMSNorm, the "
                "DART stages) is chosen at run time from dartmamba.backends' registry of Python callables and called "
                "with *args, and the CUDA kernels are torch.library custom ops with Python-side autograd; TorchScript "
                "is in maintenance mode upstream, and torch.export of the inference forward is supported and tested "
                "instead (tests/models/test_export.py)")
_CPU_TIME = ("CPU time: the test runs the 24-layer model at 224 many times with autograd (the pruning contract: once "
             "per layer), minutes per model on a 2-core CI machine; the same VisionMamba code runs it as "
             "vim_tiny_patch16_224 (intermediates) and test_vim_dart (intermediates and pruning, 3 layers)")
_VIDEO = ("a video model: it takes clips (B, C, T, H, W), timm's test functions feed images (B, C, H, W); "
          "tests/models/test_videomamba.py runs the same checklist on clips")
_NETWORK = ("needs the network: it downloads the released weights from the Hugging Face Hub (the loading path is "
            "tested offline against a real Hub cache in tests/models/test_pretrained.py)")
EXCLUDED: dict[tuple[str, str], str] = {
    ("test_model_*_pretrained", "*"): _NETWORK,          # load_pretrained, features_pretrained
    ("*", "videomamba_*"): _VIDEO,
    ("test_model_forward_intermediates*", "vim_[sb]*_patch16_224"): _CPU_TIME,
    ("test_prune_intermediate_layers_contract", "vim_*_patch16_224"): _CPU_TIME,
    ("test_model_default_cfgs", "vim_*"): _TOKEN_MODEL,
    ("test_model_default_cfgs", "test_*_dart"): _TOKEN_MODEL,
    ("test_model_forward_torchscript", "*"): _TORCHSCRIPT,
    ("test_model_forward_fx_torchscript", "*"): _TORCHSCRIPT,
}


def exclusion(test: str, model: str) -> str | None:
    for (test_pattern, model_pattern), reason in EXCLUDED.items():
        if fnmatch.fnmatch(test, test_pattern) and fnmatch.fnmatch(model, model_pattern):
            return reason
    return None


def pytest_collection_modifyitems(config, items):
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        model = params.get("model_name")
        if not isinstance(model, str) or model.split(".")[0] not in OURS:     # timm lists some with their tags
            dropped.append(item)
            continue
        reason = exclusion(item.originalname, model)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"excluded: {reason}"))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


_OUTCOMES: dict[tuple[str, str], str] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        name = report.nodeid.split("::")[-1]
        test, _, params = name.partition("[")
        model = next((p for p in params.rstrip("]").split("-") if p.split(".")[0] in OURS), params.rstrip("]"))
        _OUTCOMES[(test, model)] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not _OUTCOMES:
        return
    counts = collections.Counter(_OUTCOMES.values())
    lines = ["", "timm's test functions x dartmamba models:", "| test | model | outcome |", "|---|---|---|"]
    lines += [f"| {test} | {model} | {outcome} |" for (test, model), outcome in sorted(_OUTCOMES.items())]
    lines.append(f"totals: {dict(counts)}")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get("DARTMAMBA_TIMM_REPORT")
    if path:
        with open(path, "w") as handle:
            handle.write("\n".join(lines[1:]) + "\n")
