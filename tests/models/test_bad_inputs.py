"""Every bad argument is an error naming it and its allowed range, at construction where it can be (Vim, DeiT-DART,
the DART tokenizer, the Mamba mixer), and bad forward inputs name the input and both sides. Images of any floating
dtype run (in the model's dtype)."""
import pytest
import timm
import torch

import dartmamba  # noqa: F401
from dartmamba.modules.bimamba import BiMambaMixer
from dartmamba.tokenizer import DartTokenizer, default_grid_size

from tests.helpers import TINY_DART, TINY_VIM

DEIT_DART = dict(img_size=64, patch_size=8, grid_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                 dart_cfg=dict(trunk="tiny_cnn"))


def vim_dart(**kwargs):
    return timm.create_model("vim_tiny_dart", **{**TINY_VIM, **TINY_DART, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_state=0), "d_state must be an int >= 1 (the SSM state size), got 0"),
    (dict(expand=0), "expand must be an int >= 1 (the Mamba expansion), got 0"),
    (dict(grid_size=100), "grid_size must lie in [1, img_size] per side (at most one score cell per pixel): "
                          "grid_size=(100, 100) for img_size=(64, 64)"),
    (dict(grid_size=(4, 65)), "grid_size must lie in [1, img_size] per side"),
    (dict(num_tokens=64 * 64 + 1), "num_tokens must be an int in [1, 4096] (at most one token per pixel of the "
                                   "64x64 image), got 4097"),
    (dict(num_tokens=-4), "num_tokens must be None (the tokenizer's default) or an int >= 1, got -4"),
    (dict(num_tokens=0), "num_tokens must be None (the tokenizer's default) or an int >= 1, got 0"),
    (dict(embed_dim=0), "embed_dim must be an int >= 1 (the token width D), got 0"),
    (dict(embed_dim=-3), "embed_dim must be an int >= 1 (the token width D), got -3"),
    (dict(in_chans=0), "in_chans must be an int >= 1 (image channels), got 0"),
    (dict(depth=-1), "depth must be an int >= 0 (blocks), got -1"),
    (dict(drop_path_rate=1.5), "drop_path_rate must be a number in [0, 1), got 1.5"),
])
def test_vim_dart_construction_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        vim_dart(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=0), "embed_dim must be an int >= 1 (the token width D), got 0"),
    (dict(in_chans=0), "in_chans must be an int >= 1 (image channels), got 0"),
    (dict(num_tokens=-4), "num_tokens must be None (the tokenizer's default) or an int >= 1, got -4"),
    (dict(embed_dim=33), "embed_dim must be divisible by num_heads, got embed_dim=33 and num_heads=2"),
    (dict(grid_size=65), "grid_size must lie in [1, img_size] per side"),
])
def test_deit_dart_construction_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        timm.create_model("deit_tiny_dart", **{**DEIT_DART, **kwargs})
    assert message in str(err.value)


def test_fixed_grid_vim_and_the_mixer_check_their_sizes():
    with pytest.raises(ValueError, match=r"in_chans must be an int >= 1 \(image channels\), got 0"):
        timm.create_model("vim_tiny_patch16_224", **TINY_VIM, in_chans=0)
    with pytest.raises(ValueError, match="d_state must be an int >= 1, got 0"):
        BiMambaMixer(32, d_state=0)
    with pytest.raises(ValueError, match="dt_rank must be an int >= 1 or 'auto', got 0"):
        BiMambaMixer(32, dt_rank=0)
    with pytest.raises(ValueError, match=r"num_tokens must be an int in \[1, 16\]"):
        DartTokenizer(img_size=4, patch_size=2, grid_size=2, num_tokens=17, trunk="tiny_cnn")


def test_grid_pos_embed_of_the_wrong_width_is_refused():
    tokenizer = vim_dart().patch_embed
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"grid_pos_embed must have shape \(1 or B=2, num_patches=16, embed_dim=32\), "
                                         r"got \(1, 16, 31\)"):
        tokenizer(images, torch.randn(1, 16, 31))
    with pytest.raises(ValueError, match=r"got \(3, 16, 32\)"):
        tokenizer(images, torch.randn(3, 16, 32))
    assert tokenizer(images, torch.randn(2, 16, 32)).pos_embed.shape == (2, 16, 32)


