"""The DART tokenizer module: score -> partition -> resample -> embed (+ positional embeddings)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor

from .base import Tokenizer, Tokens, register_tokenizer
from .dense import tokens_to_map
from .geometry import DartGeometry
from .partition import default_num_rows, partition
from .posembed import posembed_macs, resample_pos_embed
from .resample import SAMPLING_MODES, resample_macs, resample_patches
from .scorer import DartScorer
from .validation import (InvalidScores, as_pair, autocast_enabled, check_given_scores, check_grid_pos_embed,
                         check_image_values, check_images, check_positive_int, check_token_counts,
                         check_tokenizer_args, scorer_failure)

# where the official DART code keeps its scorer (under the tokenizer's prefix), and its head's layer names
_OFFICIAL_SCORER = "spn.spn.spn."
_OFFICIAL_HEAD = {"mlp.net.0.": "fc1.", "mlp.net.2.": "fc2."}


class DartTokens(Tokens):
    """What :class:`DartTokenizer` returns: a :class:`~dartmamba.tokenizer.Tokens` with every field set.

    tokens: (B, N, D) embedded patches in raster (DART) order.
    pos_embed: (B, N, D) per-sample positional embeddings, or ``None`` when no grid embedding was given.
    geometry: the partition (bands, token edges, sizes).
    scores: (B, Gh, Gw) the scores the partition was cut from.
    """

    __slots__ = ()


def embed_patches(patches: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Conv2d(C, D, p, stride p) on p x p patches, as one GEMM. (B, N, C, p, p) -> (B, N, D)."""
    return F.linear(patches.flatten(2), weight.flatten(1), bias)


