"""DeiT / ViT with the DART tokenizer, on timm's ``VisionTransformer`` (attention and blocks are timm's).

The class token stays in front; the DART tokenizer replaces the patch embedding, and the grid positional
embeddings (``pos_embed[:, 1:]``, Gh * Gw of them for every token count) are resampled per sample with the tokens.
Fixed-grid DeiT Ti/S/B are timm's own ``deit_{tiny,small,base}_patch16_224``.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, named_apply, register_model
from timm.models.vision_transformer import VisionTransformer, get_init_weights_vit
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..compat.timm import feature_take_indices, recorded_model_args
from ..tokenizer import Tokens
from ._checks import check_backbone_args
from ._common import (OFFICIAL_DART_SCORER, ModelFamily, build_tokenizer, effective_model_args, fetch_pretrained,
                      model_cfg, package_intermediates, register_family, registered_tokenizer_cfg, release_kwargs,
                      tokenizer_options)
from .checkpoints import checkpoint_filter_fn, record_config

__all__ = ["DartVisionTransformer"]


def _tokenizer_layer(img_size, patch_size, in_chans, embed_dim, bias=True, dynamic_img_pad=False, device=None,
                     dtype=None, *, tokenizer, num_tokens, grid_size, options):
    """Factory with the signature timm's VisionTransformer calls its ``embed_layer`` with."""
    if dynamic_img_pad:
        raise ValueError(f"dynamic_img_pad is not supported with the {tokenizer!r} tokenizer")
    return build_tokenizer(tokenizer, options, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, num_tokens=num_tokens, grid_size=grid_size, bias=bias, device=device,
                           dtype=dtype)


class DartVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose patch embedding is any registered tokenizer (DART by default).

    Args (on top of timm's):
        tokenizer: a registered tokenizer name (default ``"dart"``) or a :class:`~dartmamba.tokenizer.Tokenizer`
            class.
        num_tokens: tokens of an adaptive tokenizer (DART: default Gh * Gw).
        grid_size: the tokenizer's grid (DART: the score grid, default ``img_size / (2 * patch_size)``, 14 for
            448 / 16).
        tokenizer_cfg: the tokenizer's own options (DART: trunk, head, score_norm, scorer_input_size,
            trunk_weights, trunk_bn_eps, sampling, backends, uniform_scores, num_rows); ``dart_cfg`` is the same
            argument under its older name.
    """

    # timm's record of the construction arguments (save_for_hf's model_args), completed with what the model computes
    # with now: dartmamba.compat.timm.recorded_model_args
    _model_args = recorded_model_args(effective_model_args)

    def __init__(self, img_size=448, patch_size: int = 16, tokenizer="dart", num_tokens: int | None = None,
                 grid_size=None, tokenizer_cfg: dict | None = None, dart_cfg: dict | None = None, **kwargs):
        check_backbone_args(img_size=img_size, patch_size=patch_size, num_tokens=num_tokens, **kwargs)
        for unsupported in ("dynamic_img_size", "no_embed_class", "reg_tokens"):
            if kwargs.get(unsupported):
                raise ValueError(f"{unsupported} is not supported with the {tokenizer!r} tokenizer")
        if kwargs.get("class_token") is False:
            raise ValueError(f"class_token=False is not supported with the {tokenizer!r} tokenizer")
        embed_layer = partial(_tokenizer_layer, tokenizer=tokenizer, num_tokens=num_tokens, grid_size=grid_size,
                              options=tokenizer_options(tokenizer_cfg, dart_cfg))
        super().__init__(img_size=img_size, patch_size=patch_size, embed_layer=embed_layer, **kwargs)
        self.num_tokens = self.patch_embed.num_tokens
        self.feature_grid = self.patch_embed.feature_grid

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's: the tokenizer changes resolution and the grid positional embeddings are resampled."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self.num_tokens = self.patch_embed.num_tokens
        self.feature_grid = self.patch_embed.feature_grid

    @torch.no_grad()
    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's ViT init for everything but the tokenizer, which re-initialises only its trainable parts.

        timm's own pass calls ``reset_parameters()`` on every module, which would wipe a frozen pretrained scorer
        trunk (BatchNorm statistics included); it never reaches the tokenizer here.
        """
        mode = mode or self.weight_init_mode
        head_bias = -math.log(self.num_classes) if "nlhb" in mode and self.num_classes > 0 else 0.0
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        init_fn = get_init_weights_vit(mode, head_bias, needs_reset=needs_reset)
        for name, child in self.named_children():
            if child is not self.patch_embed:
                named_apply(init_fn, child, name, include_root=True)
        self.patch_embed.init_weights()
        if self.fix_init:
            self.fix_init_weight()

    def embed(self, x: Tensor) -> tuple[Tensor, Tokens]:
        """Images (B, C, H, W) -> (class token + N tokens with positions (B, 1 + N, D), the tokenizer's output)."""
        out = self.patch_embed(x, self.pos_embed[:, self.num_prefix_tokens:])
        cls_token = self.cls_token.expand(x.shape[0], -1, -1) + self.pos_embed[:, :1]
        x = torch.cat([cls_token, out.tokens + out.pos_embed], dim=1)
        return self.pos_drop(x), out

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Tokens]:
        """(B, C, H, W) -> (normed features (B, 1 + N, D), the tokenizer's output, e.g. DART's with the geometry)."""
        x, out = self.embed(x)
        x = self.norm_pre(self.patch_drop(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x), out

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if isinstance(attn_mask, Tensor) or is_causal is True:     # (placeholders while torch.fx traces)
            raise ValueError("attn_mask / is_causal are not supported with an adaptive tokenizer")
        return self.forward_tokens(x)[0]

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: Tensor | None = None, is_causal: bool = False):
        """timm's ``forward_intermediates`` (gradient checkpointing honoured); NCHW maps are the tokenizer's (DART
        tokens scattered onto the score grid by area), and ``output_dict=True`` adds the tokenizer's output under
        its key (``"dart"``, with the geometry)."""
        if isinstance(attn_mask, Tensor) or is_causal is True:     # (placeholders while torch.fx traces)
            raise ValueError("attn_mask / is_causal are not supported with an adaptive tokenizer")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, out = self.embed(x)
        x = self.norm_pre(self.patch_drop(x))
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        final = None if intermediates_only else self.norm(x)
        return package_intermediates(final, intermediates, 0, self.patch_embed, out, output_fmt, intermediates_only,
                                     return_prefix_tokens, output_dict)


def _dart_release(filename: str, top1: float | None, tokens: int = 196) -> dict:
    reported = f"ImageNet-1k top-1 {top1} (DART README)" if top1 is not None else "top-1 not reported"
    return model_cfg(448, hf_hub_id="yinkx3/DART", hf_hub_filename=filename, origin_url="https://github.com/ykx3/DART",
                     paper_ids="arXiv:2506.10390", notes=(f"{tokens} tokens; {reported}",))


