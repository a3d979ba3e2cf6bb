"""The "cluttered canvas" data set: one small labelled object per canvas, at a random position and scale, among
distractor clutter.

It is the small-scale stand-in for DART's claim: the object covers a few percent of the canvas, so a fixed grid
spends most of its tokens on background and clutter, while an adaptive tokenizer can spend them on the object.

Every canvas is a pure function of ``(seed, epoch, index)``: the same arguments give the same pixels on every
machine, in every process and in any order (``numpy.random.default_rng([seed, epoch, index])``).
``resample_per_epoch=True`` (training) draws new placements every epoch (call :meth:`ClutteredCanvas.set_epoch`);
``False`` (validation) ignores the epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CanvasSample", "ClutteredCanvas", "digits_source", "MASK_THRESHOLD"]

MASK_THRESHOLD = 0.25       # object ink level (before tinting) from which a pixel belongs to the object's mask


def _as_range(value, name: str, kind=float) -> tuple:
    """A scalar or a (low, high) pair -> (low, high) with low <= high."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low = high = value
    else:
        try:
            low, high = value
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}") from None
    low, high = kind(low), kind(high)
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return low, high


@dataclass(frozen=True)
class CanvasSample:
    """One rendered canvas.

    image: (C, S, S) float32 in [0, 1] (S = ``output_size``).
    label: class index of the object.
    box: (x0, y0, x1, y1) of the object in output pixels (x1, y1 exclusive).
    source_index: which source image the object is.
    mask: (S, S) float32 in [0, 1], the object's segmentation: 1 on canvas pixels where the object's own ink is at
        least ``MASK_THRESHOLD`` of full strength (clutter never counts), area-averaged to ``output_size`` (so a
        soft coverage fraction at a lower resolution).
    """

    image: Tensor
    label: int
    box: tuple[float, float, float, float]
    source_index: int
    mask: Tensor | None = None


