"""Data for training: ImageFolder through timm (``create_dataset`` / ``create_transform``), the cluttered canvas, or
its video form (``video_canvas``: a digit moving over a static cluttered scene, for the video models).

Reproducibility. A training sample is a pure function of ``(seed, epoch, index)``: the canvas data set is built
that way, and ImageFolder samples go through :class:`SeededSamples`, which seeds Python's, NumPy's and torch's
RNGs from that triple before running the (random) transform. The sample order is a
``DistributedSampler(seed, epoch)``. So an epoch replays exactly after a resume, whatever the number of loader
workers.

Evaluation shards the validation set over ranks without padding (:class:`ShardSampler`), so accuracies summed
over ranks count every image exactly once.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .config import ConfigError, RunConfig

__all__ = ["DataBundle", "SeededSamples", "ShardSampler", "build_data", "check_data_paths", "mix_seed",
           "model_data_config"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence mixing: well spread, the same on every platform)."""
    high, low = np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(2, np.uint32)
    return (int(high) << 31) | (int(low) >> 1)


class SeededSamples(Dataset):
    """Wrap a map-style data set so that sample ``i`` of epoch ``e`` is drawn with RNGs seeded by (seed, e, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = mix_seed(self.seed, self.epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: every index on exactly one rank, no padding, no shuffling."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


@dataclass
class DataBundle:
    train_set: Dataset
    val_set: Dataset
    num_classes: int
    input_size: tuple[int, ...]         # (C, H, W); (C, T, H, W) for clips
    mean: tuple[float, ...]
    std: tuple[float, ...]


def check_data_paths(cfg: RunConfig) -> None:
    """Fail early, naming the path, when an ImageFolder root or split folder is missing."""
    d = cfg.data
    if d.kind != "imagefolder":
        return
    root = os.path.abspath(os.path.expanduser(d.root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: data directory not found: {root}")
    for key, split in (("data.train_split", d.train_split), ("data.val_split", d.val_split)):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{key}: split folder not found: {folder} (expected {root}/<split>/<class>/"
                                    f"<image> with one sub-folder per class)")


def model_data_config(model) -> dict:
    """The model's timm pretrained cfg with ``input_size`` read from the model itself: arguments such as
    ``img_size=64`` change the model but not its pretrained cfg."""
    data_cfg = dict(model.pretrained_cfg)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        data_cfg["input_size"] = (data_cfg.get("input_size", (3,))[0], int(height), int(width))
    frames = getattr(getattr(model, "patch_embed", None), "num_frames", None)
    if frames is not None:                          # a video model: clips of (C, T, H, W)
        data_cfg["num_frames"] = int(frames)
    return data_cfg


def _model_input(model_cfg: dict, cfg: RunConfig) -> tuple[tuple[int, int, int], tuple, tuple, float, str]:
    """Input size, mean, std, crop_pct and interpolation: the config where set, else the model's."""
    d = cfg.data
    size = tuple(model_cfg["input_size"])
    if d.img_size is not None:
        size = (size[0], d.img_size, d.img_size)
    mean = tuple(d.mean) if d.mean is not None else tuple(model_cfg["mean"])
    std = tuple(d.std) if d.std is not None else tuple(model_cfg["std"])
    crop_pct = d.crop_pct if d.crop_pct is not None else model_cfg.get("crop_pct", 0.875)
    return size, mean, std, crop_pct, d.interpolation


def _imagefolder(cfg: RunConfig, model_cfg: dict) -> DataBundle:
    import timm.data

    check_data_paths(cfg)
    d = cfg.data
    size, mean, std, crop_pct, interpolation = _model_input(model_cfg, cfg)
    root = os.path.abspath(os.path.expanduser(d.root))
    train_tf = timm.data.create_transform(
        size, is_training=True, scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
        color_jitter=d.color_jitter or 0.0, auto_augment=d.auto_augment, interpolation=interpolation, mean=mean,
        std=std, re_prob=d.reprob, re_mode=d.remode, re_count=d.recount)
    eval_tf = timm.data.create_transform(size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                                         crop_pct=crop_pct)
    train_set = timm.data.create_dataset("", root=os.path.join(root, d.train_split), split=d.train_split,
                                         search_split=False, is_training=True, transform=train_tf)
    val_set = timm.data.create_dataset("", root=os.path.join(root, d.val_split), split=d.val_split,
                                       search_split=False, is_training=False, transform=eval_tf)
    if len(train_set) == 0:
        raise FileNotFoundError(f"data.train_split: no images under {os.path.join(root, d.train_split)}")
    classes = len(getattr(train_set.reader, "class_to_idx", {}) or {}) or None
    num_classes = d.num_classes or classes
    if num_classes is None:
        raise ConfigError("data.num_classes: could not be read from the data set; set it explicitly")
    return DataBundle(SeededSamples(train_set, cfg.train.seed), val_set, num_classes, size, mean, std)


