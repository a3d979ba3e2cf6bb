"""The fixed patch grid behind the tokenizer interface: timm's ``PatchEmbed`` (Conv2d(C, D, p, stride p))."""
from __future__ import annotations

from timm.layers import PatchEmbed, register_notrace_function
from torch import Tensor

from .base import Tokenizer, Tokens, register_tokenizer
from .validation import as_pair, check_device


@register_notrace_function       # torch.fx: a leaf (it reads the input's device and dtype)
def prepare_images(images: Tensor, weight: Tensor) -> Tensor:
    """The images on the weights' device (else an error naming both), floating ones cast to the weights' dtype."""
    check_device(images, weight.device)
    return images.to(weight.dtype) if images.is_floating_point() else images


@register_tokenizer("grid")
class GridTokenizer(PatchEmbed, Tokenizer):
    """(H / p) x (W / p) patches in raster order, each embedded by the same Conv2d; the positional embedding of a
    token is the grid embedding of its cell, as is. Parameter names are timm's (``proj.weight``, ``proj.bias``).

    Args:
        img_size, patch_size, in_chans, embed_dim, bias, device, dtype: as timm's ``PatchEmbed``.
        num_tokens, grid_size: accepted for the interface; they must equal the patch grid's (or be None).
        norm_layer, strict_img_size, dynamic_img_pad: ``PatchEmbed``'s options (its output stays (B, N, D)).
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 num_tokens: int | None = None, grid_size=None, bias: bool = True, norm_layer=None,
                 strict_img_size: bool = True, dynamic_img_pad: bool = False, device=None, dtype=None):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=bias,
                         norm_layer=norm_layer, strict_img_size=strict_img_size, dynamic_img_pad=dynamic_img_pad,
                         device=device, dtype=dtype)
        if num_tokens is not None and num_tokens != self.num_patches:
            raise ValueError(f"num_tokens: a fixed {self.grid_size[0]}x{self.grid_size[1]} grid has "
                             f"{self.num_patches} tokens, got {num_tokens!r} (change img_size or patch_size instead)")
        if grid_size is not None and as_pair(grid_size, "grid_size") != tuple(self.grid_size):
            raise ValueError(f"grid_size: the fixed grid is {tuple(self.grid_size)} (img_size / patch_size), "
                             f"got {grid_size!r}")
        self.in_chans = in_chans
        self.num_tokens = self.num_patches
        self.feature_grid = tuple(self.grid_size)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's ``PatchEmbed.set_input_size`` (a new patch size resamples the projection), interface kept in step."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self.num_tokens = self.num_patches
        self.feature_grid = tuple(self.grid_size)

    def forward(self, images: Tensor, grid_pos_embed: Tensor | None = None) -> Tokens:
        """images (B, C, H, W), any floating dtype (run in the weights' dtype) -> :class:`Tokens` with tokens
        (B, N, D) and pos_embed = ``grid_pos_embed`` (1 or B, N, D) as given."""
        return Tokens(super().forward(prepare_images(images, self.proj.weight)), grid_pos_embed, None)

    def to_feature_map(self, tokens: Tensor, output: Tokens) -> Tensor:
        """(B, N, D) -> (B, D, Gh, Gw): a reshape."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.feature_grid).contiguous()
