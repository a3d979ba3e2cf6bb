"""The "moving digit" clips: one small object moves across a static cluttered scene (optionally with static decoys).

Every clip is T frames of a scene drawn once with :class:`~dartmamba.data.ClutteredCanvas`'s renderer (background
and clutter fragments of other digits, plus ``num_decoys`` whole digits that never move), with one digit pasted at a
new place in every frame (straight-line motion at constant speed, bouncing off the borders) and fresh pixel noise
per frame. The label is the class of the moving digit. The object covers a few percent of every frame and the scene
never changes, so a tokenizer that follows motion (video DART) can spend its tokens on the object while a fixed grid
spends most of them on the static scene; with decoys, a single frame does not even say which digit counts.

Every clip is a pure function of ``(seed, epoch, index)``, as the canvases are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .canvas import MASK_THRESHOLD, ClutteredCanvas, _as_range

__all__ = ["ClipSample", "MovingDigitClips", "bounce"]


@dataclass(frozen=True)
class ClipSample:
    """One rendered clip.

    video: (C, T, S, S) float32 in [0, 1] (S = ``output_size``).
    label: class of the moving object.
    boxes: (T, 4) float32, the moving object's (x0, y0, x1, y1) in every frame, output pixels (x1, y1 exclusive).
    masks: (T, S, S) float32 in [0, 1], the moving object's ink (as :class:`~dartmamba.data.CanvasSample`'s mask).
    source_index: which source image moves; ``decoys``: which ones stand still.
    """

    video: Tensor
    label: int
    boxes: Tensor
    masks: Tensor
    source_index: int
    decoys: tuple[int, ...] = ()


def bounce(start: np.ndarray, velocity: np.ndarray, steps: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Positions of a point moving at constant ``velocity`` from ``start`` inside [0, high] per axis, reflected at
    the borders (a triangle wave). start, velocity, high: (A,); steps: (T,) -> (T, A)."""
    high = np.maximum(high, 1e-9)
    travelled = np.mod(start[None] + velocity[None] * steps[:, None], 2 * high[None])
    return np.where(travelled > high, 2 * high - travelled, travelled)


