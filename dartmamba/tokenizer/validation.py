"""Argument checks shared by the tokenizer stages. Errors name the argument and the expected form."""
from __future__ import annotations

import math

import torch
from torch import Tensor

# pixel magnitudes beyond this are far outside normalised (or even 0..255) images; the scorer may overflow on them
_LARGE_PIXEL = 1e4


class InvalidScores(ValueError):
    """Scores that are not finite and > 0; ``index`` is the first bad entry (b, i, j)."""

    def __init__(self, message: str, index: tuple[int, ...]):
        super().__init__(message)
        self.index = index


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types autocast does not know (meta)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _values_unreadable(t: Tensor) -> bool:
    """While compiling or capturing, and for tensors without values (fake, meta: FLOP counting, shape checks)."""
    from ..compat.torch_internals import is_fake

    return _tracing() or t.device.type == "meta" or is_fake(t)


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


def check_positive_int(value, name: str, meaning: str = "") -> None:
    """``value`` is an int >= 1 (not a bool), else a ValueError naming ``name``."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int{meaning}, got {value!r}")


def check_token_counts(num_tokens, num_rows) -> None:
    check_positive_int(num_tokens, "num_tokens")
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
    if check_values and not _values_unreadable(scores):
        bad = ~(torch.isfinite(scores) & (scores > 0))
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise InvalidScores(f"scores must be finite and > 0; scores{list(first)} = {scores[first].item()!r}",
                                first)


def scorer_failure(images: Tensor, scores: Tensor, index: tuple[int, ...], scorer: torch.nn.Module,
                   batch_scores: bool) -> str:
    """The error for scores a tokenizer's ``scorer`` made from the user's ``images`` (B, C, H, W) that are not finite
    and > 0 (``index``: the first bad one in ``scores`` (B, Gh, Gw)). It names the image and the likely cause: pixel
    values too large for the scorer's arithmetic, or the scorer's own weights non-finite. Error path only: it reads
    values back (host syncs)."""
    sample, value = index[0], scores[index].item()
    kind = "non-finite" if not math.isfinite(value) else "non-positive"
    reach = images.detach().flatten(1).abs().amax(dim=1).double().tolist()       # per image
    weights = next((name for name, t in [*scorer.named_parameters(), *scorer.named_buffers()]
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    culprit = max(range(len(reach)), key=reach.__getitem__) if batch_scores else sample
    head = f"images: the DART scorer produced {kind} scores for image {sample}"
    bad = f"scores{list(index)} = {value!r}"
    if weights is not None:
        return (f"{head} (its values reach {reach[sample]:.3g}; {bad}): the scorer's own weights are not finite "
                f"(tensor {weights!r} holds NaN or inf), e.g. after a diverged training step")
    if reach[culprit] > _LARGE_PIXEL:
        advice = ("values that large overflow the scorer's arithmetic; normalise the images (e.g. to mean 0 and "
                  "std 1)")
        if culprit != sample:
            return (f"{head} ({bad}): image {culprit}'s values reach {reach[culprit]:.3g}, and score_norm='batch' "
                    f"standardises the scores over the whole batch; {advice}")
        return f"{head} (its values reach {reach[sample]:.3g}; {bad}): {advice}"
    return (f"{head} (its values reach {reach[sample]:.3g}; {bad}): the images and the scorer's weights are finite "
            f"and the pixel values moderate, so the scorer's weights are likely too large (a diverging run?)")


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_tokenizer_args(img_size: tuple[int, int], grid_size: tuple[int, int], num_tokens, in_chans,
                         embed_dim) -> None:
    """An adaptive tokenizer's construction arguments (``img_size`` and ``grid_size`` already pairs): the score grid
    fits in the image (at most one cell per pixel) and so do the tokens (at most one per pixel)."""
    if not is_positive_int(in_chans):
        raise ValueError(f"in_chans must be an int >= 1 (image channels), got {in_chans!r}")
    if not is_positive_int(embed_dim):
        raise ValueError(f"embed_dim must be an int >= 1, got {embed_dim!r}")
    height, width = img_size
    if grid_size[0] > height or grid_size[1] > width:
        raise ValueError(f"grid_size must lie in [1, img_size] per side (at most one score cell per pixel): "
                         f"grid_size={grid_size} for img_size={img_size}")
    if not is_positive_int(num_tokens):
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if num_tokens > height * width:
        raise ValueError(f"num_tokens must be an int in [1, {height * width}] (at most one token per pixel of the "
                         f"{height}x{width} image), got {num_tokens!r}")


def check_grid_pos_embed(grid_pos_embed, num_patches: int, embed_dim: int, batch: int) -> None:
    """grid_pos_embed: None or (1 or B, num_patches, embed_dim)."""
    if grid_pos_embed is None:
        return
    if not isinstance(grid_pos_embed, Tensor):
        raise TypeError(f"grid_pos_embed must be None or a torch.Tensor, got {type(grid_pos_embed).__name__}")
    if (grid_pos_embed.dim() != 3 or grid_pos_embed.shape[0] not in (1, batch)
            or tuple(grid_pos_embed.shape[1:]) != (num_patches, embed_dim)):
        raise ValueError(f"grid_pos_embed must have shape (1 or B={batch}, num_patches={num_patches}, "
                         f"embed_dim={embed_dim}), got {tuple(grid_pos_embed.shape)}")


def check_given_scores(scores, batch: int, grid_size: tuple[int, int]) -> None:
    """Scores passed in place of the scorer's: (B, Gh, Gw) with the images' B and the tokenizer's grid."""
    if isinstance(scores, Tensor) and scores.dim() == 3 and tuple(scores.shape) != (batch, *grid_size):
        raise ValueError(f"scores must have shape (B={batch}, Gh={grid_size[0]}, Gw={grid_size[1]}) for {batch} "
                         f"images and a {grid_size[0]}x{grid_size[1]} score grid, got {tuple(scores.shape)}")


