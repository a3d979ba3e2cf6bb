"""Gradients of the partition where quantiles land exactly on bin ends (uniform and tied score maps), against
float64 finite differences, for the torch reference and the Triton kernel (interpreter on CPU).

A quantile ``q = j + (level - cdf_{j-1}) / (cdf_j - cdf_{j-1})`` with ``j`` = first bin whose cdf >= level sits on
the end of bin ``j`` when ``level == cdf_j`` (every interior quantile of a uniform map). Its derivative there is
the one-sided derivative of bin ``j``'s formula, which the official DART code (no clamp) gives; a ``clamp(0, 1)``
on the fraction gave 0. On uniform maps both sides agree (adjacent bins hold equal mass), so central differences
apply; on tied maps with unequal neighbours the test differentiates on the side where bin ``j`` stays in charge.
"""
import pytest
import torch

from dartmamba.tokenizer import inverse_cdf_quantiles, partition_scores_torch

H = 1e-6


def _triton():
    pytest.importorskip("triton")
    from dartmamba_kernels.geometry import interpreted, partition_triton

    if not interpreted():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return partition_triton


def partition_fn(backend):
    return partition_scores_torch if backend == "torch" else _triton()


def outputs(bands, edges):
    """The interior band bounds and token edges, side by side: (B, R - 1 + N - 1)."""
    return torch.cat([bands[:, 1:-1], edges[:, 1:-1]], dim=1)


def jacobian(fn, scores, num_tokens, num_rows):
    """d outputs / d scores of one map (1, Gh, Gw) by autograd: (outputs, Gh * Gw)."""
    scores = scores.clone().requires_grad_()
    out = outputs(*fn(scores, num_tokens, num_rows))[0]
    rows = [torch.autograd.grad(o, scores, retain_graph=True)[0].flatten() for o in out]
    return torch.stack(rows)


def perturbed(scores, steps):
    """(len(steps) * Gh * Gw, Gh, Gw): ``scores`` with each cell moved by each step (one batch for one launch)."""
    cells = scores[0].numel()
    eye = torch.eye(cells, dtype=torch.float64).view(cells, *scores.shape[1:])
    return torch.cat([scores + step * eye for step in steps])


def central_differences(fn, scores, num_tokens, num_rows):
    cells = scores[0].numel()
    out = outputs(*fn(perturbed(scores, (H, -H)), num_tokens, num_rows))
    return ((out[:cells] - out[cells:]) / (2 * H)).t()


def quantile_bins(masses, parts):
    """The bins ``searchsorted`` picks for the interior quantiles of (B, L) masses: (B, parts - 1)."""
    cdf = masses.cumsum(1) / masses.sum(1, keepdim=True)
    levels = (torch.arange(1, parts, dtype=torch.float64) / parts).expand(len(masses), -1).contiguous()
    return torch.searchsorted(cdf, levels)


def one_sided_differences(values, bins, x):
    """d values / d x for every output k and input cell i by second-order one-sided differences, each on the side
    where output k's bin stays the one ``searchsorted`` picks at ``x`` (the bin whose formula applies).

    values, bins: batch (B, *shape) -> (B, K); x: (1, *shape) float64. Returns (K, cells).
    """
    cells = x[0].numel()
    batch = perturbed(x, (H, 2 * H, -H, -2 * H))
    out, out_bins = values(batch).view(4, cells, -1), bins(batch).view(4, cells, -1)
    base, base_bins = values(x)[0], bins(x)[0]
    forward = (-3 * base + 4 * out[0] - out[1]) / (2 * H)
    backward = (3 * base - 4 * out[2] + out[3]) / (2 * H)
    keeps_forward = (out_bins[0] == base_bins) & (out_bins[1] == base_bins)
    keeps_backward = (out_bins[2] == base_bins) & (out_bins[3] == base_bins)
    assert (keeps_forward | keeps_backward).all()
    return torch.where(keeps_forward, forward, backward).t()


def uniform_map(grid_h, grid_w, value=1.0):
    return torch.full((1, grid_h, grid_w), value, dtype=torch.float64)


