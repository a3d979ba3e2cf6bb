"""The interface every patch embedding implements, and the registry of tokenizer names the backbones read.

A backbone (Vim, DeiT, ...) takes its tokens from a *tokenizer*: images in, a fixed number of embedded tokens out,
each with its positional embedding. The backbone never asks which tokenizer it has; it uses only what
:class:`Tokenizer` defines:

- ``forward(images, grid_pos_embed=None) -> Tokens``: tokens (B, N, D), their positional embeddings (1 or B, N, D)
  built from the backbone's grid embeddings (1, num_patches, D), and optionally a geometry and scores;
- the attributes ``num_tokens`` (N, the tokens it emits), ``num_patches`` (how many grid positional embeddings it
  reads), ``grid_size`` (their grid), ``feature_grid`` (the grid of the maps ``features_only`` returns),
  ``img_size`` and ``in_chans`` (the input it takes), ``proj`` (its patch projection, if any) and, for video
  tokenizers only, ``num_frames``;
- :meth:`Tokenizer.feat_ratio` (the feature maps' stride), :meth:`Tokenizer.to_feature_map` (token features back
  onto ``feature_grid``, an NCHW map), :meth:`Tokenizer.set_input_size` (a new input resolution),
  :meth:`Tokenizer.init_weights`;
- :meth:`Tokenizer.flop_parts`: how the FLOP counter splits the tokenizer's share into parts;
- :meth:`Tokenizer.convert_official_state_dict` / :meth:`Tokenizer.adopt_official_settings`: what an official
  checkpoint needs (key renames under ``patch_embed.``, the settings it was trained with);
- ``output_key``: the key under which ``forward_intermediates(output_dict=True)`` returns the :class:`Tokens`
  (``None``: not returned).

Backbones build tokenizers by name (:func:`create_tokenizer`); :func:`register_tokenizer` adds a name, so a user's
own tokenizer plugs into every backbone: ``timm.create_model("vim_small_patch16_224", tokenizer="mine")``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Tokens", "Tokenizer", "register_tokenizer", "create_tokenizer", "tokenizer_names", "tokenizer_class"]


class Tokens(NamedTuple):
    """What a tokenizer returns (adaptive tokenizers return a subclass, e.g. DART's :class:`DartTokens`).

    tokens: (B, N, D) embedded patches, in the tokenizer's order.
    pos_embed: (1 or B, N, D) their positional embeddings, or ``None`` when no grid embedding was given.
    geometry: where each token came from (DART: a :class:`~dartmamba.tokenizer.DartGeometry`), or ``None``.
    scores: what an adaptive tokenizer cut its partition from (DART: (B, Gh, Gw), video DART: (B, T, Gh, Gw)), or
        ``None``.
    """

    tokens: Tensor
    pos_embed: Tensor | None
    geometry: Any = None
    scores: Tensor | None = None


class Tokenizer:
    """Mixin of the tokenizer interface (see the module docstring); subclasses are ``nn.Module`` s.

    Constructors take the backbone's ``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``num_tokens``
    (None: the tokenizer's default), ``grid_size`` (None: its default), ``bias``, ``device``, ``dtype`` (video
    backbones add ``num_frames``) and their own options as keywords. Every attribute below without a default must
    be set by the constructor (:func:`create_tokenizer` checks); the methods without a default raise
    NotImplementedError naming the class.
    """

    num_tokens: int
    """N, the tokens one forward emits (a fixed grid: its patch count). Backbones size their sequence with it."""
    num_patches: int
    """How many grid positional embeddings the tokenizer reads: the backbone's ``pos_embed`` holds this many (plus
    its class token's), whatever ``num_tokens`` is."""
    grid_size: tuple[int, int]
    """(Gh, Gw), the grid of those positional embeddings (per frame for video). ``set_input_size`` of a backbone
    resamples ``pos_embed`` from the old grid to the new one."""
    feature_grid: tuple[int, ...]
    """The grid of :meth:`to_feature_map`'s maps: (h, w), or (T', h, w) for video (VideoMamba checks the length)."""
    img_size: tuple[int, int]
    """(H, W) of the images (of every frame for video). The FLOP counter and the training data config build their
    input size from it."""
    in_chans: int
    """C, the input channels (the FLOP counter's input size)."""
    proj: "nn.Module"
    """The patch projection (Conv2d, Conv3d or Linear), if the tokenizer has one. The pretrained cfgs name
    ``patch_embed.proj`` their ``first_conv`` (timm adapts its input channels when a checkpoint's differ) and the
    image -> video checkpoint conversion inflates ``patch_embed.proj.weight``; a tokenizer without one only loses
    those two conveniences."""
    num_frames: int | None = None
    """Video tokenizers only: T, the frames of a clip (the FLOP counter and the data config then build
    (C, T, H, W) inputs). ``None`` for image tokenizers."""
    output_key: str | None = None
    """The key of the :class:`Tokens` in ``forward_intermediates(output_dict=True)``; ``None``: not returned."""

    def feat_ratio(self, as_scalar: bool = True):
        """Input pixels per ``feature_grid`` cell (the stride of the feature maps): an int, or (h, w) when
        ``as_scalar`` is False. Backbones put it in their ``feature_info``."""
        raise _missing(self, "feat_ratio")

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Take images of ``img_size`` from now on (and patches of ``patch_size``, where supported), updating
        ``img_size``, ``grid_size``, ``num_patches``, ``num_tokens`` and ``feature_grid``; the backbone's
        ``set_input_size`` (timm's) calls it and then resamples its positional embeddings to the new ``grid_size``."""
        raise _missing(self, "set_input_size")

    def to_feature_map(self, tokens: Tensor, output: Tokens) -> Tensor:
        """Features of the N tokens (B, N, D) (no prefix tokens) and this forward's output -> a map
        (B, D, *feature_grid): what ``forward_intermediates`` (NCHW) and ``features_only`` return."""
        raise _missing(self, "to_feature_map")

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


def _missing(tokenizer, member: str) -> NotImplementedError:
    return NotImplementedError(f"{type(tokenizer).__name__} does not implement Tokenizer.{member} "
                               f"(see dartmamba.tokenizer.Tokenizer)")


# what every tokenizer's constructor must set (the attributes of Tokenizer without a default)
REQUIRED_ATTRIBUTES = ("num_tokens", "num_patches", "grid_size", "feature_grid", "img_size", "in_chans")

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
    missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(built, name)]
    if missing:
        raise TypeError(f"tokenizer {tokenizer!r}: {type(built).__name__} does not set {', '.join(missing)} "
                        f"(every Tokenizer sets {', '.join(REQUIRED_ATTRIBUTES)}; see dartmamba.tokenizer.Tokenizer)")
    return built
