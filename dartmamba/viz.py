"""Drawing DART token layouts (matplotlib is imported lazily: it is a demo/test extra, not a base dependency)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokenizer.geometry import DartGeometry


def edge_energy_scores(images: Tensor, grid_size: tuple[int, int], floor: float = 0.05) -> Tensor:
    """A training-free score map: mean gradient magnitude per grid cell. (B, C, H, W) -> (B, Gh, Gw), > 0.

    Useful to show DART's adaptive layout without a trained scorer (detail attracts tokens).
    """
    gray = images.float().mean(dim=1, keepdim=True)
    dy = (gray[:, :, 1:, :] - gray[:, :, :-1, :]).abs()
    dx = (gray[:, :, :, 1:] - gray[:, :, :, :-1]).abs()
    energy = F.pad(dy, (0, 0, 0, 1)) + F.pad(dx, (0, 1, 0, 0))
    cells = F.adaptive_avg_pool2d(energy, grid_size)[:, 0]
    cells = cells / cells.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return cells + floor


def token_polygons(geometry: DartGeometry, sample: int = 0) -> list[list[tuple[float, float, float, float]]]:
    """Rectangles (x0, y0, x1, y1) in pixels covering each token of one sample (two or more if it straddles bands)."""
    bands = geometry.band_bounds_px[sample].detach().double().cpu().tolist()
    edges = geometry.token_edges_px[sample].detach().double().cpu().tolist()
    width = float(geometry.img_size[1])
    rects = []
    for start, end in zip(edges[:-1], edges[1:]):
        pieces, pos = [], start
        while pos < end - 1e-9:
            band = min(int(pos // width), len(bands) - 2)
            stop = min(end, (band + 1) * width)
            pieces.append((pos - band * width, bands[band], stop - band * width, bands[band + 1]))
            pos = stop
        rects.append(pieces)
    return rects


def draw_tokens(ax, image: Tensor, geometry: DartGeometry, sample: int = 0, color: str = "yellow",
                linewidth: float = 0.6, title: str | None = None) -> None:
    """Show ``image`` (C, H, W) with the outlines of every token of ``geometry[sample]``."""
    from matplotlib.patches import Rectangle

    picture = image.detach().float().cpu()
    picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
    if picture.shape[0] == 1:
        ax.imshow(picture[0], cmap="gray", interpolation="nearest")
    else:
        ax.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
    for pieces in token_polygons(geometry, sample):
        for x0, y0, x1, y1 in pieces:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                   linewidth=linewidth))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
