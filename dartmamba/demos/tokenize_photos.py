"""Tokenize the photos bundled with scikit-learn with DART and draw the adaptive patches.

The scores come from edge energy (no trained scorer is needed and nothing is downloaded), so the picture shows
what the partition does: more, smaller regions where there is detail, every region resampled to p x p.

    python -m dartmamba.demos.tokenize_photos --out outputs/dart_tokens.png
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from einops import rearrange

from ..files import atomic_path


def load_photos(size: int) -> torch.Tensor:
    """(2, 3, size, size) float images in [0, 1] from ``sklearn.datasets.load_sample_images`` (ships with sklearn)."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255 for img in load_sample_images().images]
    squares = []
    for photo in photos:
        side = min(photo.shape[1:])
        top, left = (photo.shape[1] - side) // 2, (photo.shape[2] - side) // 2
        squares.append(F.interpolate(photo[None, :, top:top + side, left:left + side], size=(size, size),
                                     mode="bilinear", align_corners=False, antialias=True)[0])
    return torch.stack(squares)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/dart_tokens.png", help="PNG to write")
    parser.add_argument("--num-tokens", type=int, default=196, help="N tokens (default 196)")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--grid-size", type=int, default=14)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dartmamba.tokenizer import partition, resample_patches, uniform_geometry
    from dartmamba.viz import draw_tokens, edge_energy_scores

    images = load_photos(args.img_size)
    scores = edge_energy_scores(images, (args.grid_size, args.grid_size))
    geometry = partition(scores, args.num_tokens, img_size=args.img_size)
    patches = resample_patches(images, geometry, args.patch_size)               # (B, N, C, p, p)
    grid = uniform_geometry(len(images), args.grid_size, args.num_tokens, img_size=args.img_size)

    fig, axes = plt.subplots(len(images), 3, figsize=(12, 4 * len(images)), dpi=args.dpi)
    for i in range(len(images)):
        draw_tokens(axes[i, 0], images[i], grid, i, color="white", title=f"fixed grid, {args.num_tokens} tokens")
        draw_tokens(axes[i, 1], images[i], geometry, i, title=f"DART, {args.num_tokens} tokens (edge-energy scores)")
        side = int(round(args.num_tokens ** 0.5))
        shown = patches[i, : side * side]
        mosaic = rearrange(shown, "(r c) ch p q -> ch (r p) (c q)", r=side)
        axes[i, 2].imshow(mosaic.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[i, 2].set_title("the resampled DART patches, in token order", fontsize=8)
        axes[i, 2].set_xticks([])
        axes[i, 2].set_yticks([])
    fig.tight_layout()
    with atomic_path(args.out) as tmp:      # never leave a half-written PNG behind
        fig.savefig(tmp, format="png")
    plt.close(fig)
    widths = geometry.token_extents()["width"]
    summary = {"out": args.out, "tokens": args.num_tokens, "rows": geometry.num_rows,
               "min_token_width_px": float(widths.min()), "max_token_width_px": float(widths.max())}
    print(f"wrote {args.out}: {args.num_tokens} tokens in {geometry.num_rows} bands per image; token widths "
          f"{summary['min_token_width_px']:.1f}..{summary['max_token_width_px']:.1f} px (uniform grid: "
          f"{args.img_size / args.grid_size:.1f} px)")
    return summary


if __name__ == "__main__":
    main()
