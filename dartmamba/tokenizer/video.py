"""Video tokenizers: VideoMamba's fixed spatiotemporal grid, and DART over the stack of frames.

Video DART (the authors' ``video/video_patch_embed.py`` in ykx3/DART) is image DART run on one tall image, the T
frames stacked on top of each other (T * H x W), with scores that follow motion. The stages, each a pure function
or a small module, and the image code they reuse:

==================================  ===================================================  ===========================
stage                               shape                                                code
==================================  ===================================================  ===========================
per-frame trunk features            (B, C, T, H, W) -> (B, T, C', h, w)                  :meth:`VideoScorer.features`
content / motion strength           -> (B, T, h, w) (authors: (B, T - 1, h, w))          :class:`SpatiotemporalHead`
scores over the frame stack         -> (B, T * Gh, Gw) (authors: frame 0 a constant)     :func:`video_scores`
geometry over the frame stack       R = int(sqrt(N / T) * T) bands, N token edges        :func:`~.partition.partition`
patches                             (B, C, T * H, W) -> (B, N, C, p, p)                  :func:`~.resample.resample_patches`
embedding + positions               Conv3d(C, D, (1, p, p)) as one GEMM; spatial (repeated over T) + temporal (repeated
                                    over cells) embeddings re-binned with the geometry   :func:`~.posembed.resample_pos_embed`
==================================  ===================================================  ===========================

So a region that moves gets more tokens in the frames it moves through and what never changes gets few; the backend
dispatch of the image stages (the Triton kernels on CUDA where they take the shapes, torch otherwise) applies
unchanged. Bands are cut over the whole stack, so a band (and a token in it) may straddle two frames, as in the
authors' code.

Two ways to score (``score_mode``), on the per-frame features of a frozen MobileNetV3-small cut at stride 16
(torchvision ``features[:8]``, 48 channels, 14 x 14 at 224; or the trainable ``tiny_cnn``):

- ``"content"`` (the default for new models, :class:`SpatiotemporalHead`): every frame, frame 0 included, is scored
  from its own content on one scale: its motion against each neighbouring frame (frame 0 against frame 1),
  ``mean_n sum_c ReLU(motion(f_t - f_n))_c * g_c``, plus a learned share of spatial detail ``sum_c f_t,c * g_c``
  (its weight starts at 0), ``g = sigmoid(gate(mean f))`` over all frames; standardised over the whole video, then
  ``sigmoid((s - 1) * 1.5)``. A static region scores the same in every frame, so tokens follow what moves.
- ``"authors"`` (:class:`TemporalDifferenceHead`, exactly the authors' formula, for their checkpoints):
  ``d_t = f_t - f_{t-1}`` for t = 1 .. T-1; strength ``sum_c ReLU(motion(d_t))_c * sigmoid(gate(mean f))_c`` (the
  mean over frames 1 .. T-1 and all cells); standardised over the whole video (per sample), then
  ``sigmoid((s - 1) * 1.5)``; frame 0 gets a constant 0.5. With few frames the constant draws the tokens to frame 0
  (docs/video.md measures it).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .base import Tokenizer, Tokens, register_tokenizer
from .dart import DartTokenizer, embed_patches
from .dense import token_cell_areas, tokens_to_map
from .geometry import DartGeometry
from .partition import partition
from .posembed import resample_pos_embed
from .resample import SAMPLING_MODES, resample_patches
from .scorer import DartScorer, standardise_scores
from .validation import as_pair, autocast_enabled, check_token_counts

__all__ = ["VideoGridTokenizer", "VideoDartTokenizer", "VideoDartTokens", "VideoScorer", "TemporalDifferenceHead",
           "SpatiotemporalHead", "SCORE_MODES", "resolve_score_mode", "stack_frames", "unstack_frames",
           "video_num_rows", "spatiotemporal_pos_embed", "video_scores", "tokens_per_frame", "check_video"]

VIDEO_TRUNK = "mobilenetv3_small_s16"     # the authors' trunk: torchvision mobilenet_v3_small features[:8]
# The authors' scorer holds torchvision ``features[:11]`` but scores from ``features[:8]``; the rest is computed and
# discarded. Their checkpoints therefore carry these trunk stages, which nothing here reads.
_OFFICIAL_UNUSED_STAGES = (8, 9, 10)
_OFFICIAL_SCORER = "score_backbone.features."
_OFFICIAL_HEAD = {"score_head1.": "scorer.head.motion.", "score_head2.": "scorer.head.gate."}
SCORE_MODES = ("content", "authors")
_AUTHORS_FIRST_FRAME_SCORE = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Pure stages
# ----------------------------------------------------------------------------------------------------------------
def check_video(video, in_chans: int, num_frames: int, img_size: tuple[int, int]) -> None:
    """video: (B, C, T, H, W) floating point with the configured C, T, H, W and B >= 1."""
    expected = f"(B, {in_chans}, {num_frames}, {img_size[0]}, {img_size[1]})"
    if not isinstance(video, Tensor):
        raise TypeError(f"video must be a torch.Tensor of shape (B, C, T, H, W), got {type(video).__name__}")
    if not video.is_floating_point():
        raise TypeError(f"video must be a floating-point tensor (float32/float16/bfloat16/float64), got dtype "
                        f"{video.dtype}; convert with video.float() / 255")
    if video.dim() != 5:
        raise ValueError(f"video must have shape (B, C, T, H, W) {expected}, got {tuple(video.shape)}")
    if video.shape[0] == 0:
        raise ValueError("video is an empty batch (B = 0); expected at least one clip")
    if tuple(video.shape[1:]) != (in_chans, num_frames, *img_size):
        raise ValueError(f"video must have shape {expected} (B, C, T, H, W), got {tuple(video.shape)}")


def stack_frames(video: Tensor) -> Tensor:
    """The frames on top of each other: (B, C, T, H, W) -> (B, C, T * H, W) (frame t holds rows t*H .. t*H+H-1)."""
    return rearrange(video, "b c t h w -> b c (t h) w")


def unstack_frames(tall: Tensor, num_frames: int) -> Tensor:
    """Inverse of :func:`stack_frames` on the last two axes: (..., T * h, w) -> (..., T, h, w)."""
    return tall.unflatten(-2, (num_frames, tall.shape[-2] // num_frames))


def video_num_rows(num_tokens: int, num_frames: int) -> int:
    """R = int(sqrt(N / T) * T) bands over the frame stack (the authors' rule: sqrt(N / T) rows per frame), at most
    N. 1568 tokens over 8 frames -> 112 (14 per frame)."""
    return max(1, min(num_tokens, int(math.sqrt(num_tokens / num_frames) * num_frames)))


def spatiotemporal_pos_embed(spatial: Tensor, temporal: Tensor) -> Tensor:
    """Every (frame, cell) position's embedding: spatial[cell] + temporal[frame], frame-major (the raster order of
    the frame stack and of a (T, h, w) patch grid).

    (1 or B, G, D), (1 or B, T, D) -> (1 or B, T * G, D).
    """
    if spatial.dim() != 3 or temporal.dim() != 3 or spatial.shape[-1] != temporal.shape[-1]:
        raise ValueError(f"spatial and temporal embeddings must be (1 or B, G, D) and (1 or B, T, D) with the same D, "
                         f"got {tuple(spatial.shape)} and {tuple(temporal.shape)}")
    return (temporal[:, :, None, :] + spatial[:, None, :, :]).flatten(1, 2)


def video_scores(strength: Tensor, score_norm: str = "sample", first_frame_score: float | None = 0.5) -> Tensor:
    """Strengths -> positive scores over the frame stack, all frames standardised together, then squashed with
    ``sigmoid((s - 1) * 1.5)`` (the authors' squash).

    Args:
        strength: with ``first_frame_score`` a number (the authors'): (B, T - 1, Gh, Gw), the raw strength of frames
            1 .. T-1 (T - 1 may be 0: a single frame); with ``first_frame_score=None`` (content scoring):
            (B, T, Gh, Gw), every frame's.
        score_norm: ``"sample"`` (one mean / std per video, the authors') or ``"batch"`` (one over the batch).
        first_frame_score: the constant score of frame 0, which has no previous frame (authors: 0.5), or ``None``.

    Returns:
        (B, T * Gh, Gw).
    """
    batch, frames, grid_h, grid_w = strength.shape
    squashed = (torch.sigmoid((standardise_scores(strength.reshape(batch, frames * grid_h, grid_w), score_norm)
                               - 1.0) * 1.5) if frames else strength.new_zeros(batch, 0, grid_w))
    if first_frame_score is None:
        return squashed
    first = strength.new_full((batch, grid_h, grid_w), float(first_frame_score))
    return torch.cat([first, squashed], dim=1)


def tokens_per_frame(geometry: DartGeometry, num_frames: int) -> Tensor:
    """How many tokens each frame of the stack holds, counting a token that straddles frames by its area share.

    (B, N) tokens over T frames -> (B, T), each row summing to N.
    """
    areas = token_cell_areas(geometry, (num_frames, 1))[..., 0]                      # (B, N, T)
    return (areas / areas.sum(dim=2, keepdim=True)).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Scorer
# ----------------------------------------------------------------------------------------------------------------
class TemporalDifferenceHead(nn.Module):
    """Motion strength from per-frame features: ``sum_c ReLU(motion(f_t - f_{t-1}))_c * sigmoid(gate(mean f))_c``.

    (B, T, C, h, w) -> (B, T - 1, h, w). The gate reads the mean of frames 1 .. T-1 over all cells (the authors').
    Names: ``motion`` / ``gate`` (theirs: ``score_head1`` / ``score_head2``).
    """

    def __init__(self, chans: int, device=None, dtype=None):
        super().__init__()
        self.motion = nn.Linear(chans, chans, device=device, dtype=dtype)
        self.gate = nn.Linear(chans, chans, device=device, dtype=dtype)

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[1] < 2:
            return features.new_zeros(features.shape[0], 0, *features.shape[-2:])
        moving = features[:, 1:].movedim(2, -1)                                      # (B, T-1, h, w, C)
        difference = moving - features[:, :-1].movedim(2, -1)
        gate = torch.sigmoid(self.gate(moving.mean(dim=(1, 2, 3))))                  # (B, C)
        return torch.einsum("bthwc,bc->bthw", F.relu(self.motion(difference)), gate)


class SpatiotemporalHead(nn.Module):
    """Every frame's strength from its own content, on one scale: motion against its neighbours plus spatial detail.

    (B, T, C, h, w) -> (B, T, h, w)::

        motion_t = mean over n in {t - 1, t + 1} (those that exist) of sum_c ReLU(motion(f_t - f_n))_c * g_c
        detail_t = sum_c f_t,c * g_c
        strength_t = motion_t + detail_weight * detail_t,       g = sigmoid(gate(mean of f over frames and cells))

    Frame 0 is measured against frame 1 and the last frame against the one before, so a region that never changes
    scores alike in every frame and one frame cannot collect the tokens by position alone. ``detail_weight`` starts
    at 0 (at initialisation tokens follow motion; training decides how much static detail is worth), and a
    single-frame clip scores by detail only. Parameters: ``motion`` and ``gate`` as :class:`TemporalDifferenceHead`
    (C -> C each), ``detail_weight`` (shape (1,)).
    """

    def __init__(self, chans: int, device=None, dtype=None):
        super().__init__()
        self.motion = nn.Linear(chans, chans, device=device, dtype=dtype)
        self.gate = nn.Linear(chans, chans, device=device, dtype=dtype)
        # shape (1,), not (): DeepSpeed's parameter broadcast views every parameter as bytes; a 0-d tensor refuses
        self.detail_weight = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, features: Tensor) -> Tensor:
        frames = features.movedim(2, -1)                                             # (B, T, h, w, C)
        gate = torch.sigmoid(self.gate(frames.mean(dim=(1, 2, 3))))[:, None, None, None]   # (B, 1, 1, 1, C)
        strength = self.detail_weight * (frames * gate).sum(-1)                      # (B, T, h, w)
        if frames.shape[1] < 2:
            return strength
        # motion(f_t - f_n) = W (f_t - f_n) + b: the previous neighbour's term uses W d_t, the next one's -W d_{t+1}
        change = F.linear(frames[:, 1:] - frames[:, :-1], self.motion.weight)         # W d_t, t = 1 .. T-1
        after = (F.relu(change + self.motion.bias) * gate).sum(-1)                   # frames 1 .. T-1 vs previous
        before = (F.relu(self.motion.bias - change) * gate).sum(-1)                  # frames 0 .. T-2 vs next
        pad = after.new_zeros(after[:, :1].shape)
        neighbours = torch.full((frames.shape[1],), 2.0, device=after.device, dtype=after.dtype)
        neighbours[0] = neighbours[-1] = 1.0
        motion = (torch.cat([pad, after], 1) + torch.cat([before, pad], 1)) / neighbours[:, None, None]
        return strength + motion


def resolve_score_mode(score_mode: str | None, first_frame_score) -> tuple[str, float | None]:
    """-> (score mode, first-frame constant or None). ``score_mode=None`` means ``"authors"`` when a
    ``first_frame_score`` is given (configs saved before content scoring existed recorded one) and ``"content"``
    otherwise."""
    if score_mode is None:
        score_mode = "content" if first_frame_score is None else "authors"
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    if score_mode == "content":
        if first_frame_score is not None:
            raise ValueError(f"first_frame_score: score_mode='content' scores frame 0 from its content; a constant "
                             f"first-frame score ({first_frame_score!r}) belongs to score_mode='authors'")
        return score_mode, None
    if first_frame_score is None:
        first_frame_score = _AUTHORS_FIRST_FRAME_SCORE
    if isinstance(first_frame_score, bool) or not isinstance(first_frame_score, (int, float)) \
            or not first_frame_score > 0:
        raise ValueError(f"first_frame_score must be a number > 0, got {first_frame_score!r}")
    return score_mode, float(first_frame_score)


class VideoScorer(DartScorer):
    """Video (B, C, T, H, W) -> positive scores over the frame stack (B, T * Gh, Gw).

    The image scorer's trunk handling (frozen trunks in eval mode under ``no_grad``, skipped by ``init_weights``;
    ``input_size``, ``channels_last``, ``trunk_dtype``) on every frame, with a video head and :func:`video_scores`
    instead of an image head: :class:`SpatiotemporalHead` for ``score_mode="content"`` (the default),
    :class:`TemporalDifferenceHead` and the constant ``first_frame_score`` (default 0.5) for ``"authors"``; see
    :func:`resolve_score_mode`. Strengths are resized to the ``grid_size`` (Gh, Gw) per frame (bilinear, before
    standardisation) when the trunk's grid differs.
    """

    def __init__(self, grid_size: tuple[int, int], trunk: str = VIDEO_TRUNK, score_norm: str = "sample",
                 input_size=None, in_chans: int = 3, trunk_weights: str | None = None,
                 first_frame_score: float | None = None, channels_last: bool = False, trunk_dtype=None,
                 trunk_bn_eps: float | None = None, score_mode: str | None = None, device=None, dtype=None):
        score_mode, first_frame_score = resolve_score_mode(score_mode, first_frame_score)
        super().__init__(grid_size, trunk=trunk, head=score_mode, score_norm=score_norm, input_size=input_size,
                         in_chans=in_chans, trunk_weights=trunk_weights, channels_last=channels_last,
                         trunk_dtype=trunk_dtype, trunk_bn_eps=trunk_bn_eps, device=device, dtype=dtype)
        self.score_mode, self.first_frame_score = score_mode, first_frame_score

    @staticmethod
    def check_head(head: str) -> None:
        if head not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {head!r}")

    @staticmethod
    def build_head(head: str, chans: int, hidden: int, device=None, dtype=None) -> nn.Module:
        head_class = SpatiotemporalHead if head == "content" else TemporalDifferenceHead
        return head_class(chans, device=device, dtype=dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if isinstance(self.head, SpatiotemporalHead):
            self.head.detail_weight.zero_()

    def features(self, video: Tensor) -> Tensor:
        """Per-frame trunk features. (B, C, T, H, W) -> (B, T, C', h, w)."""
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        return rearrange(self.trunk_features(frames), "(b t) c h w -> b t c h w", b=video.shape[0])

    def raw_scores(self, video: Tensor) -> Tensor:
        """Strength on the score grid: (B, C, T, H, W) -> (B, T, Gh, Gw) (content) or (B, T - 1, Gh, Gw), the
        motion of frames 1 .. T-1 (authors)."""
        strength = self.head(self.features(video))
        if strength.shape[1] and tuple(strength.shape[-2:]) != self.grid_size:
            strength = F.interpolate(strength, size=self.grid_size, mode="bilinear", align_corners=False)
        return strength

    def forward(self, video: Tensor) -> Tensor:
        return video_scores(self.raw_scores(video).float(), self.score_norm, self.first_frame_score)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------
@register_tokenizer("video_grid")
class VideoGridTokenizer(nn.Module, Tokenizer):
    """VideoMamba's patch embedding: Conv3d(C, D, (kt, p, p), stride (kt, p, p)) -> (T / kt) x (H / p) x (W / p)
    tokens in (t, h, w) raster order; each token's positional embedding is the grid's (spatial + temporal) as given.

    Args:
        img_size, patch_size: frame size (H, W) and patch side p.
        num_frames: T; ``tubelet_size``: kt (VideoMamba's ``kernel_size``; 1 for every released checkpoint).
        in_chans, embed_dim, bias, device, dtype: the Conv3d.
        num_tokens, grid_size: accepted for the interface; they must equal the grid's (or be None).
    """

    output_key = None

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 num_tokens: int | None = None, grid_size=None, bias: bool = True, num_frames: int = 8,
                 tubelet_size: int = 1, device=None, dtype=None):
        super().__init__()
        self.img_size = as_pair(img_size, "img_size")
        self.patch_size = as_pair(patch_size, "patch_size")
        for name, value in (("num_frames", num_frames), ("tubelet_size", tubelet_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames={num_frames} must be a multiple of tubelet_size={tubelet_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        self.num_frames, self.tubelet_size, self.in_chans, self.embed_dim = num_frames, tubelet_size, in_chans, embed_dim
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.feature_grid = (num_frames // tubelet_size, *self.grid_size)
        self.num_patches = self.num_tokens = math.prod(self.feature_grid)
        if num_tokens is not None and num_tokens != self.num_tokens:
            raise ValueError(f"num_tokens: a fixed {'x'.join(map(str, self.feature_grid))} spatiotemporal grid has "
                             f"{self.num_tokens} tokens, got {num_tokens!r} (change img_size, patch_size or "
                             f"num_frames instead)")
        if grid_size is not None and as_pair(grid_size, "grid_size") != self.grid_size:
            raise ValueError(f"grid_size: the fixed grid is {self.grid_size} per frame (img_size / patch_size), "
                             f"got {grid_size!r}")
        kernel = (tubelet_size, *self.patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel, stride=kernel, bias=bias, device=device, dtype=dtype)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def init_weights(self) -> None:
        self.proj.reset_parameters()        # PyTorch's Conv3d default, as VideoMamba leaves it

    def forward(self, video: Tensor, grid_pos_embed: Tensor | None = None) -> Tokens:
        """video (B, C, T, H, W) -> :class:`Tokens` with tokens (B, N, D) and pos_embed = ``grid_pos_embed``
        (1 or B, N, D) as given."""
        check_video(video, self.in_chans, self.num_frames, self.img_size)
        return Tokens(rearrange(self.proj(video), "b d t h w -> b (t h w) d"), grid_pos_embed, None)

    def to_feature_map(self, tokens: Tensor, output: Tokens) -> Tensor:
        """(B, N, D) -> (B, D, T / kt, h, w): a reshape."""
        return rearrange(tokens, "b (t h w) d -> b d t h w", t=self.feature_grid[0], h=self.feature_grid[1])

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, patch_size={self.patch_size}, num_frames={self.num_frames}, "
                f"tubelet_size={self.tubelet_size}, feature_grid={self.feature_grid}")


class VideoDartTokens(Tokens):
    """What :class:`VideoDartTokenizer` returns: a :class:`~dartmamba.tokenizer.Tokens` with every field set.

    tokens: (B, N, D) embedded patches in the raster order of the frame stack.
    pos_embed: (B, N, D) per-sample positional embeddings, or ``None`` when no grid embedding was given.
    geometry: the partition of the frame stack (grid (T * Gh, Gw), image (T * H, W)).
    scores: (B, T, Gh, Gw) the scores the partition was cut from.
    """

    __slots__ = ()


@register_tokenizer("video_dart")
class VideoDartTokenizer(nn.Module, Tokenizer):
    """DART over the frame stack (see the module docstring).

    Args:
        img_size: frame size (H, W) (VideoMamba / the authors: 224).
        patch_size: p, side of every resampled patch (16).
        num_frames: T.
        grid_size: (Gh, Gw) score cells per frame, default ``img_size / patch_size`` (14 at 224 / 16: one cell per
            VideoMamba patch); the positional grid is the same.
        num_tokens: N over the whole clip, default T * Gh * Gw (the fixed grid's count).
        num_rows: R bands over the stack, default :func:`video_num_rows` (``int(sqrt(N / T) * T)``).
        in_chans, embed_dim, bias: the patch embedding Conv3d(C, D, (1, p, p)) (VideoMamba's layout).
        trunk, score_norm, scorer_input_size, trunk_weights, scorer_channels_last, scorer_dtype, trunk_bn_eps: see
            :class:`VideoScorer` / :class:`~dartmamba.tokenizer.DartScorer` (trunk default ``mobilenetv3_small_s16``,
            frozen; ``tiny_cnn`` is a trainable stand-in for small clips).
        score_mode: ``"content"`` (every frame scored from its content, :class:`SpatiotemporalHead`; the default)
            or ``"authors"`` (their formula: frame 0 at the constant ``first_frame_score``, for their checkpoints);
            ``None``: ``"authors"`` when ``first_frame_score`` is given, else ``"content"``.
        first_frame_score: the constant score of frame 0 with ``score_mode="authors"`` (default 0.5).
        sampling: ``"paper"`` or ``"center"`` (see :mod:`~dartmamba.tokenizer.resample`).
        resample_backend, partition_backend, posembed_backend: as :class:`~dartmamba.tokenizer.DartTokenizer`.
        uniform_scores: ignore the scorer, constant scores (with N = T * Gh * Gw: the fixed grid, resampled).
        device, dtype: where and in which dtype the parameters are created.
    """

    output_key = "dart"

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 num_tokens: int | None = None, grid_size=None, bias: bool = True, num_frames: int = 8,
                 num_rows: int | None = None, trunk: str = VIDEO_TRUNK, score_norm: str = "sample",
                 scorer_input_size=None, trunk_weights: str | None = None,
                 first_frame_score: float | None = None, sampling: str = "paper", resample_backend: str | None = None,
                 partition_backend: str | None = None, posembed_backend: str | None = None,
                 uniform_scores: bool = False, scorer_channels_last: bool = False, scorer_dtype=None,
                 trunk_bn_eps: float | None = None, score_mode: str | None = None, device=None, dtype=None):
        super().__init__()
        self.img_size = as_pair(img_size, "img_size")
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.patch_size, self.num_frames, self.sampling = patch_size, num_frames, sampling
        self.grid_size = ((self.img_size[0] // patch_size, self.img_size[1] // patch_size) if grid_size is None
                          else as_pair(grid_size, "grid_size"))
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than one patch of {patch_size}")
        self.feature_grid = (num_frames, *self.grid_size)
        self.num_patches = math.prod(self.feature_grid)
        if num_tokens is None:
            num_tokens = self.num_patches
        check_token_counts(num_tokens, 1)
        self.num_rows = video_num_rows(num_tokens, num_frames) if num_rows is None else num_rows
        check_token_counts(num_tokens, self.num_rows)
        self.num_tokens = num_tokens
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.resample_backend, self.partition_backend = resample_backend, partition_backend
        self.posembed_backend, self.uniform_scores = posembed_backend, uniform_scores
        self.scorer = VideoScorer(self.grid_size, trunk=trunk, score_norm=score_norm,
                                  input_size=scorer_input_size, in_chans=in_chans, trunk_weights=trunk_weights,
                                  first_frame_score=first_frame_score, channels_last=scorer_channels_last,
                                  trunk_dtype=scorer_dtype, trunk_bn_eps=trunk_bn_eps, score_mode=score_mode,
                                  device=device, dtype=dtype)
        self.proj = nn.Conv3d(in_chans, embed_dim, (1, patch_size, patch_size), stride=(1, patch_size, patch_size),
                              bias=bias, device=device, dtype=dtype)

    # -- the interface ----------------------------------------------------------------------------------------
    @property
    def stack_size(self) -> tuple[int, int]:
        """(T * H, W): the tall image the geometry lives on."""
        return self.num_frames * self.img_size[0], self.img_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        """Pixels per score cell: the stride of the (T, Gh, Gw) maps tokens are scattered onto."""
        ratio = (self.img_size[0] // self.grid_size[0], self.img_size[1] // self.grid_size[1])
        return max(ratio) if as_scalar else ratio

    def to_feature_map(self, tokens: Tensor, output: VideoDartTokens) -> Tensor:
        """Token features (B, N, D) scattered onto every frame's score grid by area: (B, D, T, Gh, Gw)."""
        tall = tokens_to_map(tokens, output.geometry, (self.num_frames * self.grid_size[0], self.grid_size[1]))
        return unstack_frames(tall, self.num_frames)

    # the same parts and formulas as image DART, here on the frame stack (self has the attributes they read)
    flop_parts = DartTokenizer.flop_parts

    def convert_official_state_dict(self, state_dict: dict, prefix: str, source: str) -> dict:
        """The authors' DART-video names -> ours: ``<prefix>score_backbone.features.*`` (torchvision MobileNetV3
        ``features[:11]``) -> ``<prefix>scorer.trunk.*`` (the stages this trunk has; ``features.8-10``, which their
        forward computes and discards, are dropped), ``score_head1`` / ``score_head2`` -> ``scorer.head.motion`` /
        ``scorer.head.gate``; the rest (``<prefix>proj``, the backbone) passes through."""
        theirs = [k for k in state_dict if any(k.startswith(prefix + name) for name in _OFFICIAL_HEAD)]
        if theirs and self.scorer.score_mode != "authors":
            raise ValueError(f"{source}: its scorer head ({theirs[0]}) is the authors' DART-video head, which computes "
                             f"their formula; this model scores with score_mode={self.scorer.score_mode!r}. Build it "
                             f"with tokenizer_cfg={{'score_mode': 'authors'}} to load this checkpoint")
        official = prefix + _OFFICIAL_SCORER
        converted, trunk_state = {}, {}
        for key, value in state_dict.items():
            if key.startswith(official):
                rest = key[len(official):]
                stage = int(rest.split(".", 1)[0])
                if self.scorer.trunk_name == VIDEO_TRUNK and stage in _OFFICIAL_UNUSED_STAGES:
                    continue
                trunk_state[rest] = value
                continue
            for theirs, ours in _OFFICIAL_HEAD.items():
                if key.startswith(prefix + theirs):
                    converted[prefix + ours + key[len(prefix + theirs):]] = value
                    break
            else:
                converted[key] = value
        if trunk_state:
            converted.update(self.scorer.trunk.rename_torchvision(trunk_state, f"{prefix}scorer.trunk.",
                                                                  f"{source} (scorer trunk)"))
        return converted

    def adopt_official_settings(self, loaded: list[str], prefix: str) -> None:
        """torchvision's BatchNorm eps (1e-3) in a trunk loaded from the checkpoint; the authors standardise per
        video, which is already the default."""
        trunk = self.scorer.trunk
        if hasattr(trunk, "set_bn_eps") and any(k.startswith(f"{prefix}scorer.trunk.") for k in loaded):
            trunk.set_bn_eps(1e-3)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise the trainable parts (scorer head, patch projection); a frozen trunk is left alone."""
        self.scorer.init_weights()
        self.proj.reset_parameters()

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, patch_size={self.patch_size}, num_frames={self.num_frames}, "
                f"grid_size={self.grid_size}, num_tokens={self.num_tokens}, num_rows={self.num_rows}, "
                f"sampling={self.sampling!r}, score_mode={self.scorer.score_mode!r}")

    # -- the stages ---------------------------------------------------------------------------------------------
    def scores(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, T * Gh, Gw) positive scores over the frame stack."""
        if self.uniform_scores:
            return video.new_ones(video.shape[0], self.num_frames * self.grid_size[0], self.grid_size[1],
                                  dtype=torch.float32)
        return self.scorer(video)

    def geometry(self, video: Tensor, scores: Tensor | None = None) -> DartGeometry:
        """The partition of the frame stack, from the scorer or from ``scores`` (B, T, Gh, Gw) (then validated)."""
        return self._scores_and_geometry(video, scores)[1]

    def _scores_and_geometry(self, video: Tensor, scores: Tensor | None) -> tuple[Tensor, DartGeometry]:
        """-> (scores over the stack (B, T * Gh, Gw), their partition)."""
        given = scores is not None
        tall_scores = self._check_scores(scores) if given else self.scores(video)
        geometry = partition(tall_scores, self.num_tokens, self.num_rows, img_size=self.stack_size, validate=given,
                             backend=self.partition_backend)
        return tall_scores, geometry

    def _check_scores(self, scores: Tensor) -> Tensor:
        expected = (self.num_frames, *self.grid_size)
        if not isinstance(scores, Tensor) or scores.dim() != 4 or tuple(scores.shape[1:]) != expected:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scores must have shape (B, {', '.join(map(str, expected))}) (B, T, Gh, Gw), "
                             f"got {shape}")
        return scores.flatten(1, 2)

    def forward(self, video: Tensor, grid_pos_embed: Tensor | None = None,
                scores: Tensor | None = None) -> VideoDartTokens:
        """
        Args:
            video: (B, C, T, H, W) floating point.
            grid_pos_embed: optional (1 or B, T * Gh * Gw, D) embeddings of every (frame, cell), frame-major
                (:func:`spatiotemporal_pos_embed`).
            scores: optional (B, T, Gh, Gw) positive scores that replace the scorer's.

        Returns:
            :class:`VideoDartTokens`: tokens (B, N, D), pos_embed (B, N, D) or None, geometry, scores (B, T, Gh, Gw).
        """
        check_video(video, self.in_chans, self.num_frames, self.img_size)
        tall_scores, geometry = self._scores_and_geometry(video, scores)
        patches = resample_patches(stack_frames(video), geometry, self.patch_size, self.sampling,
                                   self.resample_backend)
        if not autocast_enabled(video.device.type):
            patches = patches.to(self.proj.weight.dtype)
        tokens = embed_patches(patches, self.proj.weight, self.proj.bias)
        pos = (None if grid_pos_embed is None
               else resample_pos_embed(grid_pos_embed, geometry, backend=self.posembed_backend))
        return VideoDartTokens(tokens, pos, geometry, unstack_frames(tall_scores, self.num_frames))
