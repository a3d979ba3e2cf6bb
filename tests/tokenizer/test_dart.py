"""The DartTokenizer module end to end."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from dartmamba.tokenizer import DartTokenizer


def small_tokenizer(**overrides):
    cfg = dict(img_size=64, patch_size=8, grid_size=8, num_tokens=64, embed_dim=32, trunk="tiny_cnn")
    cfg.update(overrides)
    return DartTokenizer(**cfg)


def test_outputs_and_shapes(seed):
    tokenizer = small_tokenizer(num_tokens=50)
    pos = torch.randn(1, 64, 32)
    out = tokenizer(torch.randn(3, 3, 64, 64), pos)
    assert out.tokens.shape == (3, 50, 32) and out.pos_embed.shape == (3, 50, 32)
    assert out.scores.shape == (3, 8, 8) and out.geometry.num_rows == 7 and out.geometry.num_tokens == 50
    assert tokenizer(torch.randn(2, 3, 64, 64)).pos_embed is None


def test_uniform_scores_reduce_to_patch_embedding_of_the_subsampled_image(seed):
    """Paper geometry (448, G=14, p=16): DART with constant scores == Conv2d patch embedding at stride 2."""
    tokenizer = DartTokenizer(embed_dim=48, uniform_scores=True, trunk_weights="random")
    images = torch.randn(2, 3, 448, 448)
    pos = torch.randn(1, 196, 48)
    out = tokenizer(images, pos)
    expected = rearrange(tokenizer.proj(images[:, :, ::2, ::2]), "b d h w -> b (h w) d")
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pos_embed, pos.expand(2, -1, -1), rtol=0, atol=1e-10)
    assert tokenizer.geometry_scale == 2.0


@pytest.mark.parametrize("head", ["v1", "v2"])
def test_gradients_reach_every_trainable_scorer_parameter(head, seed):
    tokenizer = small_tokenizer(num_tokens=40, head=head)
    pos = torch.randn(1, 64, 32, requires_grad=True)
    out = tokenizer(torch.randn(2, 3, 64, 64), pos)
    (out.tokens.square().mean() + out.pos_embed.sin().mean()).backward()
    named = dict(tokenizer.named_parameters())
    scorer_params = {k: v for k, v in named.items() if k.startswith("scorer.") and v.requires_grad}
    assert len(scorer_params) >= 4
    # v1's last bias shifts every raw score by the same amount, which standardisation removes: its gradient is zero
    # in exact arithmetic (rounding noise at most), every other parameter's is not
    shift_only = {"scorer.head.fc2.bias"} if head == "v1" else set()
    for name, param in scorer_params.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name in shift_only:
            assert param.grad.abs().sum() <= 1e-5 * named["scorer.head.fc2.weight"].grad.abs().sum(), name
        else:
            assert param.grad.abs().sum() > 0, f"zero gradient on {name} (seed={seed})"
    assert pos.grad.abs().sum() > 0


def first_image_with_another_batch(score_norm: str):
    """(tokenizer, images, its output, its output when every image but the first is replaced)."""
    tokenizer = small_tokenizer(num_tokens=40, score_norm=score_norm).eval()
    images = torch.randn(4, 3, 64, 64)
    other = images.clone()
    other[1:] = torch.randn(3, 3, 64, 64) * 3
    return tokenizer, images, tokenizer(images), tokenizer(other)


def test_per_sample_tokens_ignore_the_rest_of_the_batch(seed):
    _, _, a, b = first_image_with_another_batch("sample")
    torch.testing.assert_close(a.tokens[0], b.tokens[0], rtol=0, atol=0)
    assert torch.equal(a.geometry.token_edges[0], b.geometry.token_edges[0])


def test_batch_global_normalisation_reproduces_the_official_batch_dependence(seed):
    tokenizer, images, a, b = first_image_with_another_batch("batch")
    assert not torch.allclose(a.geometry.token_edges[0], b.geometry.token_edges[0])
    # The official rule: one mean/std over the whole batch of raw scores.
    raw = tokenizer.scorer.raw_scores(images)
    expected = torch.sigmoid(2 * (raw - raw.mean()) / (raw.std() + 1e-8))
    torch.testing.assert_close(a.scores, expected)


def test_bad_inputs_are_clear_errors():
    tokenizer = small_tokenizer(num_tokens=40)
    with pytest.raises(ValueError, match=r"images must be 64x64 \(B, C, 64, 64\), got \(1, 3, 32, 64\)"):
        tokenizer(torch.randn(1, 3, 32, 64))
    with pytest.raises(ValueError, match=r"images must have 3 channels"):
        tokenizer(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        tokenizer(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images is an empty batch"):
        tokenizer(torch.randn(0, 3, 64, 64))
    with pytest.raises(ValueError, match=r"images must have shape \(B, C, H, W\)"):
        tokenizer(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"num_rows must be an int in \[1, num_tokens=5\], got 6"):
        small_tokenizer(num_tokens=5, num_rows=6)
    with pytest.raises(ValueError, match="num_tokens must be a positive int, got 0"):
        small_tokenizer(num_tokens=0)
    with pytest.raises(ValueError, match="sampling must be one of"):
        small_tokenizer(sampling="nearest")
    with pytest.raises(TypeError, match="img_size must be an int or a pair of ints"):
        small_tokenizer(img_size="64")
    images = torch.randn(2, 3, 64, 64)
    bad = torch.rand(2, 8, 8) + 0.1
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"scores must be finite and > 0; scores\[1, 2, 3\] = nan"):
        tokenizer(images, scores=bad)
    bad[1, 2, 3] = 0.0
    with pytest.raises(ValueError, match=r"scores must be finite and > 0; scores\[1, 2, 3\] = 0.0"):
        tokenizer(images, scores=bad)
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"scores must be finite and > 0"):
        tokenizer(images, scores=bad)
    with pytest.raises(ValueError, match=r"scores must have shape \(B, Gh, Gw\)"):
        tokenizer(images, scores=torch.rand(2, 64) + 1)


@pytest.mark.parametrize("options", [{}, dict(scorer_channels_last=True, scorer_dtype="bfloat16")],
                         ids=["default", "channels_last-bf16"])
def test_tokenizer_traces_without_graph_breaks(options, seed):
    tokenizer = small_tokenizer(num_tokens=40, **options)
    pos = torch.randn(1, 64, 32)

    def step(images):
        out = tokenizer(images, pos)
        return out.tokens.sum() + out.pos_embed.sum()

    explanation = torch._dynamo.explain(step)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_tokenizer_matches_eager(seed):
    tokenizer = small_tokenizer(num_tokens=40)
    pos = torch.randn(1, 64, 32)
    images = torch.randn(2, 3, 64, 64)
    eager = tokenizer(images, pos)
    compiled = torch.compile(tokenizer, backend="aot_eager", fullgraph=True)(images, pos)
    torch.testing.assert_close(compiled.tokens, eager.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.pos_embed, eager.pos_embed, rtol=1e-5, atol=1e-5)
