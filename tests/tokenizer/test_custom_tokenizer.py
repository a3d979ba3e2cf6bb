"""A tokenizer of the test's own, registered by name, runs in Vim, DeiT and VideoMamba without a library change.

The jittered grid: a fixed p x p grid whose sample points are shifted by a learned offset plus, in training, a random
sub-patch jitter (one per image), resampled with bilinear ``grid_sample`` and embedded by a Conv2d. With zero offset
it samples every pixel centre, so it is the fixed grid (timm's ``PatchEmbed`` / VideoMamba's Conv3d) with the same
weights. It implements only what :class:`dartmamba.tokenizer.Tokenizer` declares.
"""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import dartmamba.models  # noqa: F401  (registers the models)
from dartmamba.flops import count_model_flops
from dartmamba.tokenizer import (DartTokenizer, DartTokens, Tokenizer, Tokens, VideoDartTokens, VideoGridTokenizer,
                                 create_tokenizer, register_tokenizer)

from ..models.small_configs import SMALL
from ..models.videomamba_cases import VIDEO_SMALL


@register_tokenizer("test_jittered_grid")
class JitteredGridTokenizer(nn.Module, Tokenizer):
    """Images (B, C, H, W), or clips (B, C, T, H, W) when built with ``num_frames`` (every frame on the same
    shifted grid) -> (B, [T *] H/p * W/p, D) tokens; ``geometry`` is the (B, 2) offset (dy, dx) in patches."""

    output_key = "jitter"

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 num_tokens=None, grid_size=None, bias: bool = True, num_frames=None, jitter: float = 0.5,
                 device=None, dtype=None):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size, self.in_chans, self.num_frames, self.jitter = patch_size, in_chans, num_frames, jitter
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.feature_grid = (*(() if num_frames is None else (num_frames,)), *self.grid_size)
        self.num_patches = self.num_tokens = math.prod(self.feature_grid)
        if num_tokens not in (None, self.num_tokens) or grid_size not in (None, self.grid_size):
            raise ValueError("num_tokens, grid_size: a fixed grid's own, or None")
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias, device=device, dtype=dtype)
        self.shift = nn.Parameter(torch.zeros(2, device=device, dtype=dtype))     # (dy, dx), in patches

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size if as_scalar else (self.patch_size, self.patch_size)

    def init_weights(self) -> None:
        self.proj.reset_parameters()
        nn.init.zeros_(self.shift)

    def offsets(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, 2): the learned shift, plus a uniform jitter in [-jitter, jitter] patches while training."""
        offsets = self.shift.expand(batch, 2)
        if self.training and self.jitter:
            offsets = offsets + (2 * torch.rand(batch, 2, device=like.device, dtype=like.dtype) - 1) * self.jitter
        return offsets

    def forward(self, images: torch.Tensor, grid_pos_embed=None) -> Tokens:
        frames = images if self.num_frames is None else rearrange(images, "b c t h w -> (b t) c h w")
        offsets = self.offsets(images.shape[0], self.shift)
        per_frame = offsets if self.num_frames is None else offsets.repeat_interleave(self.num_frames, dim=0)
        height, width = frames.shape[-2:]
        # pixel centres shifted by offset * p pixels, in grid_sample's coordinates (align_corners=False)
        ys = (torch.arange(height, device=images.device) + 0.5 + per_frame[:, :1] * self.patch_size) * 2 / height - 1
        xs = (torch.arange(width, device=images.device) + 0.5 + per_frame[:, 1:] * self.patch_size) * 2 / width - 1
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)        # (n, H, W, 2)
        sampled = F.grid_sample(frames, grid.to(frames.dtype), mode="bilinear", padding_mode="border",
                                align_corners=False)
        tokens = self.proj(sampled).flatten(2).transpose(1, 2)                                        # (n, L, D)
        if self.num_frames is not None:
            tokens = rearrange(tokens, "(b t) l d -> b (t l) d", t=self.num_frames)
        return Tokens(tokens, grid_pos_embed, offsets)

    def to_feature_map(self, tokens: torch.Tensor, output: Tokens) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.feature_grid)

    def flop_parts(self, call, counted):
        resample = counted(part="resample")           # grid_sample's taps (the FLOP counter tags them)
        return {"resample": resample, "embed": counted() - resample}


DEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
# (model, its small config, the fixed-grid model it equals at zero offset, input shape)
MODELS = {
    "vim": ("vim_tiny_patch16_224", SMALL["vim_tiny_patch16_224"], "grid", (2, 3, 32, 32)),
    "deit": ("deit_tiny_dart", DEIT, "grid", (2, 3, 32, 32)),
    "videomamba": ("videomamba_tiny", VIDEO_SMALL["videomamba_tiny"], "video_grid", (2, 3, 3, 32, 32)),
}


def build(family: str, tokenizer: str, **kwargs):
    name, cfg, _, _ = MODELS[family]
    return timm.create_model(name, tokenizer=tokenizer, num_classes=5, **{**cfg, **kwargs})


def same_weights(jittered: nn.Module, grid: nn.Module) -> None:
    """Copy the fixed-grid model's weights into the jittered one (VideoMamba's Conv3d (D, C, 1, p, p) -> Conv2d);
    a ``features_only`` model's backbone is its ``model``."""
    jittered, grid = getattr(jittered, "model", jittered), getattr(grid, "model", grid)
    state = dict(grid.state_dict())
    weight = state["patch_embed.proj.weight"]
    state["patch_embed.proj.weight"] = weight.squeeze(2) if weight.dim() == 5 else weight
    missing, unexpected = jittered.load_state_dict(state, strict=False)
    assert missing == ["patch_embed.shift"] and unexpected == []