def test_scores_and_images_must_agree_on_the_batch():
    tokenizer = vim_dart().patch_embed
    with pytest.raises(ValueError, match=r"scores must have shape \(B=2, Gh=4, Gw=4\) for 2 images and a 4x4 score "
                                         r"grid, got \(3, 4, 4\)"):
        tokenizer(torch.randn(2, 3, 64, 64), None, scores=torch.rand(3, 4, 4) + 0.1)
    with pytest.raises(ValueError, match=r"got \(2, 5, 4\)"):
        tokenizer(torch.randn(2, 3, 64, 64), None, scores=torch.rand(2, 5, 4) + 0.1)


@pytest.mark.parametrize("name", ["vim_tiny_dart", "vim_tiny_patch16_224", "deit_tiny_dart"])
def test_images_on_another_device_name_both_devices(name):
    kwargs = {"vim_tiny_dart": {**TINY_VIM, **TINY_DART}, "vim_tiny_patch16_224": {**TINY_VIM, "img_size": 64,
              "patch_size": 8}, "deit_tiny_dart": DEIT_DART}[name]
    model = timm.create_model(name, **kwargs)
    images = torch.empty(2, 3, 64, 64, device="meta")          # the one other device every machine has
    with pytest.raises(ValueError, match=r"images are on meta but the model's weights are on cpu; move the images "
                                         r"\(images.to\('cpu'\)\) or the model \(model.to\('meta'\)\)"):
        model(images)


@pytest.mark.parametrize("name", ["vim_tiny_dart", "vim_tiny_patch16_224", "deit_tiny_dart"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_any_floating_dtype_run_in_the_models_dtype(name, dtype, seed):
    """float64 / float16 / bfloat16 images into a float32 model give exactly the model's output on the images cast
    to float32 (the tokenizer casts them: what the model computes in is the model's dtype)."""
    kwargs = {"vim_tiny_dart": {**TINY_VIM, **TINY_DART}, "vim_tiny_patch16_224": {**TINY_VIM, "img_size": 64,
              "patch_size": 8}, "deit_tiny_dart": DEIT_DART}[name]
    model = timm.create_model(name, **kwargs).eval()
    images = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        got = model(images)
        want = model(images.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_bfloat16_model_takes_float32_images(seed):
    model = vim_dart().to(torch.bfloat16).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images.to(torch.bfloat16)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vim_tiny_dart", "deit_tiny_dart"])
def test_huge_pixel_values_name_the_images(name):
    """Finite pixels of 1e30 overflow the DART scorer: the model's error names the images and image 1, not the
    scorer's internal score tensor."""
    kwargs = {"vim_tiny_dart": {**TINY_VIM, **TINY_DART}, "deit_tiny_dart": DEIT_DART}[name]
    model = timm.create_model(name, **kwargs)
    images = torch.randn(2, 3, 64, 64)
    images[1] = 1e30
    with pytest.raises(ValueError) as err:
        model(images)
    assert str(err.value) == (
        "images: the DART scorer produced non-finite scores for image 1 (its values reach 1e+30; scores[1, 0, 0] = "
        "nan): values that large overflow the scorer's arithmetic; normalise the images (e.g. to mean 0 and std 1)")


@pytest.mark.parametrize("call, message", [
    (lambda: DartTokenizer(img_size=64, patch_size=8, grid_size=4, num_tokens=16, num_rows=-1, trunk="tiny_cnn"),
     "num_rows must be an int in [1, num_tokens=16], got -1"),
    (lambda: DartTokenizer(img_size=64, patch_size=8, grid_size=4, num_tokens=-1, trunk="tiny_cnn"),
     "num_tokens must be a positive int, got -1"),
    (lambda: DartTokenizer(img_size=64, patch_size=8, grid_size=4, num_tokens=16.0, trunk="tiny_cnn"),
     "num_tokens must be a positive int, got 16.0"),
    (lambda: DartTokenizer(img_size=64, patch_size=8, grid_size=4, trunk="tiny_cnn").set_input_size(num_tokens=-1),
     "num_tokens must be a positive int, got -1"),
    (lambda: default_grid_size(64, 0),
     "patch_size must be a positive int, got 0"),
    (lambda: default_grid_size(64, -8),
     "patch_size must be a positive int, got -8"),
])
def test_tokenizer_integer_arguments_are_one_line_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message