# (grid, N, R): the regular grid (every quantile on a bin end), other token / band counts (some on bin ends)
UNIFORM_CASES = [((4, 4), 16, 4), ((3, 5), 15, 3), ((4, 4), 8, 2), ((4, 3), 6, 3), ((2, 6), 4, 1)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grid, num_tokens, num_rows", UNIFORM_CASES)
def test_uniform_maps_gradients_match_central_differences(backend, grid, num_tokens, num_rows, seed):
    fn = partition_fn(backend)
    value = float(torch.empty(()).uniform_(0.1, 10.0))
    scores = uniform_map(*grid, value)
    analytic = jacobian(fn, scores, num_tokens, num_rows)
    numeric = central_differences(partition_scores_torch, scores, num_tokens, num_rows)
    assert analytic.abs().max() > 1e-3            # not the all-zero gradient a clamp at the bin ends gives
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6 / value, msg=f"seed={seed}")


def test_the_regular_grids_last_band_boundary_has_the_official_gradient():
    """Uniform 4 x 4, 16 tokens: the last interior band boundary (3) moves by -1/16 per unit of score in the top
    three rows and +3/16 in the bottom one (cell masses 1/16; finite differences give the same)."""
    scores = uniform_map(4, 4).requires_grad_()
    bands, _ = partition_scores_torch(scores, 16, 4)
    (grad,) = torch.autograd.grad(bands[0, -2], scores)
    expected = torch.tensor([-1.0, -1.0, -1.0, 3.0], dtype=torch.float64)[:, None].expand(4, 4) / 16
    torch.testing.assert_close(grad[0], expected, rtol=0, atol=1e-15)


def tied_map(stage, generator):
    """(scores, N, R, output, masses): a map whose median lands exactly on the end of bin 1, next to a heavier
    bin 2 (masses 1 : 1 : 2). ``"bands"``: the row masses (N = 1, R = 2, the middle band bound); ``"tokens"``: one
    band, so the flow is the column masses (N = 2, R = 1, the middle token edge)."""
    ratios = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    other = torch.rand(4 if stage == "bands" else 3, generator=generator, dtype=torch.float64) + 0.5
    if stage == "bands":
        return (ratios[:, None] * other[None])[None], 1, 2, 0, lambda s: s.sum(2)
    return (other[:, None] * ratios[None])[None], 2, 1, 1, lambda s: s.sum(1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("stage", ["bands", "tokens"])
def test_tied_maps_gradient_is_the_one_sided_derivative(backend, stage, seed):
    """The two sides of the bin end differ; the gradient is bin 1's side (the one the official formula uses)."""
    fn = partition_fn(backend)
    scores, num_tokens, num_rows, output, masses = tied_map(stage, torch.Generator().manual_seed(seed))
    assert fn(scores, num_tokens, num_rows)[output][0, 1].item() == 2.0               # on the end of bin 1
    scores.requires_grad_()
    (analytic,) = torch.autograd.grad(fn(scores, num_tokens, num_rows)[output][0, 1], scores)
    numeric = one_sided_differences(lambda s: partition_scores_torch(s, num_tokens, num_rows)[output][:, 1:-1],
                                    lambda s: quantile_bins(masses(s), 2), scores.detach())
    assert analytic.abs().max() > 1e-2
    torch.testing.assert_close(analytic.view(1, -1), numeric, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")


def test_quantiles_on_tied_masses_match_one_sided_differences(seed):
    """inverse_cdf_quantiles itself (both stages use it): ties next to lighter and heavier bins, every interior
    quantile on a bin end."""
    generator = torch.Generator().manual_seed(seed)
    for masses, parts in (([1.0, 1.0, 2.0, 0.5, 0.5, 1.0, 2.0], 2), ([2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 2.0, 4.0], 4)):
        masses = torch.tensor([masses], dtype=torch.float64) * (float(torch.rand((), generator=generator)) + 0.5)
        q = inverse_cdf_quantiles(masses, parts)[0, 1:-1]
        assert torch.equal(q, q.round()), q                          # every quantile on a bin end
        leaf = masses.clone().requires_grad_()
        out = inverse_cdf_quantiles(leaf, parts)[0, 1:-1]
        analytic = torch.stack([torch.autograd.grad(o, leaf, retain_graph=True)[0][0] for o in out])
        numeric = one_sided_differences(lambda m: inverse_cdf_quantiles(m, parts)[:, 1:-1],
                                        lambda m: quantile_bins(m, parts), masses)
        assert analytic.abs().max() > 1e-2
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")
