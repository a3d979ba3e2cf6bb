"""VideoMamba (OpenGVLab) with a fixed spatiotemporal grid or DART over the frame stack.

Input (B, C, T, H, W). The sequence is: the tokens of the clip (VideoMamba's Conv3d(C, D, (1, p, p)) grid in (t, h,
w) order, or video DART's adaptive tokens in the raster order of the frame stack), each plus its positional embedding
(spatial ``pos_embed[1:]`` of its cell + ``temporal_pos_embedding`` of its frame; re-binned with the geometry for
DART), the class token FIRST (with ``pos_embed[0]``, no temporal embedding), bidirectional-Mamba blocks (the Vim
blocks of :mod:`dartmamba.modules.bimamba`), final RMSNorm, and the head on the class token.

Parameter names are VideoMamba's (``cls_token``, ``pos_embed`` (1, 1 + h * w, D), ``temporal_pos_embedding``
(1, T, D), ``patch_embed.proj`` (a Conv3d), ``layers.i.norm``, ``layers.i.mixer.*``, ``norm_f``, ``head``), so its
video checkpoints load as they are (:func:`dartmamba.models.checkpoints.load_official_checkpoint`) and its image
checkpoints (and hustvl/Vim's) inflate into the video model
(:func:`dartmamba.models.checkpoints.inflate_image_checkpoint`). Video DART keeps the authors' layout under
``patch_embed.`` apart from the scorer, which its tokenizer renames.

The layer loop, final norm, pooling, heads and timm interface are Vim's (:class:`~dartmamba.models.vim.MambaBackbone`,
the base of both); only the embedding differs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..tokenizer import Tokens
from ..tokenizer.video import spatiotemporal_pos_embed
from ._common import ModelFamily, fetch_pretrained, model_cfg, register_family
from .checkpoints import checkpoint_filter_fn, record_config
from .vim import MambaBackbone

__all__ = ["VideoMamba"]


class VideoMamba(MambaBackbone):
    """VideoMamba backbone + classifier.

    Args:
        img_size, patch_size, num_frames, in_chans: clip geometry (VideoMamba: 224, 16, 8, 3).
        num_classes: head outputs (0: no head, ``forward`` returns pooled features).
        embed_dim, depth, d_state, expand, d_conv: Mamba sizes (Tiny 192/24, Small 384/24, Middle 576/32,
            Base 768/24).
        tokenizer: ``"video_grid"`` (Conv3d patches, T * (H / p) * (W / p) tokens), ``"video_dart"`` (adaptive
            tokens over the frame stack), another registered video tokenizer or a Tokenizer class. It is built with
            ``num_frames`` besides the usual keywords and must provide ``feature_grid = (T', h, w)``.
        num_tokens: tokens of an adaptive tokenizer (video DART: default T * h * w, the grid's count).
        grid_size: per-frame grid (DART: score cells, default ``img_size / patch_size``).
        tokenizer_cfg: the tokenizer's own options (video DART: trunk, score_norm, scorer_input_size,
            trunk_weights, trunk_bn_eps, score_mode, first_frame_score, sampling, backends, uniform_scores, num_rows; grid:
            tubelet_size).
        global_pool: ``"token"`` (the class token, VideoMamba's) or ``"avg"`` (mean of the other tokens).
        bimamba_impl: how each mixer runs its two scan directions (as :class:`~dartmamba.models.vim.VisionMamba`).
        device, dtype: where and in which dtype the parameters are created (``device="meta"`` allocates nothing).
        The other arguments (``drop_rate``, ``drop_path_rate``, ``norm_eps``, ``residual_in_fp32``) are
        :class:`~dartmamba.models.vim.VisionMamba`'s; every default but ``tokenizer`` is Vim-Tiny's.
    """

    def __init__(self, img_size=224, patch_size: int = 16, num_frames: int = 8, in_chans: int = 3,
                 num_classes: int = 1000, tokenizer="video_grid", **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         tokenizer=tokenizer, tokenizer_extra={"num_frames": num_frames}, **kwargs)
        self.num_frames = num_frames

    def _build_embeddings(self, embed_dim: int, dd: dict) -> None:
        """The class token leads the sequence with ``pos_embed[:, 0]``; every (frame, cell) position's embedding is
        ``pos_embed[:, 1 + cell] + temporal_pos_embedding[:, frame]``."""
        if len(self.feature_grid) != 3:
            raise ValueError(f"tokenizer: {type(self.patch_embed).__name__} is not a video tokenizer: its "
                             f"feature_grid {self.feature_grid} is not (T, h, w)")
        temporal, spatial = self.feature_grid[0], self.patch_embed.num_patches // self.feature_grid[0]
        self.cls_pos_index = 0                        # the class token's embedding is pos_embed[:, 0]
        self.cls_index = 0                            # and the class token leads the sequence
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, spatial + 1, embed_dim, **dd))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, temporal, embed_dim, **dd))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Vim's init (trunc-normal(0.02) ``pos_embed`` and head, out_proj rescaled by 1/sqrt(depth), Mamba's
        dt/A/D init for both branches, the tokenizer's own), with VideoMamba's zero class token and temporal
        embedding."""
        super().init_weights()
        self.cls_token.zero_()
        self.temporal_pos_embedding.zero_()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"temporal_pos_embedding"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^cls_token|pos_embed|temporal_pos_embedding|patch_embed",
                "blocks": [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))]}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if num_classes > 0:
            self.head.to(device=self.cls_token.device, dtype=self.cls_token.dtype)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Tokens]:
        """Clips (B, C, T, H, W) -> (class token first, then the tokens with their positions (B, 1 + N, D), the
        tokenizer's output). Every (frame, cell) position's embedding is ``pos_embed[1 + cell] +
        temporal_pos_embedding[frame]``; the tokenizer returns each token's (the grid's own, or re-binned for DART)."""
        grid_pe = spatiotemporal_pos_embed(self.pos_embed[:, 1:], self.temporal_pos_embedding)
        out = self.patch_embed(x, grid_pe)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1) + self.pos_embed[:, :1]
        return self.pos_drop(torch.cat([cls_token, out.tokens + out.pos_embed], dim=1)), out

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False):
        """timm's ``forward_intermediates`` (see :meth:`MambaBackbone.forward_intermediates`). The maps are
        (B, D, T', h, w): ``output_fmt`` ``"NCTHW"`` (or timm's channel-first name ``"NCHW"``) scatters the
        tokens onto every frame's grid (the tokenizer's ``to_feature_map``); ``"NLC"`` returns the tokens."""
        if output_fmt == "NCTHW":
            output_fmt = "NCHW"
        elif output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCTHW' (or 'NCHW') or 'NLC', got {output_fmt!r}")
        return super().forward_intermediates(x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                             intermediates_only, output_dict)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        raise NotImplementedError("VideoMamba.set_input_size: a new clip resolution is not supported; build the model "
                                  "with the new img_size instead")


