"""Vision Mamba (Vim, hustvl) with a fixed patch grid or the DART tokenizer.

The sequence is: tokens (fixed grid or DART) + learned absolute positional embeddings, a class token inserted in
the MIDDLE (index M // 2), 24 bidirectional-Mamba blocks (pre-norm, fp32 residual stream), final RMSNorm, and the
head on the middle token. Parameter names follow hustvl/Vim (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``layers.i.norm``, ``layers.i.mixer.*``, ``norm_f``, ``head``), so its checkpoints load as they are.

Vim-DART: the class token's positional embedding is taken out of ``pos_embed`` (it sits at the grid's middle
index), the grid embeddings go through DART with the tokens, and the class token and its embedding are inserted
at the middle of the DART sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..compat.timm import feature_take_indices, record_input_size, recorded_model_args
from ..modules.bimamba import DEFAULT_BIMAMBA_IMPL, BiMambaMixer, VimBlock
from ..ops import RMSNorm, rms_norm
from ..tokenizer import Tokens
from ._checks import check_backbone_args
from ._common import (OFFICIAL_DART_SCORER, ModelFamily, build_tokenizer, effective_model_args, fetch_pretrained,
                      model_cfg, package_intermediates, register_family, registered_tokenizer_cfg, release_kwargs,
                      tokenizer_options)
from .checkpoints import checkpoint_filter_fn, record_config

__all__ = ["MambaBackbone", "VisionMamba"]


def insert_middle(tokens: Tensor, token: Tensor, middle: int) -> Tensor:
    """(B, M, D), (B, 1, D) -> (B, M + 1, D) with ``token`` at index ``middle`` (M // 2 for Vim)."""
    return torch.cat([tokens[:, :middle], token, tokens[:, middle:]], dim=1)


class MambaBackbone(nn.Module):
    """What Vim and VideoMamba share: a tokenizer, a class token, bidirectional-Mamba blocks (pre-norm, fp32
    residual stream), the final RMSNorm, pooling, the head and timm's model interface.

    A family builds its own positional embeddings and places its class token (:meth:`_build_embeddings`,
    :meth:`embed`); everything else is here, and every family's constructor is this one (arguments: see
    :class:`VisionMamba`). ``tokenizer_extra``: keywords a family adds for its tokenizer (VideoMamba's
    ``num_frames``).
    """

    # timm's record of the construction arguments (save_for_hf's model_args), completed with what the model computes
    # with now: dartmamba.compat.timm.recorded_model_args
    _model_args = recorded_model_args(effective_model_args)

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 24, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-5,
                 residual_in_fp32: bool = True, tokenizer="grid", num_tokens: int | None = None,
                 grid_size=None, tokenizer_cfg: dict | None = None, dart_cfg: dict | None = None,
                 global_pool: str = "token", bimamba_impl: str = DEFAULT_BIMAMBA_IMPL, device=None, dtype=None, *,
                 tokenizer_extra: dict | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        check_backbone_args(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            embed_dim=embed_dim, depth=depth, d_state=d_state, expand=expand, d_conv=d_conv,
                            drop_rate=drop_rate, drop_path_rate=drop_path_rate, num_tokens=num_tokens)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth = depth
        self.residual_in_fp32 = residual_in_fp32
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = build_tokenizer(tokenizer, tokenizer_options(tokenizer_cfg, dart_cfg), img_size=img_size,
                                           patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                           num_tokens=num_tokens, grid_size=grid_size, **(tokenizer_extra or {}),
                                           **dd)
        self.num_tokens = self.patch_embed.num_tokens
        self.feature_grid = tuple(self.patch_embed.feature_grid)
        self._build_embeddings(embed_dim, dd)
        self.pos_drop = nn.Dropout(drop_rate)

        drop_path = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, BiMambaMixer(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, layer_idx=i,
                                             bimamba_impl=bimamba_impl, **dd),
                     drop_path=drop_path[i], eps=norm_eps, residual_in_fp32=residual_in_fp32, **dd)
            for i in range(depth)])
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.init_weights()

    def _build_embeddings(self, embed_dim: int, dd: dict) -> None:
        """Create ``cls_token``, the positional embeddings, ``cls_pos_index`` and ``cls_index`` (after
        ``self.patch_embed``). ``dd``: the factory kwargs."""
        raise NotImplementedError(f"{type(self).__name__} must define _build_embeddings")

    def embed(self, x: Tensor) -> tuple[Tensor, Tokens]:
        """Input -> (tokens with positions and the class token at ``cls_index`` (B, 1 + N, D), the tokenizer's
        output)."""
        raise NotImplementedError(f"{type(self).__name__} must define embed")

    # -- init ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Vim's init: trunc-normal(0.02) embeddings and head, out_proj rescaled by 1/sqrt(depth), Mamba's dt/A/D
        init for both scan branches; the tokenizer re-initialises its own trainable parts (a frozen scorer trunk is
        never touched)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.patch_embed.init_weights()
        for layer in self.layers:
            mixer = layer.mixer
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            mixer.out_proj.weight /= math.sqrt(max(1, self.depth))
            mixer.reset_ssm_parameters()

    # -- timm interface ---------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        names |= {n for n, _ in self.named_parameters() if n.endswith(("A_log", "A_b_log"))}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^cls_token|pos_embed|patch_embed", "blocks": [(r"^layers\.(\d+)", None),
                                                                         (r"^norm_f", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        ref = self.cls_token           # a new head lives where (and in the dtype) the model does
        self.head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0
                     else nn.Identity())
        self.head.train(self.training)
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # -- forward ------------------------------------------------------------------------------------------------
    def run_layers(self, x: Tensor, layers=None, take_indices=(), norm: bool = False
                   ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """Embedded tokens (B, L, D) through ``layers`` (default: all) -> (hidden, residual, intermediates): the
        residual stream after each layer in ``take_indices`` (final-normed when ``norm``)."""
        hidden, residual, intermediates = x, None, []
        for i, layer in enumerate(self.layers if layers is None else layers):
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
            if i in take_indices:
                stream = residual.to(hidden.dtype) + hidden
                intermediates.append(self.norm_f(stream) if norm else stream)
        return hidden, residual, intermediates

    @property
    def final_drop_path(self) -> nn.Module:
        """The drop path of the last residual add: the last layer's (read from ``layers`` every time, so it follows
        ``prune_intermediate_layers``)."""
        return self.layers[-1].drop_path if len(self.layers) else nn.Identity()

    def final_norm(self, hidden: Tensor, residual: Tensor | None) -> Tensor:
        """The last residual add and the final RMSNorm, fused (B, L, D); without the norm after
        ``prune_intermediate_layers(prune_norm=True)``."""
        update = self.final_drop_path(hidden) if residual is not None else hidden
        if isinstance(self.norm_f, nn.Identity):
            return update if residual is None else (residual + update).to(update.dtype)
        return rms_norm(update, self.norm_f.weight, residual=residual, eps=self.norm_f.eps, prenorm=False,
                        residual_in_fp32=self.residual_in_fp32)

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Tokens]:
        """Input -> (normed features (B, 1 + N, D), the tokenizer's output, e.g. DART's with the geometry)."""
        x, out = self.embed(x)
        hidden, residual, _ = self.run_layers(x)
        return self.final_norm(hidden, residual), out

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False):
        """timm's ``forward_intermediates``: the residual stream after the selected layers.

        Args:
            indices: last n layers if int, all if None, else the listed layer indices.
            norm: apply the final RMSNorm to every intermediate.
            output_fmt: ``"NCHW"`` maps (the tokenizer's; DART tokens are scattered onto the score grid by area) or
                ``"NLC"`` tokens.
            output_dict: return a dict (``image_intermediates``, ``image_features``, and the tokenizer's output
                under its key, ``dart`` with the geometry for DART).
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x, out = self.embed(x)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        hidden, residual, intermediates = self.run_layers(x, layers, take_indices, norm)
        final = None if intermediates_only else self.final_norm(hidden, residual)
        return package_intermediates(final, intermediates, self.cls_index, self.patch_embed, out, output_fmt,
                                     intermediates_only, return_prefix_tokens, output_dict)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last requested intermediate, the final norm when ``prune_norm`` and the head
        when ``prune_head`` (timm's contract); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Input -> (B, 1 + N, D), the class token at ``cls_index``."""
        return self.forward_tokens(x)[0]

    def pool(self, x: Tensor) -> Tensor:
        """The class token (``"token"``) or the mean of the other tokens (``"avg"``). (B, 1 + N, D) -> (B, D)."""
        ci = self.cls_index
        if self.global_pool == "avg":
            return torch.cat([x[:, :ci], x[:, ci + 1:]], dim=1).mean(dim=1)
        return x[:, ci]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class VisionMamba(MambaBackbone):
    """Vim backbone + classifier.

    Args:
        img_size, patch_size, in_chans: input and patch geometry.
        num_classes: head outputs (0: no head, ``forward`` returns pooled features).
        embed_dim, depth, d_state, expand, d_conv: Mamba sizes (Tiny 192, Small 384, Base 768; depth 24).
        tokenizer: a registered tokenizer name (``"grid"``: timm's PatchEmbed, (img/p)^2 tokens; ``"dart"``; see
            :func:`dartmamba.tokenizer.register_tokenizer`) or a :class:`~dartmamba.tokenizer.Tokenizer` class.
        num_tokens: tokens of an adaptive tokenizer (DART: default Gh * Gw).
        grid_size: the tokenizer's grid (DART: the score grid, default ``img_size / (2 * patch_size)``, 14 for
            448 / 16, the paper's half-resolution geometry); the positional embedding has one entry per grid cell +
            1 for every token count.
        tokenizer_cfg: the tokenizer's own options (DART: trunk, head, score_norm, scorer_input_size,
            trunk_weights, trunk_bn_eps, sampling, backends, uniform_scores, num_rows); ``dart_cfg`` is the same
            argument under its older name.
        global_pool: ``"token"`` (the middle class token, Vim's default) or ``"avg"`` (mean of the other tokens).
        bimamba_impl: how each mixer runs its two scan directions: ``"fused"`` (one pass over both), ``"two_pass"``
            (one after the other) or ``"auto"`` (the default: fused on CUDA, two-pass on CPU); same parameters, same
            result (see :class:`~dartmamba.modules.bimamba.BiMambaMixer`).
        device, dtype: where and in which dtype the parameters are created (``device="meta"`` allocates nothing).
    """

    def _build_embeddings(self, embed_dim: int, dd: dict) -> None:
        """The class token sits in the middle of the sequence and its positional embedding at the grid's middle
        index of ``pos_embed`` (1, grid cells + 1, D)."""
        num_grid = self.patch_embed.num_patches
        self.cls_pos_index = num_grid // 2            # where the class token's embedding sits in pos_embed
        self.cls_index = self.num_tokens // 2         # where the class token sits in the sequence
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_grid + 1, embed_dim, **dd))

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """A new input resolution (timm's ``set_input_size``): the tokenizer adapts (a fixed grid gets more patches,
        DART a larger score grid) and the grid positional embeddings are resampled (bicubic, class-token embedding
        kept at the grid's middle)."""
        from .checkpoints import resize_grid_pos_embed

        prev_grid = tuple(self.patch_embed.grid_size)
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        grid = tuple(self.patch_embed.grid_size)
        if grid != prev_grid:
            new_cls = (grid[0] * grid[1]) // 2
            resized = resize_grid_pos_embed(self.pos_embed.detach(), prev_grid, self.cls_pos_index, grid, new_cls)
            self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
            self.cls_pos_index = new_cls
        self.num_tokens = self.patch_embed.num_tokens
        self.cls_index = self.num_tokens // 2
        self.feature_grid = tuple(self.patch_embed.feature_grid)
        reduction = self.patch_embed.feat_ratio()
        for info in self.feature_info:
            info["reduction"] = reduction
        if getattr(self, "pretrained_cfg", None) is not None:
            size = self.patch_embed.img_size
            self.pretrained_cfg = {**self.pretrained_cfg, "input_size": (self.in_chans, *tuple(size))}
        record_input_size(self, tuple(self.patch_embed.img_size))     # timm's traits and model_args follow

    def embed(self, x: Tensor) -> tuple[Tensor, Tokens]:
        """Images (B, C, H, W) -> (tokens with positions and the class token at M // 2 (B, M + 1, D), the
        tokenizer's output).

        The class token's positional embedding sits at the grid's middle index of ``pos_embed``; the tokenizer gets
        the other (grid) embeddings and returns each token's (the grid's own for a fixed grid, re-binned for DART).
        """
        ci = self.cls_pos_index
        grid_pe = torch.cat([self.pos_embed[:, :ci], self.pos_embed[:, ci + 1:]], dim=1)
        out = self.patch_embed(x, grid_pe)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1) + self.pos_embed[:, ci:ci + 1]
        x = insert_middle(out.tokens + out.pos_embed, cls_token, self.cls_index)
        return self.pos_drop(x), out


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, pretrained cfgs, registration
# ---------------------------------------------------------------------------------------------------------------
def _hustvl(size: str, filename: str, top1: float) -> dict:
    return model_cfg(224, hf_hub_id=f"hustvl/Vim-{size}-midclstok", hf_hub_filename=filename,
                     origin_url="https://github.com/hustvl/Vim", paper_ids="arXiv:2401.09417",
                     notes=(f"ImageNet-1k top-1 {top1} (hustvl/Vim README)",))


