"""DeiT with DART against timm's fixed-grid DeiT."""

import pytest
import timm
import torch

import dartmamba.models.deit  # noqa: F401  (registers the models)
from dartmamba.models.checkpoints import transfer_fixed_grid_weights



def test_uniform_dart_with_deit_weights_equals_deit_on_the_stride2_image(seed):
    """DART with constant scores + weights copied from timm DeiT == timm DeiT on the 448 image at stride 2."""
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=7, depth=3).eval()
    dart = timm.create_model("deit_tiny_dart", num_classes=7, depth=3, dart_cfg=dict(uniform_scores=True)).eval()
    report = transfer_fixed_grid_weights(dart, deit.state_dict())
    assert report.unexpected == [] and report.resized == []
    assert all(key.startswith("patch_embed.scorer.") for key in report.missing), report.missing
    assert "patch_embed.proj.weight" in report.loaded and "blocks.2.mlp.fc2.weight" in report.loaded
    images = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        expected = deit(images[:, :, ::2, ::2])
        got = dart(images)
        features = dart.forward_features(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features, deit.forward_features(images[:, :, ::2, ::2]), rtol=1e-4, atol=1e-4)


def test_transfer_resizes_the_grid_embedding_and_reports_keys():
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=0, depth=1, img_size=160)   # 10x10 grid
    dart = timm.create_model("deit_tiny_dart", num_classes=5, depth=1)                         # 14x14 grid
    state = deit.state_dict()
    state["extra.weight"] = torch.zeros(1)
    report = transfer_fixed_grid_weights(dart, {"model": state})
    assert report.resized == ["pos_embed"] and report.unexpected == ["extra.weight"]
    assert "head.weight" in report.missing and "cls_token" in report.loaded
    torch.testing.assert_close(dart.pos_embed[:, :1], deit.pos_embed[:, :1])


def test_trunk_weights_survive_model_init(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("mobilenetv3_small_100")
    path = tmp_path / "mnv3s.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = timm.create_model("deit_tiny_dart", num_classes=3, depth=1, dart_cfg=dict(trunk_weights=str(path)))
    trunk = model.patch_embed.scorer.trunk
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    model.init_weights()
    model.init_weights("jax")
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), f"init touched the frozen trunk: {key}"
    model.train()
    assert not trunk.training


@pytest.mark.parametrize("num_tokens", [121, 392])
def test_token_counts(num_tokens):
    model = timm.create_model("deit_tiny_dart", num_classes=4, depth=1, num_tokens=num_tokens).eval()
    features, dart = model.forward_tokens(torch.randn(1, 3, 448, 448))
    assert features.shape == (1, 1 + num_tokens, 192) and dart.geometry.num_tokens == num_tokens
    assert model.pos_embed.shape == (1, 197, 192)


@pytest.mark.parametrize("name", ["deit_tiny_dart", "vim_tiny_dart"])
def test_registered_dart_model_with_the_grid_tokenizer_drops_the_scorer_options(name, seed):
    """``deit_*_dart`` / ``vim_*_dart`` with ``tokenizer="grid"``: the size's scorer defaults (trunk, head, scorer
    input size) are DART's and are not passed to the grid; the model is the fixed-grid model (DeiT: timm's own,
    same weights, same output); options DART alone takes are a one-line error."""
    small = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=5)
    if name.startswith("deit"):
        small["num_heads"] = 2
    model = timm.create_model(name, tokenizer="grid", **small).eval()
    assert type(model.patch_embed).__name__ == "GridTokenizer" and model.num_tokens == 16
    assert not any(key.startswith("patch_embed.scorer") for key in model.state_dict())
    if name.startswith("deit"):
        deit = timm.create_model("deit_tiny_patch16_224", **small).eval()
        deit.load_state_dict(model.state_dict())
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(images), deit(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"^tokenizer_cfg: tokenizer 'grid' does not take \['trunk'\] \(options of "
                                        r"another tokenizer\?\)$"):
        timm.create_model(name, tokenizer="grid", dart_cfg=dict(trunk="tiny_cnn"), **small)
