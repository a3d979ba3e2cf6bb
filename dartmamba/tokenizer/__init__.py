"""DART: score -> partition -> resample -> embed."""
from .capture import CapturedTokenizer, capture_tokenizer
from .dart import DartTokenizer, DartTokens, embed_patches
from .dense import token_cell_areas, tokens_to_map
from .geometry import DartGeometry
from .partition import (default_num_rows, interval_means, inverse_cdf_quantiles, overlap_matrix, partition,
                        partition_scores, partition_scores_torch, rebin_rows, uniform_geometry)
from .posembed import resample_pos_embed, resample_pos_embed_reference, resample_pos_embed_torch
from .resample import SAMPLING_MODES, resample_patches, resample_reference, resample_torch, sample_points
from .scorer import (HEADS, SCORE_NORMS, TRUNKS, DartScorer, MobileNetV3Trunk, RandomTrunkWarning, ScoreHeadV1,
                     ScoreHeadV2, TinyConvTrunk, standardise_scores)

__all__ = [
    "CapturedTokenizer", "DartTokenizer", "DartTokens", "DartGeometry", "DartScorer", "MobileNetV3Trunk",
    "TinyConvTrunk", "ScoreHeadV1", "ScoreHeadV2", "RandomTrunkWarning", "HEADS", "SCORE_NORMS", "TRUNKS",
    "SAMPLING_MODES", "capture_tokenizer", "default_num_rows", "embed_patches", "interval_means",
    "inverse_cdf_quantiles", "overlap_matrix", "partition", "partition_scores", "partition_scores_torch", "rebin_rows",
    "resample_patches", "resample_pos_embed", "resample_pos_embed_reference", "resample_pos_embed_torch",
    "resample_reference", "resample_torch", "sample_points", "standardise_scores", "token_cell_areas",
    "tokens_to_map", "uniform_geometry",
]
