"""The interface every patch embedding implements, and the registry of tokenizer names the backbones read.

A backbone (Vim, DeiT, ...) takes its tokens from a *tokenizer*: images in, a fixed number of embedded tokens out,
each with its positional embedding. The backbone never asks which tokenizer it has; it uses only what
:class:`Tokenizer` defines:

- ``forward(images, grid_pos_embed=None) -> Tokens``: tokens (B, N, D), their positional embeddings (1 or B, N, D)
  built from the backbone's grid embeddings (1, num_patches, D), and an optional geometry;
- ``num_tokens`` (N, the tokens it emits), ``num_patches`` (how many grid positional embeddings it reads),
  ``feature_grid`` (the grid of the maps ``features_only`` returns) and :meth:`Tokenizer.feat_ratio` (its stride);
- :meth:`Tokenizer.to_feature_map`: token features back onto ``feature_grid`` (an NCHW map);
- :meth:`Tokenizer.flop_parts`: how the FLOP counter splits the tokenizer's share into parts;
- :meth:`Tokenizer.convert_official_state_dict` / :meth:`Tokenizer.adopt_official_settings`: what an official
  checkpoint needs (key renames under ``patch_embed.``, the settings it was trained with);
- ``output_key``: the key under which ``forward_intermediates(output_dict=True)`` returns the :class:`Tokens`
  (``None``: not returned).

Backbones build tokenizers by name (:func:`create_tokenizer`); :func:`register_tokenizer` adds a name, so a user's
own tokenizer plugs into every backbone: ``timm.create_model("vim_small_patch16_224", tokenizer="mine")``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import Tensor

__all__ = ["Tokens", "Tokenizer", "register_tokenizer", "create_tokenizer", "tokenizer_names", "tokenizer_class"]


class Tokens(NamedTuple):
    """What a tokenizer returns: tokens (B, N, D), pos_embed (1 or B, N, D) or None, geometry (or None)."""

    tokens: Tensor
    pos_embed: Tensor | None
    geometry: Any = None


class Tokenizer:
    """Mixin of the tokenizer interface (see the module docstring); subclasses are ``nn.Module`` s.

    Constructors take the backbone's ``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``num_tokens``
    (None: the tokenizer's default), ``grid_size`` (None: its default), ``bias``, ``device``, ``dtype`` and their
    own options as keywords.
    """

    num_tokens: int
    num_patches: int
    feature_grid: tuple[int, ...]
    output_key: str | None = None

    def feat_ratio(self, as_scalar: bool = True):
        """Input pixels per ``feature_grid`` cell (the stride of the feature maps)."""
        raise NotImplementedError

    def to_feature_map(self, tokens: Tensor, output: Tokens) -> Tensor:
        """Features of the N tokens (B, N, D) (no prefix tokens) -> a map (B, D, *feature_grid)."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """Re-initialise the trainable parts (frozen parts, such as a pretrained scorer trunk, are left alone)."""

    def flop_parts(self, call: tuple[tuple, dict], counted: Callable[..., int]) -> dict[str, int]:
        """Multiply-adds of one forward, by part of a :class:`~dartmamba.flops.FlopReport`.

        Args:
            call: the (args, kwargs) of the forward that was counted (fake tensors: shapes only).
            counted: ``counted(submodule=None, part=None)`` -> the multiply-adds the ops inside this tokenizer (or
                its ``submodule``, a dotted path) performed, only those whose formula is tagged ``part`` if given.

        Returns:
            {part: multiply-adds}; parts this tokenizer does not have are left out. The default: all of it is
            ``"embed"``.
        """
        return {"embed": counted()}

    def convert_official_state_dict(self, state_dict: dict, prefix: str, source: str) -> dict:
        """Rename an official checkpoint's tensors under ``prefix`` (``"patch_embed."``) to this tokenizer's names;
        the rest passes through. The default renames nothing."""
        return state_dict

    def adopt_official_settings(self, loaded: list[str], prefix: str) -> None:
        """Switch to the settings an official checkpoint was trained with, once its tensors (``loaded``: the keys
        that were loaded, with ``prefix``) are in. The default changes nothing."""


_TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {}


def register_tokenizer(name: str, factory: Callable[..., Tokenizer] | None = None):
    """Register ``factory`` (a :class:`Tokenizer` class, or a callable taking the constructor keywords) as
    ``name``; usable as a class decorator (``@register_tokenizer("mine")``)."""
    def add(factory):
        _TOKENIZERS[name] = factory
        return factory

    return add if factory is None else add(factory)


def tokenizer_names() -> list[str]:
    return sorted(_TOKENIZERS)


def tokenizer_class(name: str) -> Callable[..., Tokenizer]:
    if name not in _TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {tokenizer_names()} (or a Tokenizer class), got {name!r}")
    return _TOKENIZERS[name]


def create_tokenizer(tokenizer, **kwargs) -> Tokenizer:
    """Build a tokenizer from a registered name or a factory (a class), with the backbone's keywords."""
    factory = tokenizer_class(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not callable(factory):
        raise TypeError(f"tokenizer must be a registered name ({tokenizer_names()}) or a Tokenizer class, "
                        f"got {tokenizer!r}")
    built = factory(**kwargs)
    if not isinstance(built, Tokenizer):
        raise TypeError(f"tokenizer {tokenizer!r} built a {type(built).__name__}, which does not implement "
                        f"dartmamba.tokenizer.Tokenizer")
    return built
