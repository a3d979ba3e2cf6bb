import pytest
import torch

from dartmamba.tokenizer import partition, token_cell_areas, tokens_to_map, uniform_geometry


@pytest.mark.parametrize("map_size", [(14, 14), (7, 7), (28, 28), (5, 9)])
def test_every_cell_is_fully_covered_by_tokens(map_size, seed):
    scores = torch.exp(8 * torch.rand(3, 14, 14, dtype=torch.float64))
    scores[0] = 1e-6
    scores[0, 3, 4] = 1e6                                     # one extreme spike
    geometry = partition(scores, 196, img_size=448)
    areas = token_cell_areas(geometry, map_size)
    cell_area = (448 / map_size[0]) * (448 / map_size[1])
    torch.testing.assert_close(areas.sum(1), torch.full((3, *map_size), cell_area, dtype=torch.float64))
    assert (areas.sum(1) > 0).all()
    # and every token's area is fully accounted for: its strip length in each band times that band's height
    widths = geometry.token_extents()["width"]
    assert (areas.sum((2, 3)) > 0).all()
    torch.testing.assert_close(areas.sum((1, 2, 3)), torch.full((3,), 448.0 * 448.0, dtype=torch.float64))
    torch.testing.assert_close(widths, torch.diff(geometry.token_edges_px, dim=1))
    torch.testing.assert_close(widths.sum(1), torch.full((3,), 448.0 * geometry.num_rows, dtype=torch.float64))
    edges, bands = geometry.token_edges_px, geometry.band_bounds_px
    band_lo = torch.arange(geometry.num_rows, dtype=torch.float64) * 448.0
    inside = (torch.minimum(edges[:, 1:, None], band_lo + 448.0) - torch.maximum(edges[:, :-1, None], band_lo))
    token_area = (inside.clamp_min(0) * torch.diff(bands, dim=1)[:, None, :]).sum(-1)      # (B, N)
    torch.testing.assert_close(areas.sum((2, 3)), token_area)


def test_uniform_geometry_gives_the_fixed_grid_map(seed):
    tokens = torch.randn(2, 196, 5)
    feature_map = tokens_to_map(tokens, uniform_geometry(2, 14, 196, img_size=448))
    torch.testing.assert_close(feature_map, tokens.transpose(1, 2).reshape(2, 5, 14, 14), rtol=0, atol=1e-6)


def test_map_cells_are_area_weighted_means(seed):
    """Against brute force on a 1/4-pixel raster, exact because every boundary lies on a whole pixel."""
    from dartmamba.tokenizer import DartGeometry

    generator = torch.Generator().manual_seed(seed)
    num_rows, num_tokens = 3, 10
    inner_bands = torch.randperm(31, generator=generator)[:num_rows - 1].sort().values + 1
    inner_edges = torch.randperm(32 * num_rows - 1, generator=generator)[:num_tokens - 1].sort().values + 1
    bands_px = torch.cat([torch.tensor([0]), inner_bands, torch.tensor([32])]).double()
    edges_px = torch.cat([torch.tensor([0]), inner_edges, torch.tensor([32 * num_rows])]).double()
    geometry = DartGeometry(bands_px[None] / 8, edges_px[None] / 8, (4, 4), (32, 32))   # 8 px per grid cell
    tokens = torch.randn(1, num_tokens, 2, dtype=torch.float64, generator=generator)
    feature_map = tokens_to_map(tokens, geometry, (4, 4))
    step = 1 / 4
    coords = torch.arange(0, 32, step, dtype=torch.float64) + step / 2
    band = torch.searchsorted(bands_px, coords, right=True) - 1                        # per y
    strip = band[:, None] * 32 + coords[None, :]                                      # (y, x) strip position
    owner = torch.searchsorted(edges_px, strip.reshape(-1), right=True).reshape(strip.shape) - 1
    brute = tokens[0, owner].reshape(4, 32, 4, 32, 2).mean((1, 3)).permute(2, 0, 1)
    torch.testing.assert_close(feature_map[0], brute, rtol=0, atol=1e-12)


def test_shape_error_names_tokens():
    with pytest.raises(ValueError, match=r"tokens must have shape \(B=2, N=16, D\)"):
        tokens_to_map(torch.randn(2, 15, 3), uniform_geometry(2, 4, 16))
