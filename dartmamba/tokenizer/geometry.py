"""The DART partition as data: computed once by :mod:`.partition`, read everywhere else."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DartGeometry:
    """Band boundaries and token edges of a batch, plus the sizes that give them pixel units.

    Attributes:
        band_bounds: (B, R + 1), strictly increasing on [0, Gh] (score-grid rows).
        token_edges: (B, N + 1), strictly increasing on [0, Gw * R] (raster units: band r covers
            [r * Gw, (r + 1) * Gw)).
        grid_size: (Gh, Gw) of the score map.
        img_size: (H, W) of the image in pixels.
    """

    band_bounds: Tensor
    token_edges: Tensor
    grid_size: tuple[int, int]
    img_size: tuple[int, int]

    @property
    def batch_size(self) -> int:
        return self.band_bounds.shape[0]

    @property
    def num_rows(self) -> int:
        return self.band_bounds.shape[1] - 1

    @property
    def num_tokens(self) -> int:
        return self.token_edges.shape[1] - 1

    @property
    def pixels_per_cell(self) -> tuple[float, float]:
        return self.img_size[0] / self.grid_size[0], self.img_size[1] / self.grid_size[1]

    @property
    def band_bounds_px(self) -> Tensor:
        """(B, R + 1) band boundaries in image rows (pixel units, continuous)."""
        return self.band_bounds * self.pixels_per_cell[0]

    @property
    def token_edges_px(self) -> Tensor:
        """(B, N + 1) token edges along the strip of bands, in pixel columns (band r starts at r * W)."""
        return self.token_edges * self.pixels_per_cell[1]

    def token_extents(self) -> dict[str, Tensor]:
        """Where each token lies in the image, in pixel units.

        A token covers the strip interval [start, end); it begins in band ``band_start`` at column ``x_start``
        and ends in band ``band_end`` at column ``x_end`` (``band_end > band_start`` when it straddles bands).

        Returns a dict of (B, N) tensors: ``band_start``, ``band_end`` (long), ``x_start``, ``x_end``,
        ``y_start`` / ``y_end`` (top of the first band, bottom of the last band), ``width`` (strip length).
        """
        width_px = float(self.img_size[1])
        grid_w = self.grid_size[1]
        start, end = self.token_edges[:, :-1], self.token_edges[:, 1:]
        band_start = torch.div(start, grid_w, rounding_mode="floor").long().clamp_(0, self.num_rows - 1)
        band_end = (torch.ceil(end / grid_w).long() - 1).clamp_(0, self.num_rows - 1)
        band_end = torch.maximum(band_end, band_start)
        x_start = (start - band_start.to(start.dtype) * grid_w) * self.pixels_per_cell[1]
        x_end = (end - band_end.to(end.dtype) * grid_w) * self.pixels_per_cell[1]
        bounds_px = self.band_bounds_px
        return {
            "band_start": band_start,
            "band_end": band_end,
            "x_start": x_start,
            "x_end": x_end.clamp(max=width_px),
            "y_start": torch.gather(bounds_px, 1, band_start),
            "y_end": torch.gather(bounds_px, 1, band_end + 1),
            "width": (end - start) * self.pixels_per_cell[1],
        }

    def detach(self) -> "DartGeometry":
        return DartGeometry(self.band_bounds.detach(), self.token_edges.detach(), self.grid_size, self.img_size)

    def to(self, *args, **kwargs) -> "DartGeometry":
        return DartGeometry(self.band_bounds.to(*args, **kwargs), self.token_edges.to(*args, **kwargs),
                            self.grid_size, self.img_size)

    def __getitem__(self, index) -> "DartGeometry":
        """Select samples: ``geometry[0:2]``, ``geometry[mask]``."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return DartGeometry(self.band_bounds[index], self.token_edges[index], self.grid_size, self.img_size)
