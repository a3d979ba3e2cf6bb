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


@pytest.mark.skipif(not shims.RECORDS_MODEL_ARGS, reason="timm < 1.0.31 records no construction arguments "
                    "(the shim's fallback is tested below)")
def test_recorded_model_args_is_what_timm_writes_and_reads_construction_arguments_through(tmp_path):
    """timm.create_model writes the factory keywords into the model's ``_model_args`` and get_model_args /
    save_for_hf read it back: our property sees both (the saved config's model_args are what it returns)."""
    import json

    import timm
    import torch

    import dartmamba  # noqa: F401  (registers the models)

    def effective(model, recorded):
        return {**recorded, "depth": 1, "marker": "ours"}

    class Probe(torch.nn.Module):
        _model_args = shims.recorded_model_args(effective)

    probe = Probe()
    assert shims.MODEL_ARGS_ATTRIBUTE == "_model_args"
    setattr(probe, shims.MODEL_ARGS_ATTRIBUTE, {"depth": 1})
    assert timm.models.get_model_args(probe)["marker"] == "ours", (
        "shim recorded_model_args: timm.models.get_model_args no longer reads the model's _model_args")
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1)
    assert model.__dict__.get("_dartmamba_timm_model_args", {}).get("embed_dim") == 32, (
        "shim recorded_model_args: timm.create_model no longer records the factory keywords in _model_args "
        f"(what it wrote: {model.__dict__.get('_dartmamba_timm_model_args')})")
    timm.models.save_for_hf(model, tmp_path)
    args = json.loads((tmp_path / "config.json").read_text())["model_args"]
    assert args["embed_dim"] == 32 and args["num_classes"] == 1000, (
        f"shim recorded_model_args: save_for_hf no longer writes the model's _model_args as model_args: {args}")


def test_the_input_size_and_model_args_shims_match_the_installed_timm():
    """timm >= 1.0.31 has update_model_input_size and get_model_args; 1.0.29 (the GPU image) has neither, and the
    shims then record nothing instead of failing at import."""
    import timm.models

    has_input = True
    try:
        import timm.models._input  # noqa: F401
    except ImportError:
        has_input = False
    assert shims.RECORDS_MODEL_ARGS == hasattr(timm.models, "get_model_args")
    assert (shims._update_model_input_size is not None) == has_input, (
        "shim record_input_size: timm.models._input.update_model_input_size moved or appeared")
    if has_input:
        assert parameters(shims._update_model_input_size)[:2] == ["model", "img_size"], (
            f"shim record_input_size: timm's update_model_input_size now takes "
            f"{parameters(shims._update_model_input_size)}; VisionMamba.set_input_size passes (model, img_size)")