def _dart_release(filename: str, top1: float | None, tokens: int = 196) -> dict:
    reported = f"ImageNet-1k top-1 {top1} (DART README)" if top1 is not None else "top-1 not reported"
    return model_cfg(448, hf_hub_id="yinkx3/DART", hf_hub_filename=filename, origin_url="https://github.com/ykx3/DART",
                     paper_ids="arXiv:2506.10390", notes=(f"{tokens} tokens; {reported}",))


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.hustvl_in1k": _hustvl("tiny", "vim_t_midclstok_76p1acc.pth", 76.1),
    "vim_small_patch16_224.hustvl_in1k": _hustvl("small", "vim_s_midclstok_80p5acc.pth", 80.5),
    "vim_base_patch16_224.hustvl_in1k": _hustvl("base", "vim_b_midclstok_81p9acc.pth", 81.9),
    "vim_tiny_dart.dart_in1k": _dart_release("darvim-tiny.pth", 77.2),
    "vim_tiny_dart.dart_in1k_392": _dart_release("darvim-tiny-ft2seq.pth", 78.9, 392),
    "vim_small_dart.dart_in1k": _dart_release("darvim-sm.pth", 81.5),
    "vim_small_dart.dart_in1k_392": _dart_release("darvim-sm-ft2seq.pth", 82.2, 392),
    "vim_base_dart.untrained": model_cfg(448),
})
# The architecture each released checkpoint needs, on top of the registered defaults (official ``darvim_*``
# definitions in ykx3/DART models_mamba.py: MobileNetV3 v2-head scorers, 196 or 14 * 14 * 2 = 392 tokens).
_RELEASES = {
    "vim_tiny_dart.dart_in1k": dict(tokenizer_cfg=OFFICIAL_DART_SCORER),
    "vim_tiny_dart.dart_in1k_392": dict(num_tokens=392, tokenizer_cfg=OFFICIAL_DART_SCORER),
    "vim_small_dart.dart_in1k": dict(tokenizer_cfg=OFFICIAL_DART_SCORER),
    "vim_small_dart.dart_in1k_392": dict(num_tokens=392, tokenizer_cfg=OFFICIAL_DART_SCORER),
}


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    kwargs = fetch_pretrained(variant, pretrained, kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


_SIZES = {"tiny": dict(embed_dim=192, depth=24), "small": dict(embed_dim=384, depth=24),
          "base": dict(embed_dim=768, depth=24)}
# The scorer trunk DART pairs with each size (Tiny: MobileNetV3-small, Small/Base: MobileNetV3-large; head v2).
_DART_TRUNK = {"tiny": "mobilenetv3_small", "small": "mobilenetv3_large", "base": "mobilenetv3_large"}
register_family(ModelFamily("vim", tuple(_SIZES), grid="vim_{size}_patch16_224", dart="vim_{size}_dart"))


def _grid_model(size: str, pretrained: bool, kwargs: dict) -> VisionMamba:
    name, user_kwargs = f"vim_{size}_patch16_224", dict(kwargs)
    args = dict(patch_size=16, **_SIZES[size])
    return record_config(_create_vim(name, pretrained, **{**args, **kwargs}), name, user_kwargs)


def _dart_model(size: str, pretrained: bool, kwargs: dict, name: str | None = None) -> VisionMamba:
    """Vim-DART of ``size``, registered as ``name`` (default ``vim_<size>_dart``)."""
    name = name or f"vim_{size}_dart"
    kwargs = release_kwargs(name, pretrained, kwargs, _RELEASES)
    user_kwargs = dict(kwargs)
    options = tokenizer_options(kwargs.pop("tokenizer_cfg", None), kwargs.pop("dart_cfg", None))
    tokenizer_cfg = registered_tokenizer_cfg(kwargs.get("tokenizer", "dart"),
                                             {"trunk": _DART_TRUNK[size], "head": "v2"}, options,
                                             kwargs.get("img_size", 448), pretrained)
    args = dict(img_size=448, patch_size=16, tokenizer="dart", **_SIZES[size])
    model = _create_vim(name, pretrained, tokenizer_cfg=tokenizer_cfg, **{**args, **kwargs})
    return record_config(model, name, user_kwargs)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Tiny, fixed 16x16 grid (D=192, depth 24, ~7.1 M params)."""
    return _grid_model("tiny", pretrained, kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Small, fixed 16x16 grid (D=384, depth 24, ~25.8 M params)."""
    return _grid_model("small", pretrained, kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Base, fixed 16x16 grid (D=768, depth 24, ~97.6 M params)."""
    return _grid_model("base", pretrained, kwargs)


@register_model
def vim_tiny_dart(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Tiny with DART (448 input, 196 tokens by default; MobileNetV3-small scorer, head v2)."""
    return _dart_model("tiny", pretrained, kwargs)


@register_model
def vim_small_dart(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Small with DART (448 input, 196 tokens by default; MobileNetV3-large scorer, head v2)."""
    return _dart_model("small", pretrained, kwargs)


@register_model
def vim_base_dart(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Base with DART (448 input, 196 tokens by default; MobileNetV3-large scorer, head v2)."""
    return _dart_model("base", pretrained, kwargs)
