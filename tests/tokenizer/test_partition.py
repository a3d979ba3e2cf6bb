"""Partition invariants and quantile maths."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dartmamba.tokenizer import (default_num_rows, interval_means, inverse_cdf_quantiles, overlap_matrix, partition,
                                 partition_scores, uniform_geometry)
from tests.helpers import assert_uniform_is_regular, assert_valid_partition, degenerate_maps


@pytest.mark.parametrize("grid,num_tokens", [((14, 14), 196), ((14, 14), 121), ((14, 14), 392), ((8, 8), 64),
                                             ((7, 9), 50), ((14, 14), 1568), ((1, 5), 3), ((5, 1), 4)])
def test_partition_invariants_random_and_degenerate(grid, num_tokens, seed):
    """1,632 score maps in all (8 shapes x (192 random + 12 degenerate)), in float32 and float64: random (several
    distributions) and degenerate ones (spikes, constant maps of 1e-30 .. 1e30, a hot row / column / corner)."""
    generator = torch.Generator().manual_seed(seed)
    grid_h, grid_w = grid
    num_rows = default_num_rows(num_tokens)
    random_maps = torch.cat([
        torch.rand(48, grid_h, grid_w, generator=generator) + 1e-3,
        torch.rand(48, grid_h, grid_w, generator=generator) ** 8 + 1e-9,
        torch.exp(torch.randn(48, grid_h, grid_w, generator=generator) * 5),
        torch.sigmoid(torch.randn(48, grid_h, grid_w, generator=generator) * 3) + 0.1,
    ])
    maps = torch.cat([random_maps, degenerate_maps(grid_h, grid_w, generator)])
    for dtype in (torch.float32, torch.float64):
        bands, edges = partition_scores(maps.to(dtype), num_tokens)
        assert_valid_partition(bands, edges, grid_h, grid_w, num_rows, num_tokens, f"seed={seed} {dtype}")
        assert_uniform_is_regular(maps.to(dtype), bands, edges, f"seed={seed} {dtype}")


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 90), st.data())
def test_partition_invariants_hypothesis(grid_h, grid_w, num_tokens, data):
    log_scores = data.draw(st.lists(st.floats(-13.8, 13.8), min_size=grid_h * grid_w, max_size=grid_h * grid_w))
    scores = torch.tensor(log_scores, dtype=torch.float64).exp().view(1, grid_h, grid_w)
    num_rows = data.draw(st.integers(1, num_tokens))
    bands, edges = partition_scores(scores.float(), num_tokens, num_rows)
    assert_valid_partition(bands, edges, grid_h, grid_w, num_rows, num_tokens)


def test_quantiles_match_numpy_inverse_cdf(seed):
    """q = j + (p - cdf_{j-1}) / m_j with j the first bin whose cdf >= p, checked against np.interp."""
    generator = torch.Generator().manual_seed(seed)
    masses = torch.rand(5, 23, generator=generator, dtype=torch.float64) ** 3 + 1e-4
    bounds = inverse_cdf_quantiles(masses, 9)
    for row, got in zip(masses, bounds):
        cdf = np.concatenate([[0.0], np.cumsum(row.numpy())])
        cdf /= cdf[-1]
        expected = np.interp(np.arange(1, 9) / 9, cdf, np.arange(24))
        np.testing.assert_allclose(got[1:-1].numpy(), expected, rtol=0, atol=1e-12, err_msg=f"seed={seed}")


def test_equal_mass_per_band_and_token(seed):
    """Every band holds 1/R of the row mass and every token 1/N of the re-binned flow (the defining property)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 14, 14, generator=generator, dtype=torch.float64) ** 4 + 0.01
    bands, edges = partition_scores(scores, 196)
    pdf = scores / scores.sum(dim=(1, 2), keepdim=True)
    rows = overlap_matrix(bands, 14)
    band_mass = (rows * (bands[:, 1:] - bands[:, :-1])[..., None] * pdf.sum(2)[:, None]).sum(-1)
    torch.testing.assert_close(band_mass, torch.full_like(band_mass, 1 / 14), rtol=0, atol=1e-12)
    band_pdf = torch.einsum("bri,bic->brc", rows, pdf).reshape(3, -1)
    band_pdf = band_pdf / band_pdf.sum(-1, keepdim=True)
    tokens = overlap_matrix(edges, 196)
    token_mass = (tokens * (edges[:, 1:] - edges[:, :-1])[..., None] * band_pdf[:, None]).sum(-1)
    torch.testing.assert_close(token_mass, torch.full_like(token_mass, 1 / 196), rtol=0, atol=1e-12)


def test_uniform_scores_give_the_regular_grid():
    geometry = uniform_geometry(2, 14, 196, img_size=448)
    assert torch.equal(geometry.band_bounds, torch.arange(15.0).expand(2, -1))
    assert torch.equal(geometry.token_edges, torch.arange(197.0).expand(2, -1))
    assert torch.equal(geometry.band_bounds_px, 32 * torch.arange(15.0).expand(2, -1))