def check_image_values(images: Tensor, *, any_device: bool = False) -> None:
    """Every pixel finite, else an error naming the first bad one; eager CPU tensors only unless ``any_device``
    (reading the values back from an accelerator is a host sync, which the tokenizer's forward never makes).

    Where it is skipped (compiled or captured forwards, CUDA tensors) a sample with a non-finite pixel gets
    constant scores, so its geometry is the regular one and the other samples' are untouched (see
    :func:`~dartmamba.tokenizer.partition.partition_scores`); its tokens, and the model's output for it, are
    non-finite. Call this with ``any_device=True`` on CUDA batches to get the error there too.
    """
    if _values_unreadable(images) or not (any_device or images.device.type == "cpu"):
        return
    bad = ~torch.isfinite(images)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"images must be finite; images{list(first)} = {images[first].item()!r} (a NaN or inf "
                         f"pixel: check the data pipeline, e.g. a normalisation by a zero std)")


def check_device(images: Tensor, device: torch.device | None) -> None:
    """images on ``device`` (the model's weights'), when given."""
    if device is not None and images.device != device and device.type != "meta":
        raise ValueError(f"images are on {images.device} but the model's weights are on {device}; move the images "
                         f"(images.to('{device}')) or the model (model.to('{images.device}'))")


def check_images(images, in_chans: int, img_size: tuple[int, int], device: torch.device | None = None) -> None:
    """images: (B, C, H, W) floating point with the configured C, H, W and B >= 1, on ``device`` (the
    tokenizer's weights') when given. Any floating dtype is accepted: the tokenizer runs the images in its weights'
    dtype (float64 / float16 images into a float32 model are cast to float32)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (float32/float16/bfloat16/float64), "
                        f"got dtype {images.dtype}; convert with images.float() / 255")
    check_device(images, device)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0); expected at least one image")
    if images.shape[1] != in_chans:
        raise ValueError(f"images must have {in_chans} channels (B, {in_chans}, H, W), got {tuple(images.shape)}")
    if tuple(images.shape[2:]) != tuple(img_size):
        raise ValueError(f"images must be {img_size[0]}x{img_size[1]} (B, C, {img_size[0]}, {img_size[1]}), "
                         f"got {tuple(images.shape)}")