class MovingDigitClips(Dataset):
    """Clips of ``num_frames`` frames: a digit moving over a static scene (clutter, optional static decoy digits).

    Args:
        images, labels: source objects and their classes (as :class:`~dartmamba.data.ClutteredCanvas`).
        num_frames: T.
        speed: (low, high) speed of the moving object in canvas pixels per frame (direction uniform).
        frame_noise_std: std of the Gaussian pixel noise drawn afresh for every frame (clipped to [0, 1]).
        num_decoys: whole digits (other sources than the moving one) that stand still in the scene.
        canvas_size, object_size, num_distractors, fragment_fraction, distractor_contrast, background, channels,
            tint: the scene and the digits (decoys and the moving one draw their sizes from ``object_size``).
        output_size: deliver the frames at this side (area-averaged), default ``canvas_size``.
        length: number of clips (default: one per source image); clip ``i`` moves source ``i % M``.
        seed, resample_per_epoch: as the canvases (``set_epoch`` selects the epoch's clips).
        mean, std: per-channel normalisation applied in ``__getitem__``.
    """

    def __init__(self, images, labels, num_frames: int = 8, speed=(2.0, 4.0), frame_noise_std: float = 0.03,
                 num_decoys: int = 0, canvas_size: int = 64, object_size=(16, 24), num_distractors=(3, 6),
                 fragment_fraction=(0.3, 0.5), distractor_contrast=(0.4, 0.8), background=(0.0, 0.2), channels: int = 3, tint: bool = False,
                 output_size: int | None = None, length: int | None = None, seed: int = 0,
                 resample_per_epoch: bool = False, mean=None, std=None):
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        self.speed = _as_range(speed, "speed")
        if self.speed[0] < 0:
            raise ValueError(f"speed must be >= 0, got {speed!r}")
        if frame_noise_std < 0:
            raise ValueError(f"frame_noise_std must be >= 0, got {frame_noise_std!r}")
        if not isinstance(num_decoys, int) or isinstance(num_decoys, bool) or num_decoys < 0:
            raise ValueError(f"num_decoys must be an int >= 0, got {num_decoys!r}")
        # the canvas renderer draws every clip's scene; its (seed, epoch, index) generator is the clip's
        self.scene = ClutteredCanvas(images, labels, canvas_size=canvas_size, object_size=object_size,
                                     num_distractors=num_distractors, fragment_fraction=fragment_fraction,
                                     distractor_contrast=distractor_contrast, noise_std=0.0, background=background,
                                     channels=channels, tint=tint, length=length, seed=seed,
                                     resample_per_epoch=resample_per_epoch)
        self.num_sources = self.scene.images.shape[0]
        if num_decoys >= self.num_sources:
            raise ValueError(f"num_decoys must be below the number of source images ({self.num_sources}), "
                             f"got {num_decoys}")
        output_size = canvas_size if output_size is None else output_size
        if not isinstance(output_size, int) or not 1 <= output_size <= canvas_size:
            raise ValueError(f"output_size must be an int in [1, canvas_size={canvas_size}], got {output_size!r}")
        self.num_frames, self.frame_noise_std, self.num_decoys = num_frames, float(frame_noise_std), num_decoys
        self.canvas_size, self.output_size, self.length = canvas_size, output_size, self.scene.length
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)

    @property
    def num_classes(self) -> int:
        return self.scene.num_classes

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.scene.set_epoch(epoch)

    def render(self, index: int) -> ClipSample:
        """Clip ``index`` (0 <= index < len) without normalisation."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for MovingDigitClips of length {self.length}")
        rng = self.scene._rng(index)
        sources = self.num_sources
        source = index % sources
        scene = self.scene.draw_clutter(rng)
        decoys = tuple(int((source + k) % sources)
                       for k in rng.choice(np.arange(1, sources), size=self.num_decoys, replace=False))
        for decoy in decoys:
            still = self.scene.scaled_sources(self.scene._draw_size(rng))[decoy] * self.scene._colour(rng)
            top, left = (int(rng.integers(self.canvas_size - side + 1)) for side in still.shape[-2:])
            ClutteredCanvas._paste(scene, still, top, left)

        ink = self.scene.scaled_sources(self.scene._draw_size(rng))[source]
        obj = ink * self.scene._colour(rng)
        height, width = obj.shape[-2:]
        room = np.array([self.canvas_size - height, self.canvas_size - width], dtype=np.float64)
        start = rng.uniform(0, 1, size=2) * room
        angle = rng.uniform(0, 2 * np.pi)
        velocity = rng.uniform(*self.speed) * np.array([np.sin(angle), np.cos(angle)])
        corners = np.rint(bounce(start, velocity, np.arange(self.num_frames, dtype=np.float64), room)).astype(int)

        size, frames_count = self.canvas_size, self.num_frames
        frames = np.repeat(scene[:, None], frames_count, axis=1)                         # (C, T, S, S)
        masks = np.zeros((frames_count, size, size), dtype=np.float32)
        object_mask = (ink.max(axis=0) >= MASK_THRESHOLD).astype(np.float32)
        for t, (top, left) in enumerate(corners):
            ClutteredCanvas._paste(frames[:, t], obj, int(top), int(left))
            masks[t, top:top + height, left:left + width] = object_mask
        if self.frame_noise_std > 0:
            frames += self.frame_noise_std * rng.standard_normal(frames.shape, dtype=np.float32)
            np.clip(frames, 0, 1, out=frames)
        video, masks_t = torch.from_numpy(frames), torch.from_numpy(masks)
        boxes = torch.tensor([[left, top, left + width, top + height] for top, left in corners], dtype=torch.float32)
        if self.output_size != size:
            out = (self.output_size, self.output_size)
            video = F.interpolate(video.transpose(0, 1), size=out, mode="area").transpose(0, 1)
            masks_t = F.interpolate(masks_t[:, None], size=out, mode="area")[:, 0]
            boxes = boxes * (self.output_size / size)
        return ClipSample(video.contiguous(), int(self.scene.labels[source]), boxes, masks_t.contiguous(), source,
                          decoys)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """-> (video (C, T, S, S) float32, normalised if mean/std were given; label)."""
        sample = self.render(index)
        video = sample.video
        if self.mean is not None:
            video = (video - self.mean) / self.std
        return video, sample.label
