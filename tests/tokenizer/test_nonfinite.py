"""Non-finite inputs: an eager CPU forward names the bad pixel; compiled (fullgraph, so no host sync) and other
unchecked paths give the sample with a non-finite or non-positive score the regular partition instead of an invalid
one (an out-of-bounds index before), leaving the other samples' geometry bit for bit as it was."""
import contextlib

import pytest
import timm
import torch

import dartmamba  # noqa: F401
from dartmamba import backends
from dartmamba.tokenizer import partition_scores, uniform_geometry

from tests.helpers import TINY_DART, TINY_VIM, assert_valid_partition


def tokenizer():
    return timm.create_model("vim_tiny_dart", **TINY_VIM, **TINY_DART).patch_embed.eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_eager_forward_names_the_first_bad_pixel(value):
    images = torch.randn(3, 3, 64, 64)
    images[2, 1, 40, 7] = value
    images[2, 2, 50, 50] = value
    with pytest.raises(ValueError, match=rf"images must be finite; images\[2, 1, 40, 7\] = {value!r} \(a NaN or inf "
                                         r"pixel"):
        tokenizer()(images)
    with pytest.raises(ValueError, match=r"images\[2, 1, 40, 7\]"):
        timm.create_model("vim_tiny_dart", **TINY_VIM, **TINY_DART)(images)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_unchecked_partition_cuts_a_bad_sample_regularly(backend, bad, seed):
    if backend == "triton":
        pytest.importorskip("triton")
        from dartmamba_kernels.geometry import interpreted

        if not interpreted():
            pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 6, 6, generator=generator) + 0.1
    broken = scores.clone()
    broken[1, 2, 3] = bad
    with backends.allow_device("partition", "triton", "cpu") if backend == "triton" else contextlib.nullcontext():
        bands, edges = partition_scores(broken, 30, validate=False, backend=backend)
        want_bands, want_edges = partition_scores(scores, 30, backend=backend)
    regular = uniform_geometry(1, 6, 30)
    assert torch.equal(bands[1], regular.band_bounds[0]) and torch.equal(edges[1], regular.token_edges[0])
    for i in (0, 2):
        assert torch.equal(bands[i], want_bands[i]) and torch.equal(edges[i], want_edges[i])
    assert_valid_partition(bands, edges, 6, 6, 5, 30)
    with pytest.raises(ValueError, match=rf"scores must be finite and > 0; scores\[1, 2, 3\] = {bad!r}"):
        partition_scores(broken, 30, backend=backend)