def default_grid_size(img_size, patch_size: int) -> tuple[int, int]:
    """The score grid of the paper's half-resolution geometry: ``img_size / (2 * patch_size)`` per side (448 / 16
    -> 14 x 14), at least 1."""
    check_positive_int(patch_size, "patch_size")
    height, width = as_pair(img_size, "img_size")
    return max(1, height // (2 * patch_size)), max(1, width // (2 * patch_size))


@register_notrace_module       # torch.fx: one leaf (value-dependent geometry, custom ops, argument checks)
@register_tokenizer("dart")
class DartTokenizer(nn.Module, Tokenizer):
    """Differentiable Dynamic Adaptive Region Tokenizer.

    Args:
        img_size: input H, W (paper: 448).
        patch_size: p, side of every resampled patch (paper: 16).
        grid_size: Gh, Gw of the score map (default :func:`default_grid_size`: 14 for 448 / 16, the paper's).
        num_tokens: N (default Gh * Gw; paper: 196; 121 .. 1568 supported).
        num_rows: R bands, default ``round(sqrt(N))``.
        in_chans, embed_dim: patch embedding Conv2d(in_chans, embed_dim, p, p).
        trunk, head, score_norm, scorer_input_size, trunk_weights, trunk_bn_eps: see :class:`DartScorer`.
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

    output_key = "dart"

    def __init__(self, img_size=448, patch_size: int = 16, grid_size=None, num_tokens: int | None = None,
                 num_rows: int | None = None, in_chans: int = 3, embed_dim: int = 768, trunk: str = "mobilenetv3_small",
                 head: str = "v2", score_norm: str = "sample", scorer_input_size=None,
                 trunk_weights: str | None = None, sampling: str = "paper", resample_backend: str | None = None,
                 uniform_scores: bool = False, bias: bool = True, partition_backend: str | None = None,
                 posembed_backend: str | None = None, scorer_channels_last: bool = False, scorer_dtype=None,
                 trunk_bn_eps: float | None = None, device=None, dtype=None):
        super().__init__()
        self.img_size = as_pair(img_size, "img_size")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        self.patch_size = patch_size
        self.grid_size = default_grid_size(img_size, patch_size) if grid_size is None else as_pair(grid_size,
                                                                                                   "grid_size")
        self.feature_grid = self.grid_size
        if num_tokens is None:
            num_tokens = self.grid_size[0] * self.grid_size[1]
        check_tokenizer_args(self.img_size, self.grid_size, num_tokens, in_chans, embed_dim)
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
                                 channels_last=scorer_channels_last, trunk_dtype=scorer_dtype,
                                 trunk_bn_eps=trunk_bn_eps, device=device, dtype=dtype)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias, device=device, dtype=dtype)
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

    def set_input_size(self, img_size=None, patch_size=None, num_tokens: int | None = None) -> None:
        """A new input resolution: the score grid scales with the image (448 -> 896: 14 -> 28 cells), a scorer that
        saw half the image sees half the new one, the token count stays (or becomes ``num_tokens``). The backbone
        resamples its grid positional embeddings to the new ``grid_size``. A new patch size is not supported."""
        if patch_size is not None and as_pair(patch_size, "patch_size") != (self.patch_size, self.patch_size):
            raise ValueError(f"patch_size: the DART tokenizer's patch size cannot change after construction "
                             f"({self.patch_size}), got {patch_size!r}")
        new = self.img_size if img_size is None else as_pair(img_size, "img_size")
        old = self.img_size
        grid = tuple(g * n // o for g, n, o in zip(self.grid_size, new, old))
        if any(g * o != c * n for g, c, n, o in zip(grid, self.grid_size, new, old)) or min(grid) < 1:
            raise ValueError(f"img_size: {new} does not scale the {self.grid_size[0]}x{self.grid_size[1]} score grid of "
                             f"{old} to whole cells; use a multiple of {tuple(o // g for o, g in zip(old, self.grid_size))}")
        scorer = self.scorer
        if scorer.input_size is not None and tuple(2 * s for s in scorer.input_size) == tuple(old):
            scorer.input_size = tuple(side // 2 for side in new)
        num_tokens = self.num_tokens if num_tokens is None else num_tokens
        num_rows = default_num_rows(num_tokens) if num_tokens != self.num_tokens else self.num_rows
        check_token_counts(num_tokens, num_rows)
        self.img_size, self.grid_size, self.feature_grid = new, grid, grid
        scorer.grid_size = grid
        self.num_tokens, self.num_rows = num_tokens, num_rows
        self.release_capture()

    def to_feature_map(self, tokens: Tensor, output: "DartTokens") -> Tensor:
        """Token features (B, N, D) scattered onto the score grid by area: (B, D, Gh, Gw) (see
        :func:`~dartmamba.tokenizer.tokens_to_map`)."""
        return tokens_to_map(tokens, output.geometry, self.feature_grid)

    def flop_parts(self, call, counted) -> dict[str, int]:
        """The scorer's trunk and head, the resampling and the positional-embedding re-binning (analytic where no op
        shows them: the gather path and the running sums), and the patch projection."""
        args, kwargs = call
        images = args[0]
        grid_pos_embed = args[1] if len(args) > 1 else kwargs.get("grid_pos_embed")
        batch, chans = images.shape[:2]
        trunk, scorer, total = counted("scorer.trunk"), counted("scorer"), counted()
        resample_ops, posembed_ops = counted(part="resample"), counted(part="posembed")
        posembed = posembed_ops
        if not posembed and grid_pos_embed is not None:
            posembed = posembed_macs(batch, self.num_rows, self.grid_size[1], self.num_tokens,
                                     grid_pos_embed.shape[-1])
        return {"scorer_trunk": trunk, "scorer_head": scorer - trunk,
                "resample": resample_ops or resample_macs(batch, self.num_tokens, chans, self.patch_size),
                "posembed": posembed, "embed": total - scorer - resample_ops - posembed_ops}

    def convert_official_state_dict(self, state_dict: dict, prefix: str, source: str) -> dict:
        """Official DART names -> ours: the scorer under ``<prefix>spn.spn.spn.`` (torchvision MobileNetV3 trunk
        ``features.*`` and head ``mlp.net.{0,2}``) becomes ``<prefix>scorer.{trunk,head}.*``; everything else
        (``<prefix>proj``, the backbone) passes through."""
        official = prefix + _OFFICIAL_SCORER
        converted, trunk_state = {}, {}
        for key, value in state_dict.items():
            if not key.startswith(official):
                converted[key] = value
                continue
            rest = key[len(official):]
            if rest.startswith("features."):
                trunk_state[rest[len("features."):]] = value
                continue
            for theirs, ours in _OFFICIAL_HEAD.items():
                if rest.startswith(theirs):
                    converted[f"{prefix}scorer.head.{ours}{rest[len(theirs):]}"] = value
                    break
            else:
                converted[key] = value          # reported as unexpected
        if trunk_state:
            converted.update(self.scorer.trunk.rename_torchvision(trunk_state, f"{prefix}scorer.trunk.",
                                                                  f"{source} (scorer trunk)"))
        return converted

    def adopt_official_settings(self, loaded: list[str], prefix: str) -> None:
        """What the official models were trained with: batch-global score standardisation, and torchvision's
        BatchNorm eps (1e-3) in a trunk loaded from the checkpoint."""
        self.scorer.score_norm = "batch"
        trunk = self.scorer.trunk
        if hasattr(trunk, "set_bn_eps") and any(k.startswith(f"{prefix}scorer.trunk.") for k in loaded):
            trunk.set_bn_eps(1e-3)

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
        """The partition of a batch, from the scorer's scores or from ``scores`` (B, Gh, Gw) (then validated)."""
        if scores is None:
            return self._partition(self.scores(images), validate=False)
        return self._partition(scores, validate=True)

    def _partition(self, scores: Tensor, validate: bool) -> DartGeometry:
        return partition(scores, self.num_tokens, self.num_rows, img_size=self.img_size, validate=validate,
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
        """:meth:`forward` without the captured graph (what the graph records). Images of any floating dtype run in
        the weights' dtype; non-finite pixels are an error on CPU (see
        :func:`~dartmamba.tokenizer.validation.check_image_values` for the compiled / CUDA behaviour)."""
        check_images(images, self.in_chans, self.img_size, self.proj.weight.device)
        check_grid_pos_embed(grid_pos_embed, self.num_patches, self.embed_dim, images.shape[0])
        check_given_scores(scores, images.shape[0], self.grid_size)
        check_image_values(images)
        original = images
        images = images.to(self.proj.weight.dtype)
        given = scores is not None
        if not given:
            scores = self.scores(images)
        try:
            geometry = self._partition(scores, validate=given or scores.device.type == "cpu")
        except InvalidScores as err:
            if given:
                raise
            # the scores are ours, the images the user's: name those (only here are their values read)
            raise ValueError(scorer_failure(original, scores, err.index, self.scorer,
                                            self.scorer.score_norm == "batch")) from None
        patches = resample_patches(images, geometry, self.patch_size, self.sampling, self.resample_backend)
        if not autocast_enabled(images.device.type):
            patches = patches.to(self.proj.weight.dtype)
        tokens = embed_patches(patches, self.proj.weight, self.proj.bias)
        pos = (None if grid_pos_embed is None
               else resample_pos_embed(grid_pos_embed, geometry, backend=self.posembed_backend))
        return DartTokens(tokens, pos, geometry, scores)
