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