def pair(family: str, train: bool, **kwargs):
    """(the jittered model, the fixed-grid model with the same weights, an input batch)."""
    _, _, grid_name, shape = MODELS[family]
    grid = build(family, grid_name, **kwargs).train(train)
    jittered = build(family, "test_jittered_grid", **kwargs).train(train)
    same_weights(jittered, grid)
    return jittered, grid, torch.randn(*shape)


@pytest.mark.parametrize("family", list(MODELS))
def test_zero_offset_equals_the_fixed_grid_with_the_same_weights(family, seed):
    jittered, grid, x = pair(family, train=False)
    with torch.no_grad():
        torch.testing.assert_close(jittered(x), grid(x), rtol=1e-4, atol=1e-5)
        out = jittered.forward_intermediates(x, indices=2, output_dict=True)
        ref = grid.forward_intermediates(x, indices=2, output_dict=True)
    assert isinstance(out["jitter"], Tokens) and torch.equal(out["jitter"].geometry, torch.zeros(len(x), 2))
    for got, want in zip(out["image_intermediates"], ref["image_intermediates"], strict=True):
        assert got.shape == want.shape == (len(x), 32, *jittered.feature_grid)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(MODELS))
def test_training_jitters_and_gradients_reach_the_tokenizer(family, seed):
    jittered, grid, x = pair(family, train=True)
    jittered(x).square().mean().backward()
    tokenizer = jittered.patch_embed
    assert isinstance(tokenizer, JitteredGridTokenizer)
    for name, param in tokenizer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with torch.no_grad():
        assert not torch.allclose(jittered(x), grid(x), rtol=1e-3, atol=1e-3)    # the sample points moved


@pytest.mark.parametrize("family", list(MODELS))
def test_features_only_maps_on_the_tokenizer_grid(family, seed):
    jittered, grid, x = pair(family, train=False, features_only=True, out_indices=(0, 1))
    with torch.no_grad():
        got, want = jittered(x), grid(x)
    assert [f.shape for f in got] == [f.shape for f in want] == [(len(x), 32, *x.shape[2:-2], 4, 4)] * 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(MODELS))
def test_flop_count_splits_the_tokenizer_by_its_own_parts(family):
    name, cfg, grid_name, shape = MODELS[family]
    jittered = count_model_flops(name, tokenizer="test_jittered_grid", **cfg)
    grid = count_model_flops(name, tokenizer=grid_name, **cfg)
    assert jittered.input_size == grid.input_size == shape[1:]
    frames = shape[2] if len(shape) == 5 else 1
    assert jittered.parts["resample"] == 4 * frames * 3 * 32 * 32              # 4 bilinear taps per pixel
    assert jittered.parts["embed"] == grid.parts["embed"] == frames * 16 * 32 * 3 * 8 * 8
    assert jittered.parts["backbone"] == grid.parts["backbone"] > 0
    assert jittered.parts["head"] == grid.parts["head"] > 0


def test_dart_tokens_are_tokens(seed):
    """DART's outputs are Tokens (a subclass with every field set): code handling Tokens handles them."""
    image = DartTokenizer(img_size=32, patch_size=8, grid_size=4, num_tokens=10, embed_dim=8, trunk="tiny_cnn")
    out = image(torch.rand(2, 3, 32, 32), torch.zeros(1, 16, 8))
    assert isinstance(out, Tokens) and isinstance(out, DartTokens) and out._fields == Tokens._fields
    assert out.tokens.shape == (2, 10, 8) and out.scores.shape == (2, 4, 4)
    assert isinstance(out._replace(pos_embed=None), DartTokens)
    assert issubclass(VideoDartTokens, Tokens)
    assert Tokens(torch.zeros(1), None).scores is None and Tokens(torch.zeros(1), None).geometry is None


def test_the_interface_names_what_a_tokenizer_lacks():
    class Partial(nn.Module, Tokenizer):
        def __init__(self, **kwargs):
            super().__init__()
            self.num_tokens = self.num_patches = 4
            self.feature_grid = self.grid_size = (2, 2)

    with pytest.raises(TypeError, match=r"^tokenizer <class '.*Partial'>: Partial does not set img_size, in_chans "
                                        r"\(every Tokenizer sets num_tokens, num_patches, grid_size, feature_grid, "
                                        r"img_size, in_chans; see dartmamba.tokenizer.Tokenizer\)$"):
        create_tokenizer(Partial)
    video = VideoGridTokenizer(img_size=16, patch_size=8, num_frames=2, embed_dim=4)
    with pytest.raises(NotImplementedError, match=r"^VideoGridTokenizer does not implement "
                                                  r"Tokenizer.set_input_size \(see dartmamba.tokenizer.Tokenizer\)$"):
        video.set_input_size(img_size=32)
    assert video.num_frames == 2 and JitteredGridTokenizer(img_size=16, patch_size=8).num_frames is None


def test_a_tokenizer_that_does_not_take_an_option_or_a_backbone_keyword_is_a_one_line_error():
    with pytest.raises(TypeError, match=r"^tokenizer_cfg: tokenizer 'test_jittered_grid' does not take \['trunk'\] "
                                        r"\(options of another tokenizer\?\)$"):
        build("vim", "test_jittered_grid", tokenizer_cfg=dict(trunk="tiny_cnn"))
    with pytest.raises(TypeError, match=r"^tokenizer 'grid' does not take \['num_frames'\], which the backbone passes "
                                        r"\(video backbones pass it: they need a video tokenizer\)$"):
        build("videomamba", "grid")
