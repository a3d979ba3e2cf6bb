"""Dense prediction on DART features: a tiny segmentation head on a Vim backbone, trained to segment the object of
cluttered canvases (``CanvasSample.mask``), on CPU in seconds.

The backbone is any registered model built with ``features_only=True`` (timm's feature-extraction wrapper over our
``forward_intermediates``): a fixed grid gives its patch-grid maps, DART gives its tokens scattered back onto the
score grid by area (:func:`dartmamba.tokenizer.tokens_to_map`), so the same head works on both.

    python -m dartmamba.demos.segment_canvas                        # Vim-DART and fixed-grid Vim, 16 tokens each
    python -m dartmamba.demos.segment_canvas --steps 300 --models dart

Prints the loss curve, the loss of the best constant prediction (the mask's pixel prior: a head that learned
nothing spatial cannot beat it) and the validation IoU of each model.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SegmentationModel", "SegmentationResult", "canvas_masks", "prior_bce", "mask_iou", "train_segmentation",
           "DEMO_MODELS"]

# The demo's canvas models (docs/demo.md): 16 tokens each; DART reads the 64x64 canvas, the fixed grid 32x32.
_BACKBONE = {"embed_dim": 64, "depth": 4, "d_state": 8, "expand": 1, "patch_size": 8}
DEMO_MODELS = {
    "dart": ("vim_tiny_dart", {**_BACKBONE, "img_size": 64, "grid_size": 8, "num_tokens": 16,
                               "dart_cfg": {"trunk": "tiny_cnn", "head": "v2"}}),
    "fixed": ("vim_tiny_patch16_224", {**_BACKBONE, "img_size": 32}),
}
_CANVAS = {"canvas_size": 64, "object_size": (24, 32), "num_distractors": (3, 6), "fragment_fraction": (0.3, 0.5),
           "distractor_contrast": (0.4, 0.8), "noise_std": 0.03, "background": (0.0, 0.2)}


class SegmentationModel(nn.Module):
    """A ``features_only`` backbone + a small convolutional head -> one mask logit per input pixel.

    forward: images (B, C, H, W) -> logits (B, H, W) (the head's coarse map, bilinearly upsampled).
    """

    def __init__(self, backbone: str, out_indices: tuple[int, ...] = (-2, -1), hidden: int = 32, **kwargs):
        super().__init__()
        import timm

        import dartmamba.models  # noqa: F401  (registers the models)

        self.backbone = timm.create_model(backbone, features_only=True, out_indices=out_indices, **kwargs)
        channels = sum(self.backbone.feature_info.channels())
        self.head = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        maps = self.backbone(images)
        logits = self.head(torch.cat(maps, dim=1))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def canvas_masks(split: str, length: int, seed: int, output_size: int | None = None, **canvas) -> tuple[Tensor, Tensor]:
    """Canvases of the digits ``split`` and their object masks: (images (L, 3, S, S) normalised to [-1, 1],
    masks (L, S, S) in [0, 1])."""
    from dartmamba.data import ClutteredCanvas, digits_source

    images, labels = digits_source(split)
    data = ClutteredCanvas(images, labels, length=length, seed=seed, output_size=output_size, channels=3,
                           resample_per_epoch=False, **{**_CANVAS, **canvas})
    samples = [data.render(i) for i in range(length)]
    return (torch.stack([s.image for s in samples]) - 0.5) / 0.5, torch.stack([s.mask for s in samples])


def prior_bce(masks: Tensor) -> float:
    """BCE of the best constant prediction (the mean mask value everywhere): the bar a spatial model must beat."""
    p = masks.mean().clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(p.expand_as(masks), masks).item()


def mask_iou(logits: Tensor, masks: Tensor, threshold: float = 0.5) -> float:
    """IoU of the predicted (sigmoid >= 0.5) and true (>= ``threshold``) masks over the whole batch."""
    pred, true = logits.sigmoid() >= 0.5, masks >= threshold
    union = (pred | true).sum().item()
    return (pred & true).sum().item() / union if union else 1.0


@dataclass
class SegmentationResult:
    name: str
    losses: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    val_prior: float = math.nan
    val_iou: float = math.nan
    seconds: float = 0.0


def train_segmentation(name: str, model_kwargs: dict, *, steps: int = 150, batch_size: int = 32, lr: float = 2e-3,
                       train_length: int = 1024, val_length: int = 128, seed: int = 0,
                       canvas: dict | None = None) -> SegmentationResult:
    """Train backbone + head end to end (AdamW, BCE on the soft masks) for ``steps`` updates; evaluate on
    validation canvases. The input size is the model's ``img_size`` (a fixed grid sees the canvas area-averaged)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    img_size = model_kwargs.get("img_size")
    if not isinstance(img_size, int):
        raise ValueError(f"model_kwargs['img_size'] must be an int (the square input side), got {img_size!r}")
    canvas = dict(canvas or {})
    images, masks = canvas_masks("train", train_length, seed, img_size, **canvas)
    val_images, val_masks = canvas_masks("val", val_length, seed + 1, img_size, **canvas)
    torch.manual_seed(seed)
    model = SegmentationModel(name, **model_kwargs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    result = SegmentationResult(name)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(model(images[batch]), masks[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
    result.seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in val_images.split(64)])
    result.val_loss = F.binary_cross_entropy_with_logits(logits, val_masks).item()
    result.val_prior = prior_bce(val_masks)
    result.val_iou = mask_iou(logits, val_masks)
    return result


def main(argv: list[str] | None = None) -> list[SegmentationResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS), choices=list(DEMO_MODELS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = []
    for key in args.models:
        name, kwargs = DEMO_MODELS[key]
        result = train_segmentation(name, kwargs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    seed=args.seed)
        results.append(result)
        curve = "  ".join(f"{result.losses[i]:.3f}" for i in range(0, len(result.losses),
                                                                     max(1, len(result.losses) // 6)))
        print(f"{key:5s} {name}: train loss {curve} ... {result.losses[-1]:.3f} ({result.seconds:.0f} s); "
              f"val loss {result.val_loss:.3f} (constant prior {result.val_prior:.3f}), val IoU {result.val_iou:.3f}")
    return results


if __name__ == "__main__":
    main()