default_cfgs = generate_default_cfgs({
    "deit_tiny_dart.dart_in1k": _dart_release("darvit-tiny.pth", 73.8),
    "deit_tiny_dart.dart_v2_in1k": _dart_release("darvit-tiny-v2.pth", None),
    "deit_tiny_dart.dart_in1k_121": _dart_release("darvit-tiny-ft121p.pth", 71.8, 121),
    "deit_small_dart.dart_in1k": _dart_release("darvit-sm.pth", 80.6),
    "deit_small_dart.dart_in1k_144": _dart_release("darvit-sm-ft144p.pth", None, 144),
    "deit_small_dart.dart_in1k_288": _dart_release("darvit-sm-ft288p.pth", None, 288),
    "deit_small_dart.dart_in1k_392": _dart_release("darvit-sm-ft392p.pth", 81.8, 392),
    "deit_base_dart.untrained": model_cfg(448),
})
# The architecture each released checkpoint needs, on top of the registered defaults (official ``darvit_*``
# definitions in ykx3/DART models_deit.py: head v1 scorers, but MobileNetSmallPred('v2') for darvit_tiny_v2).
_RELEASES = {
    "deit_tiny_dart.dart_in1k": dict(tokenizer_cfg=OFFICIAL_DART_SCORER),
    "deit_tiny_dart.dart_v2_in1k": dict(tokenizer_cfg={**OFFICIAL_DART_SCORER, "trunk": "mobilenetv3_small",
                                                       "head": "v2"}),
    "deit_tiny_dart.dart_in1k_121": dict(num_tokens=121, tokenizer_cfg=OFFICIAL_DART_SCORER),
    "deit_small_dart.dart_in1k": dict(tokenizer_cfg=OFFICIAL_DART_SCORER),
    "deit_small_dart.dart_in1k_144": dict(num_tokens=144, tokenizer_cfg=OFFICIAL_DART_SCORER),
    "deit_small_dart.dart_in1k_288": dict(num_tokens=288, tokenizer_cfg=OFFICIAL_DART_SCORER),
    "deit_small_dart.dart_in1k_392": dict(num_tokens=392, tokenizer_cfg=OFFICIAL_DART_SCORER),
}

_SIZES = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6),
          "base": dict(embed_dim=768, depth=12, num_heads=12)}
# The official DeiT-DART models use head v1 on the shallower cut (checkpoint totals 6.31 M / 24.11 M).
_DART_TRUNK = {"tiny": "mobilenetv3_small_v1", "small": "mobilenetv3_large_v1", "base": "mobilenetv3_large_v1"}
# fixed-grid DeiTs are timm's own
register_family(ModelFamily("deit", tuple(_SIZES), grid="deit_{size}_patch16_224", dart="deit_{size}_dart"))


def _create(size: str, pretrained: bool, kwargs: dict, name: str | None = None) -> DartVisionTransformer:
    """DeiT-DART of ``size``, registered as ``name`` (default ``deit_<size>_dart``)."""
    name = name or f"deit_{size}_dart"
    kwargs = release_kwargs(name, pretrained, kwargs, _RELEASES)
    user_kwargs = dict(kwargs)
    kwargs = fetch_pretrained(name, pretrained, kwargs)
    options = tokenizer_options(kwargs.pop("tokenizer_cfg", None), kwargs.pop("dart_cfg", None))
    tokenizer_cfg = registered_tokenizer_cfg(kwargs.get("tokenizer", "dart"),
                                             {"trunk": _DART_TRUNK[size], "head": "v1"}, options,
                                             kwargs.get("img_size", 448), pretrained)
    args = dict(img_size=448, patch_size=16, **_SIZES[size])
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(DartVisionTransformer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 tokenizer_cfg=tokenizer_cfg,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **{**args, **kwargs})
    return record_config(model, name, user_kwargs)


@register_model
def deit_tiny_dart(pretrained: bool = False, **kwargs) -> DartVisionTransformer:
    """DeiT-Tiny with DART (448 input, 196 tokens by default; MobileNetV3-small scorer, head v1)."""
    return _create("tiny", pretrained, kwargs)


@register_model
def deit_small_dart(pretrained: bool = False, **kwargs) -> DartVisionTransformer:
    """DeiT-Small with DART (448 input, 196 tokens by default; MobileNetV3-large scorer, head v1)."""
    return _create("small", pretrained, kwargs)


@register_model
def deit_base_dart(pretrained: bool = False, **kwargs) -> DartVisionTransformer:
    """DeiT-Base with DART (448 input, 196 tokens by default; MobileNetV3-large scorer, head v1)."""
    return _create("base", pretrained, kwargs)
