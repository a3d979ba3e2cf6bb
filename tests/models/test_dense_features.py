"""Dense features: timm's forward_intermediates / features_only for every family, fixed grid and DART."""
import pytest
import timm
import torch

import dartmamba.models  # noqa: F401
from dartmamba.models._common import split_prefix
from dartmamba.models.checkpoints import transfer_fixed_grid_weights

VIM_GRID = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_classes=5)
VIM_DART = dict(img_size=64, patch_size=8, grid_size=4, embed_dim=32, depth=3, num_classes=5,
                dart_cfg=dict(trunk="tiny_cnn"))
DEIT_DART = dict(img_size=64, patch_size=8, grid_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                 dart_cfg=dict(trunk="tiny_cnn"))
CASES = [("vim_tiny_patch16_224", VIM_GRID, 32), ("vim_tiny_dart", VIM_DART, 64), ("deit_tiny_dart", DEIT_DART, 64)]


@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_features_only_gives_nchw_maps(name, kwargs, size, seed):
    model = timm.create_model(name, features_only=True, out_indices=(0, 2), **kwargs).eval()
    maps = model(torch.randn(2, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 2
    assert model.feature_info.channels() == [32, 32]
    assert model.feature_info.reduction() == [size // 4] * 2


@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_last_normed_intermediate_is_forward_features(name, kwargs, size, seed):
    model = timm.create_model(name, **kwargs).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        final, tokens = model.forward_intermediates(images, indices=1, norm=True, output_fmt="NLC")
        features = model.forward_features(images)
    torch.testing.assert_close(final, features, rtol=1e-5, atol=1e-5)
    prefix_index = getattr(model, "cls_index", 0)
    torch.testing.assert_close(tokens[0], split_prefix(features, prefix_index)[0], rtol=1e-5, atol=1e-5)


def test_dart_intermediates_come_with_their_geometry(seed):
    model = timm.create_model("vim_tiny_dart", num_tokens=11, **VIM_DART).eval()
    with torch.no_grad():
        out = model.forward_intermediates(torch.randn(2, 3, 64, 64), indices=[1], output_fmt="NLC",
                                          output_dict=True, return_prefix_tokens=True)
    assert out["image_intermediates"][0].shape == (2, 11, 32)
    assert out["image_intermediates_prefix"][0].shape == (2, 1, 32)
    assert out["dart"].geometry.num_tokens == 11
    assert out["image_features"].shape == (2, 12, 32)


def test_uniform_dart_feature_maps_equal_the_fixed_grid_maps(seed):
    vim = timm.create_model("vim_tiny_patch16_224", **VIM_GRID).eval()
    dart = timm.create_model("vim_tiny_dart", **{**VIM_DART, "dart_cfg": dict(trunk="tiny_cnn",
                                                                             uniform_scores=True)}).eval()
    transfer_fixed_grid_weights(dart, vim.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid_maps = vim.forward_intermediates(images[:, :, ::2, ::2], indices=[0, 2], intermediates_only=True)
        dart_maps = dart.forward_intermediates(images, indices=[0, 2], intermediates_only=True)
    for a, b in zip(dart_maps, grid_maps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bad_output_format_is_a_clear_error():
    model = timm.create_model("vim_tiny_dart", **VIM_DART)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt="NHWC")
