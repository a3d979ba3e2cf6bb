"""Tokenizers behind one interface (:class:`Tokenizer`): the fixed grid and DART (score -> partition -> resample ->
embed), and their video forms (``video_grid``, ``video_dart``: DART over the frame stack), registered by name for the
backbones (:func:`register_tokenizer`, :func:`create_tokenizer`)."""
from .base import Tokenizer, Tokens, create_tokenizer, register_tokenizer, tokenizer_class, tokenizer_names
from .capture import CapturedTokenizer, capture_tokenizer
from .dart import DartTokenizer, DartTokens, default_grid_size, embed_patches
from .dense import token_cell_areas, tokens_to_map
from .geometry import DartGeometry
from .grid import GridTokenizer
from .partition import (default_num_rows, interval_means, inverse_cdf_quantiles, overlap_matrix, partition,
                        partition_scores, partition_scores_torch, rebin_rows, uniform_geometry)
from .posembed import posembed_macs, resample_pos_embed, resample_pos_embed_reference, resample_pos_embed_torch
from .resample import SAMPLING_MODES, resample_macs, resample_patches, resample_reference, resample_torch, sample_points
from .video import (SCORE_MODES, SpatiotemporalHead, VideoDartTokenizer, VideoDartTokens, VideoGridTokenizer,
                    VideoScorer, TemporalDifferenceHead, resolve_score_mode, spatiotemporal_pos_embed, stack_frames,
                    tokens_per_frame, unstack_frames, video_num_rows, video_scores)
from .scorer import (HEADS, SCORE_NORMS, TRUNKS, DartScorer, MobileNetV3Trunk, ScoreHeadV1,
                     ScoreHeadV2, TinyConvTrunk, standardise_scores)

__all__ = [
    "Tokenizer", "Tokens", "create_tokenizer", "register_tokenizer", "tokenizer_class", "tokenizer_names",
    "GridTokenizer", "CapturedTokenizer", "DartTokenizer", "DartTokens", "DartGeometry", "DartScorer",
    "MobileNetV3Trunk", "TinyConvTrunk", "ScoreHeadV1", "ScoreHeadV2", "HEADS", "SCORE_NORMS",
    "TRUNKS", "SAMPLING_MODES", "capture_tokenizer", "default_grid_size", "default_num_rows", "embed_patches",
    "interval_means", "inverse_cdf_quantiles", "overlap_matrix", "partition", "partition_scores",
    "partition_scores_torch", "posembed_macs", "rebin_rows", "resample_macs", "resample_patches",
    "resample_pos_embed", "resample_pos_embed_reference", "resample_pos_embed_torch", "resample_reference",
    "resample_torch", "sample_points", "standardise_scores", "token_cell_areas", "tokens_to_map",
    "uniform_geometry", "VideoDartTokenizer", "VideoDartTokens", "VideoGridTokenizer", "VideoScorer",
    "TemporalDifferenceHead", "SpatiotemporalHead", "SCORE_MODES", "resolve_score_mode", "spatiotemporal_pos_embed",
    "stack_frames", "tokens_per_frame", "unstack_frames", "video_num_rows", "video_scores",
]
