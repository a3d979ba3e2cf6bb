"""The DART tokenizer module: score -> partition -> resample -> embed (+ positional embeddings)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .geometry import DartGeometry
from .partition import default_num_rows, partition
from .posembed import resample_pos_embed
from .resample import SAMPLING_MODES, resample_patches
from .scorer import DartScorer
from .validation import as_pair, check_images, check_token_counts


class DartTokens(NamedTuple):
    """What :class:`DartTokenizer` returns.

    tokens: (B, N, D) embedded patches in raster (DART) order.
    pos_embed: (B, N, D) per-sample positional embeddings, or ``None`` when no grid embedding was given.
    geometry: the partition (bands, token edges, sizes).
    scores: (B, Gh, Gw) the scores the partition was cut from.
    """

    tokens: Tensor
    pos_embed: Tensor | None
    geometry: DartGeometry
    scores: Tensor


def embed_patches(patches: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Conv2d(C, D, p, stride p) on p x p patches, as one GEMM. (B, N, C, p, p) -> (B, N, D)."""
    return F.linear(patches.flatten(2), weight.flatten(1), bias)


class DartTokenizer(nn.Module):
    """Differentiable Dynamic Adaptive Region Tokenizer.

    Args:
        img_size: input H, W (paper: 448).
        patch_size: p, side of every resampled patch (paper: 16).
        grid_size: Gh, Gw of the score map (paper: 14).
        num_tokens: N (paper: 196; 121 .. 1568 supported).
        num_rows: R bands, default ``round(sqrt(N))``.
        in_chans, embed_dim: patch embedding Conv2d(in_chans, embed_dim, p, p).
        trunk, head, score_norm, scorer_input_size, trunk_weights: see :class:`DartScorer`.
        sampling: ``"paper"`` (official sample points) or ``"center"``.
        resample_backend, partition_backend, posembed_backend: ``None`` (automatic: the Triton kernels for CUDA
            tensors when importable, torch otherwise), ``"torch"`` or ``"triton"``, per stage.
        uniform_scores: ignore the scorer and use constant scores (a regular grid when N = Gh * Gw).
        scorer_channels_last: run the scorer trunk in channels-last memory format.
        scorer_dtype: run the scorer trunk under autocast to this dtype (e.g. ``"bfloat16"``); ``None`` follows the
            ambient precision.

    Inference with one CUDA graph: :meth:`capture` (see :class:`~dartmamba.tokenizer.capture.CapturedTokenizer`).
    The forward has no host synchronisation and static shapes, so ``torch.compile(fullgraph=True)`` traces it (and
    the models around it) without graph breaks, for training and inference.

    Paper mode (448, p=16, G=14) computes the geometry at half resolution: ``img_size / (grid_size * patch_size)``
    is the geometry scale (2 there), reported by :attr:`geometry_scale`.
    """

    def __init__(self, img_size=448, patch_size: int = 16, grid_size=14, num_tokens: int = 196,
                 num_rows: int | None = None, in_chans: int = 3, embed_dim: int = 768, trunk: str = "mobilenetv3_small",
                 head: str = "v2", score_norm: str = "sample", scorer_input_size=None,
                 trunk_weights: str | None = None, sampling: str = "paper", resample_backend: str | None = None,
                 uniform_scores: bool = False, bias: bool = True, partition_backend: str | None = None,
                 posembed_backend: str | None = None, scorer_channels_last: bool = False, scorer_dtype=None):
        super().__init__()
        self.img_size = as_pair(img_size, "img_size")
        self.grid_size = as_pair(grid_size, "grid_size")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        self.patch_size = patch_size
        self.num_rows = default_num_rows(num_tokens) if num_rows is None else num_rows
        check_token_counts(num_tokens, self.num_rows)
        self.num_tokens = num_tokens
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        self.resample_backend = resample_backend
        self.partition_backend = partition_backend
        self.posembed_backend = posembed_backend
        self.uniform_scores = uniform_scores
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.scorer = DartScorer(self.grid_size, trunk=trunk, head=head, score_norm=score_norm,
                                 input_size=scorer_input_size, in_chans=in_chans, trunk_weights=trunk_weights,
                                 channels_last=scorer_channels_last, trunk_dtype=scorer_dtype)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)
        self._captured = None   # a CapturedTokenizer after capture(); a plain attribute, not a submodule

    @property
    def geometry_scale(self) -> float:
        return self.img_size[0] / (self.grid_size[0] * self.patch_size)

    @property
    def num_patches(self) -> int:
        """Number of grid positional embeddings (Gh * Gw, whatever the token count), as timm sizes ``pos_embed``."""
        return self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        """Pixels per score-grid cell: the stride of the feature maps DART tokens are scattered onto."""
        ratio = (self.img_size[0] // self.grid_size[0], self.img_size[1] // self.grid_size[1])
        return max(ratio) if as_scalar else ratio

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, patch_size={self.patch_size}, grid_size={self.grid_size}, "
                f"num_tokens={self.num_tokens}, num_rows={self.num_rows}, sampling={self.sampling!r}")

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise the trainable parts (scorer head, patch projection); a frozen trunk is left alone."""
        self.scorer.init_weights()
        self.proj.reset_parameters()   # PyTorch's Conv2d default, as for a fixed-grid patch embedding

    def scores(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, Gh, Gw) positive scores."""
        if self.uniform_scores:
            return images.new_ones(images.shape[0], *self.grid_size, dtype=torch.float32)
        return self.scorer(images)

    def geometry(self, images: Tensor, scores: Tensor | None = None) -> DartGeometry:
        scores = self.scores(images) if scores is None else scores
        return partition(scores, self.num_tokens, self.num_rows, img_size=self.img_size, validate=False,
                         backend=self.partition_backend)

    def capture(self, batch_size: int, **options):
        """Replay this tokenizer's inference forward from one CUDA graph for batches of ``batch_size``.

        After this call, ``forward`` runs the captured graph whenever it can (eval mode, no gradient, same batch
        shape / dtype / device, same autocast state, no explicit ``scores``) and the eager code otherwise.
        ``options`` go to :class:`~dartmamba.tokenizer.capture.CapturedTokenizer` (``with_pos_embed``,
        ``image_dtype``, ``compile``, ``warmup``). The outputs of a replay are static buffers, overwritten by the next
        replay. Returns the :class:`~dartmamba.tokenizer.capture.CapturedTokenizer`; :meth:`release_capture` undoes.
        """
        from .capture import CapturedTokenizer

        self._captured = CapturedTokenizer(self, batch_size, **options)
        return self._captured

    def release_capture(self) -> None:
        """Drop the CUDA graph made by :meth:`capture` (and its memory pool)."""
        self._captured = None

    def forward(self, images: Tensor, grid_pos_embed: Tensor | None = None, scores: Tensor | None = None) -> DartTokens:
        """
        Args:
            images: (B, C, H, W) floating point.
            grid_pos_embed: optional (1 or B, Gh * Gw, D) grid positional embeddings (no cls entry).
            scores: optional (B, Gh, Gw) positive scores that replace the scorer's.

        Returns:
            :class:`DartTokens` with tokens (B, N, D), pos_embed (B, N, D) or None, geometry, scores.
        """
        captured = self._captured
        if (captured is not None and scores is None and not torch.compiler.is_compiling()
                and captured.accepts(images, grid_pos_embed)):
            return captured(images, grid_pos_embed)
        return self.forward_eager(images, grid_pos_embed, scores)

    def forward_eager(self, images: Tensor, grid_pos_embed: Tensor | None = None,
                      scores: Tensor | None = None) -> DartTokens:
        """:meth:`forward` without the captured graph (what the graph records)."""
        check_images(images, self.in_chans, self.img_size)
        if scores is None:
            scores = self.scores(images)
            geometry = partition(scores, self.num_tokens, self.num_rows, img_size=self.img_size, validate=False,
                                 backend=self.partition_backend)
        else:
            geometry = partition(scores, self.num_tokens, self.num_rows, img_size=self.img_size, validate=True,
                                 backend=self.partition_backend)
        patches = resample_patches(images, geometry, self.patch_size, self.sampling, self.resample_backend)
        if not torch.is_autocast_enabled(images.device.type):
            patches = patches.to(self.proj.weight.dtype)
        tokens = embed_patches(patches, self.proj.weight, self.proj.bias)
        pos = (None if grid_pos_embed is None
               else resample_pos_embed(grid_pos_embed, geometry, backend=self.posembed_backend))
        return DartTokens(tokens, pos, geometry, scores)
