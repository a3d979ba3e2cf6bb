"""Resampling: the literal grid_sample reference, the vectorised torch path, and the paper-mode identities."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from dartmamba.tokenizer import (DartGeometry, partition, partition_scores, resample_patches, resample_reference,
                                 resample_torch, uniform_geometry)


def stride2_patchify(images, patch):
    sub = images[:, :, ::2, ::2]
    return rearrange(sub, "b c (gh p) (gw q) -> b (gh gw) c p q", p=patch, q=patch)


def test_uniform_scores_are_stride2_subsampling_exactly(seed):
    """Paper mode, N = G * G: patches are the 448 image at stride 2, patchified 14 x 14. Bit-exact in fp32."""
    images = torch.randn(2, 3, 448, 448)
    geometry = uniform_geometry(2, 14, 196, img_size=448)
    expected = stride2_patchify(images, 16)
    assert torch.equal(resample_torch(images, geometry, 16, "paper"), expected)
    torch.testing.assert_close(resample_reference(images.double(), geometry.to(torch.float64), 16, "paper"),
                               expected.double(), rtol=0, atol=1e-9)


def test_uniform_scores_center_mode_is_2x2_average_pooling(seed):
    images = torch.randn(1, 3, 448, 448, dtype=torch.float64)
    geometry = uniform_geometry(1, 14, 196, img_size=448, dtype=torch.float64)
    pooled = rearrange(F.avg_pool2d(images, 2), "b c (gh p) (gw q) -> b (gh gw) c p q", p=16, q=16)
    torch.testing.assert_close(resample_torch(images, geometry, 16, "center"), pooled, rtol=0, atol=1e-9)


CASES = [  # (B, C, H, W, G, N, R, p)
    (2, 3, 448, 448, (14, 14), 196, None, 16),
    (1, 3, 96, 64, (6, 4), 30, None, 8),
    (3, 1, 40, 56, (5, 7), 13, 3, 5),
    (2, 4, 33, 47, (3, 3), 50, 9, 6),
    (1, 3, 64, 64, (8, 8), 8, 1, 4),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampling", ["paper", "center"])
@pytest.mark.parametrize("skew", [0.0, 8.0])
def test_vectorised_matches_literal_reference(case, sampling, skew, seed):
    batch, chans, height, width, grid, num_tokens, num_rows, p = case
    images = torch.randn(batch, chans, height, width, dtype=torch.float64)
    scores = torch.exp(skew * torch.rand(batch, *grid, dtype=torch.float64))
    geometry = partition(scores, num_tokens, num_rows, img_size=(height, width))
    fast = resample_torch(images, geometry, p, sampling)
    slow = resample_reference(images, geometry, p, sampling)
    assert fast.shape == (batch, num_tokens, chans, p, p)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-9, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("sampling", ["paper", "center"])
def test_gradients_match_literal_reference(sampling, seed):
    images = torch.randn(2, 2, 40, 48, dtype=torch.float64, requires_grad=True)
    scores = torch.exp(4 * torch.rand(2, 5, 6, dtype=torch.float64)).requires_grad_()
    grads = []
    weights = torch.randn(2, 23, 2, 6, 6, dtype=torch.float64)
    for fn in (resample_torch, resample_reference):
        geometry = partition(scores, 23, 4, img_size=(40, 48))
        (fn(images, geometry, 6, sampling) * weights).sum().backward()
        grads.append((images.grad.clone(), scores.grad.clone()))
        images.grad = scores.grad = None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-9)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-7, atol=1e-9)
    assert grads[0][1].abs().sum() > 0


@pytest.mark.parametrize("sampling", ["paper", "center"])
def test_finite_difference_pixels_wrt_scores(sampling, seed):
    """float64 gradcheck of the token pixels w.r.t. the scores (through quantiles and bilinear weights)."""
    images = torch.randn(1, 2, 24, 30, dtype=torch.float64)
    scores = (torch.rand(1, 3, 5, dtype=torch.float64) + 0.3).requires_grad_()

    def pixels(s):
        return resample_torch(images, partition(s, 7, 2, img_size=(24, 30)), 4, sampling)

    torch.autograd.gradcheck(pixels, (scores,), eps=1e-7, atol=1e-5)


def test_straddling_token_interpolates_across_the_seam_in_paper_mode():
    """Strip column u in (W-1, W) mixes column W-1 of band 0 with column 0 of band 1 (official behaviour);
    centre mode reads every sample from the band its own column lies in."""
    height, width = 8, 10
    images = torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width)
    bands = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)     # grid (2, 1): bands of 4 rows, strip 20 px
    geometry = DartGeometry(bands, torch.tensor([[0.0, 0.8, 1.3, 2.0]], dtype=torch.float64), (2, 1), (height, width))
    patch = resample_torch(images, geometry, 2, "paper")[0, 1, 0]  # token 1: strip px [8, 13), samples at 8, 10.5
    band0_row0, band1_row0 = images[0, 0, 0], images[0, 0, 4]
    assert patch[0, 0] == band0_row0[8]
    assert patch[0, 1] == 0.5 * band1_row0[0] + 0.5 * band1_row0[1]
    seam_geometry = DartGeometry(bands, torch.tensor([[0.0, 0.6, 1.3, 2.0]], dtype=torch.float64), (2, 1),
                                 (height, width))
    seam = resample_torch(images, seam_geometry, 2, "paper")[0, 1, 0]  # samples at 6 and 9.5: 9.5 is on the seam
    assert seam[0, 1] == 0.5 * band0_row0[9] + 0.5 * band1_row0[0]
    assert torch.equal(seam, resample_reference(images, seam_geometry, 2, "paper")[0, 1, 0])

    columns = torch.arange(width, dtype=torch.float64).expand(1, 1, height, width)
    center = resample_torch(columns, seam_geometry, 2, "center")[0, 1, 0, 0]
    # token [6, 13) px: centres at 7.75 (band 0, index 7.25) and 11.25 (band 1, index 0.75)
    torch.testing.assert_close(center, torch.tensor([7.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(center, resample_reference(columns, seam_geometry, 2, "center")[0, 1, 0, 0])


def test_last_token_fades_into_zero_padding_in_paper_mode():
    images = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    geometry = DartGeometry(torch.tensor([[0.0, 1.0]], dtype=torch.float64),
                            torch.tensor([[0.0, 0.9, 1.0]], dtype=torch.float64), (1, 1), (4, 4))  # one 4x4 band
    patch = resample_torch(images, geometry, 2, "paper")[0, 1, 0, 0]   # samples at strip 3.6 and 3.8
    torch.testing.assert_close(patch, torch.tensor([0.4, 0.2], dtype=torch.float64))
    torch.testing.assert_close(patch, resample_reference(images, geometry, 2, "paper")[0, 1, 0, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_images(dtype, seed):
    images = torch.randn(1, 3, 64, 64)
    geometry = partition(torch.rand(1, 8, 8) + 0.2, 64, img_size=64)
    low = resample_patches(images.to(dtype), geometry, 8)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), resample_torch(images, geometry, 8), rtol=2e-2, atol=2e-2)


def test_dispatch_rejects_unknown_and_unavailable_backends():
    images = torch.randn(1, 3, 16, 16)
    geometry = uniform_geometry(1, 4, 16, img_size=16)
    with pytest.raises(ValueError, match="backend for 'resample' must be one of"):
        resample_patches(images, geometry, 4, backend="cuda")
    from dartmamba.backends import BackendUnavailableError
    with pytest.raises(BackendUnavailableError, match="resample backend 'triton' runs on cuda tensors"):
        resample_patches(images, geometry, 4, backend="triton")
    with pytest.raises(ValueError, match="sampling must be one of"):
        resample_patches(images, geometry, 4, sampling="nearest")