def test_compiled_forward_without_host_sync_gives_a_nan_sample_the_regular_grid(seed):
    """torch.compile(fullgraph=True) (a host sync would be a graph break, an error here): the image with a NaN pixel
    gets the regular geometry, the clean one the geometry it has in eager mode, and its tokens are unchanged."""
    torch._dynamo.reset()
    module = tokenizer()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        clean = module(images)
        images[1, 0, 10, 10] = float("nan")
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(images)
    torch._dynamo.reset()
    regular = uniform_geometry(1, 4, module.num_tokens, img_size=64)
    assert torch.equal(compiled.geometry.band_bounds[1], regular.band_bounds[0])
    assert torch.equal(compiled.geometry.token_edges[1], regular.token_edges[0])
    # edges lie on [0, 64]: a float32 ulp there is up to 7.6e-6, and compiled code may round differently
    torch.testing.assert_close(compiled.geometry.token_edges[0], clean.geometry.token_edges[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.tokens[0], clean.tokens[0], rtol=1e-4, atol=1e-4)
    assert not torch.isfinite(compiled.tokens[1]).all()       # the NaN image's own tokens stay non-finite


OVERFLOW = "values that large overflow the scorer's arithmetic; normalise the images (e.g. to mean 0 and std 1)"


@pytest.mark.parametrize("value, dtype, shown", [(1e30, torch.float32, "1e+30"), (-3e25, torch.float32, "3e+25"),
                                                 (1e300, torch.float64, "1e+300")])
def test_finite_but_huge_pixels_name_the_images_not_the_scores(value, dtype, shown, monkeypatch):
    """The scorer overflows on finite pixels of 1e30 (float64 images of 1e300 already in the cast to the weights'
    float32): the error names the user's images, the image, and how far its values reach."""
    from dartmamba.tokenizer import dart

    images = torch.randn(3, 3, 64, 64, dtype=dtype)
    images[1, 0, 5:60, 3:50] = value
    message = (f"images: the DART scorer produced non-finite scores for image 1 (its values reach {shown}; "
               f"scores[1, 0, 0] = nan): {OVERFLOW}")
    with pytest.raises(ValueError) as err:
        tokenizer()(images)
    assert str(err.value) == message and err.value.__cause__ is None
    with pytest.raises(ValueError) as err:
        timm.create_model("vim_tiny_dart", **TINY_VIM, **TINY_DART)(images)
    assert str(err.value) == message
    # the images are read only on the error path: a clean batch never calls the explanation
    monkeypatch.setattr(dart, "scorer_failure", lambda *args: pytest.fail("scorer_failure on the happy path"))
    assert torch.isfinite(tokenizer()(images[[0, 2]]).tokens).all()


def test_batch_score_norm_names_the_image_that_spoiled_the_batch():
    """score_norm='batch' (official checkpoints) standardises over the batch: image 2's overflow makes image 0's
    scores NaN too; the error names image 2 as the cause."""
    module = tokenizer()
    module.scorer.score_norm = "batch"
    images = torch.randn(3, 3, 64, 64)
    images[2] = 1e30
    with pytest.raises(ValueError) as err:
        module(images)
    assert str(err.value) == (
        f"images: the DART scorer produced non-finite scores for image 0 (scores[0, 0, 0] = nan): image 2's values "
        f"reach 1e+30, and score_norm='batch' standardises the scores over the whole batch; {OVERFLOW}")


def scorer_error_on_ordinary_images(spoil) -> str:
    """The message of a tokenizer whose scorer ``spoil(module)`` damaged, on finite images whose values reach 2."""
    module = tokenizer()
    with torch.no_grad():
        spoil(module)
    images = torch.randn(2, 3, 64, 64).clamp(-2, 2)
    images[0, 0, 0, 0] = 2.0
    with pytest.raises(ValueError) as err:
        module(images)
    return str(err.value)


ORDINARY = ("images: the DART scorer produced non-finite scores for image 0 (its values reach 2; "
            "scores[0, 0, 0] = nan): ")


def test_nonfinite_scorer_weights_are_named_instead_of_the_images():
    """Finite, ordinary images and a NaN in the scorer (a diverged training step): the error says so."""
    def spoil(module):
        module.scorer.trunk.layers[4].weight[3] = float("nan")

    assert scorer_error_on_ordinary_images(spoil) == ORDINARY + (
        "the scorer's own weights are not finite (tensor 'trunk.layers.4.weight' holds NaN or inf), e.g. after a "
        "diverged training step")


def test_given_scores_are_still_named_as_scores():
    """Scores the user passes are the user's argument: their own message stays."""
    scores = torch.rand(2, 4, 4) + 0.1
    scores[1, 2, 3] = float("nan")
    with pytest.raises(ValueError) as err:
        tokenizer()(torch.randn(2, 3, 64, 64), scores=scores)
    assert str(err.value) == "scores must be finite and > 0; scores[1, 2, 3] = nan"


def test_finite_but_huge_scorer_weights_with_ordinary_images_blame_the_weights():
    """Ordinary images, finite weights scaled by 1e30 (a diverging run): the scorer overflows; the error says the
    images are fine and points at the weights."""
    def spoil(module):
        module.scorer.trunk.layers[0].weight.mul_(1e30)

    assert scorer_error_on_ordinary_images(spoil) == ORDINARY + (
        "the images and the scorer's weights are finite and the pixel values moderate, so the scorer's weights are "
        "likely too large (a diverging run?)")