class ClutteredCanvas(Dataset):
    """Place one source image per canvas at a random position and scale, over clutter.

    Args:
        images: (M, h, w) or (M, h, w, c) array of source objects, values in [0, 1] (uint8 is divided by 255).
        labels: (M,) integer class labels.
        canvas_size: side S of the square canvas the scene is drawn on, in pixels.
        object_size: (low, high) inclusive integer range of the object's longer side in canvas pixels (uniform); a
            number: fixed. Fragments of clutter are cut from sources drawn at sizes from the same range.
        num_distractors: (low, high) inclusive count of clutter fragments per canvas.
        fragment_fraction: (low, high) side of a fragment as a fraction of its source image's side.
        distractor_contrast: (low, high) peak intensity of a fragment relative to the object's (1.0).
        noise_std: std of additive Gaussian pixel noise (clipped to [0, 1] afterwards).
        background: (low, high) uniform background level.
        channels: output channels; grey sources are replicated, colour sources need ``channels == c``.
        tint: give the object and every fragment a random colour (channels == 3 only).
        output_size: deliver the canvas at this side (area-averaged: each output pixel is the mean of the canvas
            pixels it covers), as a fixed-grid model sees a lower resolution; default ``canvas_size``.
        length: number of canvases (default M); canvas ``i`` shows source image ``i % M``.
        seed: base seed.
        resample_per_epoch: new placements every epoch (training) or the same canvases forever (evaluation).
        mean, std: per-channel normalisation applied in ``__getitem__`` (None: images in [0, 1]).
    """

    def __init__(self, images, labels, canvas_size: int = 64, object_size=(8, 12), num_distractors=(4, 8),
                 fragment_fraction=(0.3, 0.6), distractor_contrast=(0.5, 1.0), noise_std: float = 0.05,
                 background=(0.0, 0.2), channels: int = 3, tint: bool = False, output_size: int | None = None,
                 length: int | None = None, seed: int = 0, resample_per_epoch: bool = False,
                 mean=None, std=None):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty (M, h, w) or (M, h, w, c) array, got shape {images.shape}")
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        images = images.astype(np.float32)
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be an integer array of shape ({images.shape[0]},), got "
                             f"{labels.dtype} {labels.shape}")
        if not isinstance(canvas_size, int) or canvas_size < 4:
            raise ValueError(f"canvas_size must be an int >= 4, got {canvas_size!r}")
        self.object_size = _as_range(object_size, "object_size", int)
        if self.object_size[0] < 1 or self.object_size[1] > canvas_size:
            raise ValueError(f"object_size must lie in [1, canvas_size={canvas_size}], got {object_size!r}")
        self.num_distractors = _as_range(num_distractors, "num_distractors", int)
        if self.num_distractors[0] < 0:
            raise ValueError(f"num_distractors must be >= 0, got {num_distractors!r}")
        self.fragment_fraction = _as_range(fragment_fraction, "fragment_fraction")
        if not 0 < self.fragment_fraction[0] <= self.fragment_fraction[1] <= 1:
            raise ValueError(f"fragment_fraction must lie in (0, 1], got {fragment_fraction!r}")
        self.distractor_contrast = _as_range(distractor_contrast, "distractor_contrast")
        self.background = _as_range(background, "background")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        source_chans = images.shape[-1]
        if source_chans not in (1, channels):
            allowed = " or ".join(str(c) for c in sorted({1, channels}))
            raise ValueError(f"images have {source_chans} channels; channels={channels} takes sources with {allowed}")
        if tint and channels != 3:
            raise ValueError(f"tint=True needs channels=3, got channels={channels}")
        output_size = canvas_size if output_size is None else output_size
        if not isinstance(output_size, int) or not 1 <= output_size <= canvas_size:
            raise ValueError(f"output_size must be an int in [1, canvas_size={canvas_size}], got {output_size!r}")
        length = images.shape[0] if length is None else length
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))   # (M, c, h, w)
        self.labels = labels.astype(np.int64)
        self.canvas_size, self.output_size, self.channels = canvas_size, output_size, channels
        self.noise_std, self.tint = float(noise_std), bool(tint)
        self.length, self.seed = length, int(seed)
        self.resample_per_epoch = bool(resample_per_epoch)
        self.epoch = 0
        self._scaled_cache: dict[int, np.ndarray] = {}
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Select the placements of ``epoch`` (no effect unless ``resample_per_epoch``)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        epoch = self.epoch if self.resample_per_epoch else 0
        return np.random.default_rng([self.seed, epoch, index])

    def _colour(self, rng: np.random.Generator) -> np.ndarray:
        """(channels, 1, 1) multiplier: ones, or a random colour with its largest component 1 (``tint``)."""
        if not self.tint:
            return np.ones((self.channels, 1, 1), dtype=np.float32)
        colour = rng.uniform(0.3, 1.0, size=3)
        return (colour / colour.max()).astype(np.float32).reshape(3, 1, 1)

    def scaled_sources(self, longer_side: int) -> np.ndarray:
        """All source images resized so that their longer side is ``longer_side`` pixels (bilinear, area-averaged
        when shrinking; cached). -> (M, c, h', w') float32 in [0, 1]."""
        cached = self._scaled_cache.get(longer_side)
        if cached is None:
            h, w = self.images.shape[-2:]
            factor = longer_side / max(h, w)
            size = (max(1, round(h * factor)), max(1, round(w * factor)))
            scaled = self.images if size == (h, w) else F.interpolate(
                self.images, size=size, mode="bilinear", align_corners=False, antialias=factor < 1).clamp_(0, 1)
            cached = self._scaled_cache[longer_side] = scaled.numpy()
        return cached

    @staticmethod
    def _paste(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
        """Composite ``patch`` (c, h, w) onto ``canvas`` (C, S, S) by per-pixel maximum (strokes over strokes)."""
        h, w = patch.shape[-2:]
        region = canvas[:, top:top + h, left:left + w]
        np.maximum(region, patch, out=region)

    def _draw_size(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.object_size[0], self.object_size[1] + 1))

    def draw_clutter(self, rng: np.random.Generator) -> np.ndarray:
        """The scene without the object: background level and clutter fragments, drawn from ``rng``.
        -> (C, S, S) float32 in [0, 1] (no noise)."""
        size, num_sources = self.canvas_size, self.images.shape[0]
        canvas = np.full((self.channels, size, size), rng.uniform(*self.background), dtype=np.float32)
        for _ in range(int(rng.integers(self.num_distractors[0], self.num_distractors[1] + 1))):
            other = self.scaled_sources(self._draw_size(rng))[int(rng.integers(num_sources))]
            h, w = other.shape[-2:]
            frac = rng.uniform(*self.fragment_fraction)
            ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
            top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            fragment = other[:, top:top + ch, left:left + cw] * (rng.uniform(*self.distractor_contrast)
                                                                 * self._colour(rng))
            self._paste(canvas, fragment, int(rng.integers(size - ch + 1)), int(rng.integers(size - cw + 1)))
        return canvas

    def render(self, index: int, with_mask: bool = True) -> CanvasSample:
        """The canvas ``index`` (0 <= index < len) without normalisation; ``with_mask=False`` skips the object's
        mask (``mask`` is None; the image, label and box are the same)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ClutteredCanvas of length {self.length}")
        rng = self._rng(index)
        size, num_sources = self.canvas_size, self.images.shape[0]
        source_index = index % num_sources
        canvas = self.draw_clutter(rng)

        ink = self.scaled_sources(self._draw_size(rng))[source_index]
        obj = ink * self._colour(rng)
        oh, ow = obj.shape[-2:]
        top, left = int(rng.integers(size - oh + 1)), int(rng.integers(size - ow + 1))
        self._paste(canvas, obj, top, left)
        mask_t = None
        if with_mask:
            mask = np.zeros((1, size, size), dtype=np.float32)
            mask[0, top:top + oh, left:left + ow] = ink.max(axis=0) >= MASK_THRESHOLD
            mask_t = torch.from_numpy(mask)

        if self.noise_std > 0:
            noise = rng.standard_normal(canvas.shape, dtype=np.float32)
            noise *= self.noise_std                       # in place: the same float32 products as std * noise
            canvas += noise
            np.clip(canvas, 0, 1, out=canvas)
        image = torch.from_numpy(canvas)
        box = (float(left), float(top), float(left + ow), float(top + oh))
        if self.output_size != size:
            out = (self.output_size, self.output_size)
            image = F.interpolate(image[None], size=out, mode="area")[0]
            if mask_t is not None:
                mask_t = F.interpolate(mask_t[None], size=out, mode="area")[0]
            ratio = self.output_size / size
            box = tuple(v * ratio for v in box)
        return CanvasSample(image.contiguous(), int(self.labels[source_index]), box, source_index,
                            None if mask_t is None else mask_t[0].contiguous())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """-> (image (C, S, S) float32, normalised if mean/std were given; label)."""
        sample = self.render(index, with_mask=False)
        image = sample.image
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image, sample.label


def digits_source(split: str = "train", val_fraction: float = 0.2, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download), split by class.

    Returns (images (M, 8, 8) float32 in [0, 1], labels (M,) int64). ``split``: ``"train"``, ``"val"`` or ``"all"``;
    the split is stratified and fixed by ``split_seed``.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    if split == "all":
        return images, labels
    rng = np.random.default_rng(split_seed)
    val_index = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        val_index.append(members[:round(len(members) * val_fraction)])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[np.concatenate(val_index)] = True
    chosen = is_val if split == "val" else ~is_val
    return images[chosen], labels[chosen]