def _canvas(cfg: RunConfig, model_cfg: dict) -> DataBundle:
    from dartmamba.data import ClutteredCanvas, digits_source

    c = cfg.data.canvas
    out = c.output_size or c.canvas_size
    size, mean, std, _, _ = _model_input(model_cfg, cfg)
    if tuple(size[1:]) != (out, out):
        raise ConfigError(f"data.canvas.output_size: the canvases are {out}x{out} but the model takes "
                          f"{size[1]}x{size[2]} input; make model.kwargs.img_size (and data.img_size if set) agree "
                          f"with data.canvas.output_size (or canvas_size)")
    common = dict(canvas_size=c.canvas_size, object_size=tuple(c.object_size), num_distractors=tuple(c.num_distractors),
                  fragment_fraction=tuple(c.fragment_fraction), distractor_contrast=tuple(c.distractor_contrast),
                  noise_std=c.noise_std, background=tuple(c.background), channels=size[0], tint=c.tint,
                  output_size=c.output_size, mean=mean, std=std)
    train_images, train_labels = digits_source("train", c.val_fraction, c.split_seed)
    val_images, val_labels = digits_source("val", c.val_fraction, c.split_seed)
    train_set = ClutteredCanvas(train_images, train_labels, length=c.train_length, seed=mix_seed(c.seed, 0),
                                resample_per_epoch=True, **common)
    val_set = ClutteredCanvas(val_images, val_labels, length=c.val_length, seed=mix_seed(c.seed, 1), **common)
    num_classes = cfg.data.num_classes or train_set.num_classes
    return DataBundle(train_set, val_set, num_classes, size, mean, std)


def _video_canvas(cfg: RunConfig, model_cfg: dict) -> DataBundle:
    from dartmamba.data import MovingDigitClips, digits_source

    c, v = cfg.data.canvas, cfg.data.video
    out = c.output_size or c.canvas_size
    size, mean, std, _, _ = _model_input(model_cfg, cfg)
    frames = model_cfg.get("num_frames")
    if frames is None:
        raise ConfigError(f"data.kind: 'video_canvas' needs a video model (input (B, C, T, H, W)), and "
                          f"{cfg.model.name} takes images")
    if (frames, *size[1:]) != (v.num_frames, out, out):
        raise ConfigError(f"data.video.num_frames / data.canvas.output_size: the clips are {v.num_frames} frames of "
                          f"{out}x{out} but the model takes {frames} frames of {size[1]}x{size[2]}; make "
                          f"model.kwargs.num_frames / img_size agree with them")
    common = dict(num_frames=v.num_frames, speed=tuple(v.speed), frame_noise_std=v.frame_noise_std,
                  num_decoys=v.num_decoys,
                  canvas_size=c.canvas_size, object_size=tuple(c.object_size), num_distractors=tuple(c.num_distractors),
                  fragment_fraction=tuple(c.fragment_fraction), distractor_contrast=tuple(c.distractor_contrast),
                  background=tuple(c.background), channels=size[0], tint=c.tint, output_size=c.output_size,
                  mean=mean, std=std)
    train_images, train_labels = digits_source("train", c.val_fraction, c.split_seed)
    val_images, val_labels = digits_source("val", c.val_fraction, c.split_seed)
    train_set = MovingDigitClips(train_images, train_labels, length=c.train_length, seed=mix_seed(c.seed, 0),
                                 resample_per_epoch=True, **common)
    val_set = MovingDigitClips(val_images, val_labels, length=c.val_length, seed=mix_seed(c.seed, 1), **common)
    return DataBundle(train_set, val_set, cfg.data.num_classes, (size[0], v.num_frames, *size[1:]), mean, std)


def build_data(cfg: RunConfig, model_cfg: dict) -> DataBundle:
    """Both data sets; ``model_cfg`` (:func:`model_data_config`) gives the defaults for input size, mean, std."""
    builders = {"canvas": _canvas, "video_canvas": _video_canvas}
    return builders.get(cfg.data.kind, _imagefolder)(cfg, model_cfg)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def train_loader(bundle: DataBundle, cfg: RunConfig, rank: int, world_size: int, epoch: int) -> DataLoader:
    """The loader of one epoch: a DistributedSampler shuffled by (seed, epoch), full batches only."""
    sampler = DistributedSampler(bundle.train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    sampler.set_epoch(epoch)
    if hasattr(bundle.train_set, "set_epoch"):
        bundle.train_set.set_epoch(epoch)
    return DataLoader(bundle.train_set, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                      worker_init_fn=_worker_init, persistent_workers=False)


def steps_per_epoch(bundle: DataBundle, cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per epoch and rank (after the optional ``train.steps_per_epoch`` cap, in optimizer updates)."""
    per_rank = len(bundle.train_set) // world_size
    batches = per_rank // cfg.train.batch_size
    if batches < cfg.train.grad_accum:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} x "
                          f"{world_size} process(es) needs more than the {len(bundle.train_set)} training samples")
    batches -= batches % cfg.train.grad_accum
    if cfg.train.steps_per_epoch is not None:
        batches = min(batches, cfg.train.steps_per_epoch * cfg.train.grad_accum)
    return batches


def val_loader(bundle: DataBundle, cfg: RunConfig, rank: int, world_size: int) -> DataLoader:
    return DataLoader(bundle.val_set, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                      sampler=ShardSampler(len(bundle.val_set), rank, world_size), drop_last=False,
                      num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
                      worker_init_fn=_worker_init)


def updates_per_epoch(bundle: DataBundle, cfg: RunConfig, world_size: int) -> int:
    return math.ceil(steps_per_epoch(bundle, cfg, world_size) / cfg.train.grad_accum)