def test_interval_means_matches_overlap_matrix(seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(4, 17, 3, generator=generator, dtype=torch.float64)
    cuts = torch.sort(torch.rand(4, 6, generator=generator, dtype=torch.float64) * 17, dim=1).values
    bounds = torch.cat([torch.zeros(4, 1, dtype=torch.float64), cuts, torch.full((4, 1), 17.0, dtype=torch.float64)], 1)
    expected = torch.einsum("bkl,blf->bkf", overlap_matrix(bounds, 17), values)
    torch.testing.assert_close(interval_means(values, bounds), expected, rtol=0, atol=1e-12)


def test_partition_has_no_host_sync_and_traces_without_graph_breaks():
    scores = torch.rand(2, 6, 6) + 0.1

    def fn(s):
        bands, edges = partition_scores(s, 20, validate=False)
        return bands.sum() + edges.sum()

    explanation = torch._dynamo.explain(fn)(scores)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_partition_gradients_reach_scores(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.rand(2, 5, 6, generator=generator, dtype=torch.float64) + 0.2).requires_grad_()
    bands, edges = partition_scores(scores, 17)
    assert bands.dtype == torch.float64
    torch.autograd.gradcheck(lambda s: partition_scores(s, 17)[1][:, 1:-1], (scores,))
    torch.autograd.gradcheck(lambda s: partition_scores(s, 17)[0][:, 1:-1], (scores,))


def test_partition_geometry_object(seed):
    scores = torch.rand(3, 14, 14) + 0.1
    geometry = partition(scores, 196, img_size=448)
    assert geometry.num_rows == 14 and geometry.num_tokens == 196 and geometry.batch_size == 3
    extents = geometry.token_extents()
    assert (extents["band_end"] >= extents["band_start"]).all()
    assert (extents["x_start"] >= 0).all() and (extents["x_start"] < 448).all()
    assert (extents["x_end"] > 0).all() and (extents["x_end"] <= 448).all()
    assert (extents["y_end"] > extents["y_start"]).all()
    torch.testing.assert_close(extents["width"].sum(1), torch.full((3,), 448.0 * 14))
    single = (extents["band_end"] == extents["band_start"])
    torch.testing.assert_close((extents["x_end"] - extents["x_start"])[single], extents["width"][single])
    assert geometry[1].batch_size == 1 and torch.equal(geometry[1].token_edges, geometry.token_edges[1:2])


SCORES = torch.full((2, 4, 4), 0.5)
NUM_TOKENS = "num_tokens must be a positive int, got {!r}"


@pytest.mark.parametrize("call, message", [
    (lambda: partition(SCORES, -1), NUM_TOKENS.format(-1)),
    (lambda: partition(SCORES, 0), NUM_TOKENS.format(0)),
    (lambda: partition(SCORES, 2.5), NUM_TOKENS.format(2.5)),
    (lambda: partition(SCORES, True), NUM_TOKENS.format(True)),
    (lambda: partition(SCORES, "16"), NUM_TOKENS.format("16")),
    (lambda: partition(SCORES, 16, 0), "num_rows must be an int in [1, num_tokens=16], got 0"),
    (lambda: partition(SCORES, 16, 17), "num_rows must be an int in [1, num_tokens=16], got 17"),
    (lambda: partition(SCORES, 16, 2.0), "num_rows must be an int in [1, num_tokens=16], got 2.0"),
    (lambda: partition(SCORES, 16, img_size=0), "img_size must be positive, got 0"),
    (lambda: partition(SCORES, 16, img_size=(32, -32)), "img_size must be positive, got (32, -32)"),
    (lambda: partition_scores(SCORES, -3), NUM_TOKENS.format(-3)),
    (lambda: partition_scores(SCORES, -3, 2), NUM_TOKENS.format(-3)),
    (lambda: default_num_rows(-1), NUM_TOKENS.format(-1)),
    (lambda: default_num_rows(0), NUM_TOKENS.format(0)),
    (lambda: inverse_cdf_quantiles(SCORES[:, 0], 0),
     "num_parts must be a positive int (the number of equal-mass parts K), got 0"),
    (lambda: inverse_cdf_quantiles(SCORES[:, 0], -2),
     "num_parts must be a positive int (the number of equal-mass parts K), got -2"),
    (lambda: inverse_cdf_quantiles(SCORES, 3), "masses must be a tensor of shape (B, L) with L >= 1, got (2, 4, 4)"),
    (lambda: uniform_geometry(0, 4, 16), "batch must be a positive int, got 0"),
    (lambda: uniform_geometry(2, 0, 16), "grid_size must be positive, got 0"),
    (lambda: uniform_geometry(2, 4, -1), NUM_TOKENS.format(-1)),
    (lambda: uniform_geometry(2, 4, 16, 0), "num_rows must be an int in [1, num_tokens=16], got 0"),
    (lambda: overlap_matrix(torch.tensor([[0.0, 1.0, 2.0]]), 0),
     "length must be a positive int (the number of unit bins L), got 0"),
])
def test_integer_arguments_are_one_line_errors_naming_them(call, message):
    """``partition(scores, -1)`` raised ``TypeError: type complex doesn't define __round__ method`` (sqrt of -1
    before any check): every public partition function checks its integer arguments first, in one line."""
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


def test_the_integer_checks_come_before_any_value_check():
    """A bad num_tokens is reported, not the bad scores that the (later) value check would find."""
    scores = SCORES.clone()
    scores[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^num_tokens must be a positive int, got -1$"):
        partition(scores, -1)
