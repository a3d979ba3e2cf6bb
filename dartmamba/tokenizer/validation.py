"""Argument checks shared by the tokenizer stages. Errors name the argument and the expected form."""
from __future__ import annotations

import torch
from torch import Tensor


def _tracing(t: Tensor | None = None) -> bool:
    """Whether values cannot (or must not) be read on the host: compiling, capturing a CUDA graph, meta tensors."""
    if torch.compiler.is_compiling() or (t is not None and t.is_meta):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types autocast does not know (meta)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def as_pair(value, name: str) -> tuple[int, int]:
    """int or (int, int) -> (int, int) of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def check_token_counts(num_tokens, num_rows) -> None:
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if not isinstance(num_rows, int) or isinstance(num_rows, bool) or not 1 <= num_rows <= num_tokens:
        raise ValueError(f"num_rows must be an int in [1, num_tokens={num_tokens}], got {num_rows!r}")


def check_scores(scores, num_tokens, num_rows, *, check_values: bool = True) -> None:
    """scores: (B, Gh, Gw) floating, B >= 1, finite and > 0."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor of shape (B, Gh, Gw), got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (B, Gh, Gw), got {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("scores is an empty batch (B = 0); expected at least one sample")
    if scores.shape[1] < 1 or scores.shape[2] < 1:
        raise ValueError(f"scores must have a non-empty grid, got shape {tuple(scores.shape)}")
    check_token_counts(num_tokens, num_rows)
    if check_values and not _tracing(scores):
        bad = ~(torch.isfinite(scores) & (scores > 0))
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"scores must be finite and > 0; scores{list(first)} = {scores[first].item()!r}")


def check_images(images, in_chans: int, img_size: tuple[int, int]) -> None:
    """images: (B, C, H, W) floating point with the configured C, H, W and B >= 1."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (float32/float16/bfloat16/float64), "
                        f"got dtype {images.dtype}; convert with images.float() / 255")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0); expected at least one image")
    if images.shape[1] != in_chans:
        raise ValueError(f"images must have {in_chans} channels (B, {in_chans}, H, W), got {tuple(images.shape)}")
    if tuple(images.shape[2:]) != tuple(img_size):
        raise ValueError(f"images must be {img_size[0]}x{img_size[1]} (B, C, {img_size[0]}, {img_size[1]}), "
                         f"got {tuple(images.shape)}")
