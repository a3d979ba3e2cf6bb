import pytest
import torch

from dartmamba.tokenizer import partition, resample_pos_embed, resample_pos_embed_reference, uniform_geometry


@pytest.mark.parametrize("grid,num_tokens,num_rows", [((14, 14), 196, None), ((14, 14), 392, None), ((5, 7), 23, 4),
                                                      ((6, 6), 121, None)])
def test_matches_explicit_overlap_matrices(grid, num_tokens, num_rows, seed):
    scores = torch.exp(6 * torch.rand(3, *grid, dtype=torch.float64))
    geometry = partition(scores, num_tokens, num_rows)
    pos = torch.randn(1, grid[0] * grid[1], 12, dtype=torch.float64)
    torch.testing.assert_close(resample_pos_embed(pos, geometry), resample_pos_embed_reference(pos, geometry),
                               rtol=0, atol=1e-12, msg=lambda m: f"seed={seed}: {m}")


def test_uniform_geometry_keeps_the_grid_embedding():
    pos = torch.randn(1, 196, 8)
    out = resample_pos_embed(pos, uniform_geometry(2, 14, 196))
    torch.testing.assert_close(out, pos.expand(2, -1, -1), rtol=0, atol=1e-10)


def test_per_sample_embeddings_and_gradients(seed):
    scores = (torch.rand(2, 4, 4, dtype=torch.float64) + 0.2).requires_grad_()
    pos = torch.randn(2, 16, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s, p: resample_pos_embed(p, partition(s, 11, 3)), (scores, pos))


def test_shape_errors_name_the_argument():
    geometry = uniform_geometry(2, 4, 16)
    with pytest.raises(ValueError, match=r"grid_pos_embed must have shape \(1 or B, 16, D\)"):
        resample_pos_embed(torch.randn(1, 17, 4), geometry)
    with pytest.raises(ValueError, match="grid_pos_embed batch must be 1 or 2"):
        resample_pos_embed(torch.randn(3, 16, 4), geometry)
