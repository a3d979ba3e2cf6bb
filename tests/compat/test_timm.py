"""The timm names of dartmamba.compat.timm: each test names the shim whose timm API changed under it."""
from __future__ import annotations

import inspect

import pytest

from dartmamba.compat import timm as shims


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_feature_take_indices_keeps_its_signature_and_index_rule():
    assert parameters(shims.feature_take_indices)[:2] == ["num_features", "indices"], (
        f"shim feature_take_indices: timm.models._features.feature_take_indices now takes "
        f"{parameters(shims.feature_take_indices)}; dartmamba calls it as (num_features, indices)")
    rule = [(None, ([0, 1, 2, 3, 4, 5], 5)), (2, ([4, 5], 5)), ([1, -1], ([1, 5], 5)), ([0, 3], ([0, 3], 3))]
    for indices, want in rule:
        got = shims.feature_take_indices(6, indices)
        assert (list(got[0]), got[1]) == want, (
            f"shim feature_take_indices: timm's index rule changed: feature_take_indices(6, {indices!r}) gives {got}, "
            f"dartmamba's forward_intermediates expects {want}")
    try:                                           # an index past the last block is refused, not wrapped
        shims.feature_take_indices(6, [6])
    except Exception:
        pass
    else:
        pytest.fail("shim feature_take_indices: timm now accepts index 6 of 6 blocks; dartmamba relies on it refusing")


def test_resolve_pretrained_cfg_is_public_and_resolves_a_tag_with_an_overlay():
    import timm.models

    import dartmamba  # noqa: F401  (registers the models)

    assert shims.resolve_pretrained_cfg is timm.models.resolve_pretrained_cfg, (
        "shim resolve_pretrained_cfg: timm.models no longer exports resolve_pretrained_cfg publicly")
    assert parameters(shims.resolve_pretrained_cfg)[:3] == ["variant", "pretrained_cfg", "pretrained_cfg_overlay"], (
        f"shim resolve_pretrained_cfg: its parameters are now {parameters(shims.resolve_pretrained_cfg)}; "
        f"models/_common.py passes (variant, pretrained_cfg, pretrained_cfg_overlay)")
    cfg = shims.resolve_pretrained_cfg("vim_small_dart", None, {"num_classes": 7})
    assert (cfg.tag, cfg.hf_hub_id, cfg.hf_hub_filename, cfg.num_classes) == (
        "dart_in1k", "yinkx3/DART", "darvim-sm.pth", 7), (
        f"shim resolve_pretrained_cfg: resolving vim_small_dart gives {cfg}: the default tag, its Hub file or the "
        f"overlay are no longer applied")