# ---------------------------------------------------------------------------------------------------------------
# Pretrained cfgs, registration
# ---------------------------------------------------------------------------------------------------------------
def _video_cfg(**kwargs) -> dict:
    """One frame's input size (3, 224, 224) (the clip length is the model's ``num_frames``); a Kinetics-400 head, as
    VideoMamba's and the authors' video models."""
    return model_cfg(224, **{"num_classes": 400, **kwargs})


_HUB = "OpenGVLab/VideoMamba"
default_cfgs = generate_default_cfgs({
    "videomamba_tiny.k400_f8": _video_cfg(hf_hub_id=_HUB, hf_hub_filename="videomamba_t16_k400_f8_res224.pth"),
    "videomamba_small.k400_f8": _video_cfg(hf_hub_id=_HUB, hf_hub_filename="videomamba_s16_k400_f8_res224.pth"),
    "videomamba_middle.k400_f8": _video_cfg(hf_hub_id=_HUB, hf_hub_filename="videomamba_m16_k400_f8_res224.pth"),
    "videomamba_base.untrained": _video_cfg(),
    "videomamba_tiny_dart.untrained": _video_cfg(),
    "videomamba_small_dart.untrained": _video_cfg(),
    "videomamba_middle_dart.untrained": _video_cfg(),
    "videomamba_base_dart.untrained": _video_cfg(),
})

_SIZES = {"tiny": dict(embed_dim=192, depth=24), "small": dict(embed_dim=384, depth=24),
          "middle": dict(embed_dim=576, depth=32), "base": dict(embed_dim=768, depth=24)}
register_family(ModelFamily("videomamba", tuple(_SIZES), grid="videomamba_{size}", dart="videomamba_{size}_dart",
                            modality="video"))


def _create(variant: str, pretrained: bool, **kwargs) -> VideoMamba:
    kwargs = fetch_pretrained(variant, pretrained, kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VideoMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _model(size: str, tokenizer: str, pretrained: bool, kwargs: dict) -> VideoMamba:
    name = f"videomamba_{size}" + ("_dart" if tokenizer == "video_dart" else "")
    user_kwargs = dict(kwargs)
    args = dict(img_size=224, patch_size=16, num_frames=8, tokenizer=tokenizer, **_SIZES[size])
    return record_config(_create(name, pretrained, **{**args, **kwargs}), name, user_kwargs)


@register_model
def videomamba_tiny(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-Ti, fixed 1x16x16 grid (D=192, depth 24; 8 x 224 x 224 clips by default)."""
    return _model("tiny", "video_grid", pretrained, kwargs)


@register_model
def videomamba_small(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-S, fixed 1x16x16 grid (D=384, depth 24)."""
    return _model("small", "video_grid", pretrained, kwargs)


@register_model
def videomamba_middle(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-M, fixed 1x16x16 grid (D=576, depth 32)."""
    return _model("middle", "video_grid", pretrained, kwargs)


@register_model
def videomamba_base(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-B, fixed 1x16x16 grid (D=768, depth 24)."""
    return _model("base", "video_grid", pretrained, kwargs)


@register_model
def videomamba_tiny_dart(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-Ti with video DART (T * 196 tokens over the frame stack by default; frozen MobileNetV3-small
    stride-16 scorer with the temporal-difference head)."""
    return _model("tiny", "video_dart", pretrained, kwargs)


@register_model
def videomamba_small_dart(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-S with video DART."""
    return _model("small", "video_dart", pretrained, kwargs)


@register_model
def videomamba_middle_dart(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-M with video DART."""
    return _model("middle", "video_dart", pretrained, kwargs)


@register_model
def videomamba_base_dart(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-B with video DART."""
    return _model("base", "video_dart", pretrained, kwargs)
