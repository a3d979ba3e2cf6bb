"""Video tokenizers: the fixed spatiotemporal grid and DART over the frame stack."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from dartmamba import backends
from dartmamba.tokenizer import (SpatiotemporalHead, VideoDartTokenizer, VideoGridTokenizer, VideoScorer,
                                 resample_patches, resolve_score_mode, spatiotemporal_pos_embed, stack_frames,
                                 tokens_per_frame, unstack_frames, video_num_rows, video_scores)
from dartmamba.tokenizer.video import TemporalDifferenceHead


def small_dart(**overrides):
    cfg = dict(img_size=32, patch_size=8, num_frames=3, embed_dim=24, trunk="tiny_cnn")
    cfg.update(overrides)
    return VideoDartTokenizer(**cfg)


def grid_patches(video, patch):
    """The fixed grid's patches, (t, h, w) order: (B, C, T, H, W) -> (B, T * h * w, C, p, p)."""
    return rearrange(video, "b c t (h p) (w q) -> b (t h w) c p q", p=patch, q=patch)


def test_video_num_rows_is_the_authors_rule():
    assert video_num_rows(1568, 8) == 112           # 14 rows per frame
    assert video_num_rows(196 * 16, 16) == 224
    assert video_num_rows(784, 8) == int(math.sqrt(98) * 8) == 79
    assert video_num_rows(64, 4) == 16
    assert video_num_rows(3, 8) == 3                # never more bands than tokens


def test_stack_frames_puts_frame_t_at_rows_t_h(seed):
    video = torch.randn(2, 3, 4, 5, 6)
    tall = stack_frames(video)
    assert tall.shape == (2, 3, 20, 6)
    for t in range(4):
        assert torch.equal(tall[:, :, 5 * t:5 * t + 5], video[:, :, t])
    assert torch.equal(unstack_frames(tall, 4), video)


def test_spatiotemporal_pos_embed_is_videomamba_spatial_plus_temporal(seed):
    spatial, temporal = torch.randn(1, 6, 8), torch.randn(1, 3, 8)
    grid = spatiotemporal_pos_embed(spatial, temporal)
    assert grid.shape == (1, 18, 8)
    for t in range(3):
        for n in range(6):
            assert torch.equal(grid[0, t * 6 + n], spatial[0, n] + temporal[0, t])


@pytest.mark.parametrize("scale", [1, 2], ids=["videomamba-geometry", "half-resolution"])
def test_uniform_scores_reproduce_the_fixed_spatiotemporal_grid(scale, seed):
    """Constant scores, N = T * Gh * Gw: the geometry is the integer grid, the patches are the fixed grid's bit for bit
    (of the frames subsampled at stride ``scale``), the positional embeddings are the grid's, and the tokens are
    VideoMamba's Conv3d patch embedding with the same weights."""
    frames, patch, grid = 3, 8, 4
    dart = small_dart(img_size=grid * patch * scale, grid_size=grid, uniform_scores=True)
    fixed = VideoGridTokenizer(img_size=grid * patch, patch_size=patch, num_frames=frames, embed_dim=24)
    fixed.proj.load_state_dict(dart.proj.state_dict())
    video = torch.randn(2, 3, frames, grid * patch * scale, grid * patch * scale)
    sub = video[..., ::scale, ::scale]
    pos = torch.randn(1, frames * grid * grid, 24)
    out = dart(video, pos)
    geometry = out.geometry
    assert dart.num_rows == frames * grid and geometry.num_tokens == frames * grid * grid
    assert torch.equal(geometry.band_bounds[0], torch.arange(frames * grid + 1, dtype=torch.float32))
    assert torch.equal(geometry.token_edges[1], torch.arange(frames * grid * grid + 1, dtype=torch.float32) * 1.0)
    patches = resample_patches(stack_frames(video), geometry, patch)
    assert torch.equal(patches, grid_patches(sub, patch))
    assert torch.equal(out.pos_embed, pos.expand(2, -1, -1))
    expected = fixed(sub, pos)
    torch.testing.assert_close(out.tokens, expected.tokens, rtol=1e-5, atol=1e-5)
    assert torch.equal(expected.pos_embed, pos)
    # the maps features_only returns agree too (area scatter of DART == reshape of the grid)
    torch.testing.assert_close(dart.to_feature_map(out.tokens, out), fixed.to_feature_map(out.tokens, expected),
                               rtol=1e-6, atol=1e-6)


def test_uniform_identity_in_float64_is_exact_to_rounding(seed):
    dart = small_dart(uniform_scores=True).double()
    fixed = VideoGridTokenizer(img_size=32, patch_size=8, num_frames=3, embed_dim=24).double()
    fixed.proj.load_state_dict(dart.proj.state_dict())
    video = torch.randn(2, 3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(dart(video).tokens, fixed(video).tokens, rtol=1e-12, atol=1e-12)


def test_scores_follow_the_authors_formula(seed):
    """Independent, literal version of the authors' scorer on the trunk features (loops over frames)."""
    torch.manual_seed(seed)
    tokenizer = small_dart(num_frames=4, score_mode="authors")
    head = tokenizer.scorer.head
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    video = torch.randn(2, 3, 4, 32, 32)
    features = tokenizer.scorer.features(video)                                     # (B, T, C, h, w)
    assert features.shape == (2, 4, 64, 4, 4)
    batch, frames = features.shape[:2]
    strengths = []
    context = features[:, 1:].mean(dim=(1, 3, 4))                                    # (B, C)
    gate = torch.sigmoid(context @ head.gate.weight.t() + head.gate.bias)
    for t in range(1, frames):
        diff = (features[:, t] - features[:, t - 1]).permute(0, 2, 3, 1)             # (B, h, w, C)
        strengths.append((F.relu(diff @ head.motion.weight.t() + head.motion.bias) * gate[:, None, None]).sum(-1))
    strength = torch.stack(strengths, 1).reshape(batch, -1)
    strength = (strength - strength.mean(1, keepdim=True)) / (strength.std(1, keepdim=True) + 1e-8)
    strength = torch.sigmoid((strength - 1) * 1.5)
    expected = torch.cat([torch.full((batch, 16), 0.5), strength], 1).view(batch, 4 * 4, 4)
    # the tokenizer's score grid (4x4 per frame) is the trunk's, so no resize happens
    torch.testing.assert_close(tokenizer.scores(video), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokenizer(video).scores, expected.view(batch, 4, 4, 4), rtol=1e-5, atol=1e-6)


def test_single_frame_clips_get_constant_scores_from_the_authors_formula(seed):
    tokenizer = small_dart(num_frames=1, num_tokens=16, score_mode="authors")
    scores = tokenizer.scores(torch.randn(2, 3, 1, 32, 32))
    assert torch.equal(scores, torch.full((2, 4, 4), 0.5))
    assert video_scores(torch.zeros(2, 0, 4, 4)).shape == (2, 4, 4)


def test_a_static_frame_gets_fewer_tokens_than_a_frame_that_changes(seed):
    """Authors' scores: frames 0 and 1 identical (no motion), frame 2 changes: frame 2 holds more tokens than
    frame 1."""
    tokenizer = small_dart(num_frames=3, num_tokens=48, score_mode="authors")
    with torch.no_grad():
        tokenizer.scorer.head.motion.weight.copy_(torch.eye(64))
        tokenizer.scorer.head.motion.bias.zero_()
    video = torch.randn(2, 3, 1, 32, 32).repeat(1, 1, 3, 1, 1)
    video[:, :, 2, 8:24, 8:24] += 2.0
    counts = tokens_per_frame(tokenizer(video).geometry, 3)
    torch.testing.assert_close(counts.sum(1), torch.full((2,), 48.0))
    assert (counts[:, 2] > 1.5 * counts[:, 1]).all(), counts


@pytest.mark.parametrize("trunk", ["tiny_cnn", "mobilenetv3_small_s16"])
def test_gradients_reach_the_scorer_head_through_the_video_geometry(trunk, seed):
    tokenizer = small_dart(img_size=64, grid_size=4, num_frames=3, num_tokens=40, trunk=trunk)
    pos = torch.randn(1, 3 * 16, 24, requires_grad=True)
    out = tokenizer(torch.randn(2, 3, 3, 64, 64), pos)
    (out.tokens.square().mean() + out.pos_embed.sin().mean()).backward()
    for name in ("motion.weight", "motion.bias", "gate.weight", "gate.bias"):
        grad = tokenizer.scorer.head.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    frozen = trunk != "tiny_cnn"
    trunk_grads = [p.grad for p in tokenizer.scorer.trunk.parameters()]
    assert all(g is None for g in trunk_grads) if frozen else all(g is not None for g in trunk_grads)
    assert pos.grad.abs().sum() > 0


def test_the_stride_16_trunk_is_torchvision_features_8(seed):
    """``mobilenetv3_small_s16`` is the authors' cut: torchvision mobilenet_v3_small ``features[:8]`` (48 channels,
    stride 16): loaded from torchvision's weights it computes the same features."""
    import torchvision

    reference = torchvision.models.mobilenet_v3_small().features[:8].eval()
    tokenizer = VideoDartTokenizer(img_size=64, patch_size=16, num_frames=2, embed_dim=8)
    trunk = tokenizer.scorer.trunk
    trunk.load_torchvision_state_dict(reference.state_dict())
    frames = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(frames), reference(frames), rtol=1e-4, atol=1e-4)
    assert trunk.out_chans == 48 and trunk(frames).shape == (3, 48, 4, 4)
    assert not any(p.requires_grad for p in trunk.parameters())


def test_given_scores_drive_the_geometry_and_are_checked(seed):
    tokenizer = small_dart()
    video = torch.randn(2, 3, 3, 32, 32)
    scores = torch.rand(2, 3, 4, 4) + 0.1
    out = tokenizer(video, scores=scores)
    assert torch.equal(out.scores, scores)
    direct = tokenizer.geometry(video, scores)
    assert torch.equal(out.geometry.token_edges, direct.token_edges)
    with pytest.raises(ValueError, match=r"scores must have shape \(B, 3, 4, 4\) \(B, T, Gh, Gw\), got \(2, 12, 4\)"):
        tokenizer(video, scores=scores.flatten(1, 2))
    bad = scores.clone()
    bad[1, 2, 0, 3] = 0.0
    with pytest.raises(ValueError, match=r"scores must be finite and > 0; scores\[1, 8, 3\] = 0.0"):
        tokenizer(video, scores=bad)


def test_bad_inputs_are_clear_errors():
    tokenizer = small_dart()
    with pytest.raises(ValueError, match=r"video must have shape \(B, 3, 3, 32, 32\) \(B, C, T, H, W\), "
                                         r"got \(1, 3, 4, 32, 32\)"):
        tokenizer(torch.randn(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match=r"video must have shape \(B, C, T, H, W\)"):
        tokenizer(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="video must be a floating-point tensor"):
        tokenizer(torch.zeros(1, 3, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="video is an empty batch"):
        tokenizer(torch.randn(0, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 0"):
        small_dart(num_frames=0)
    with pytest.raises(ValueError, match=r"num_rows must be an int in \[1, num_tokens=5\], got 6"):
        small_dart(num_tokens=5, num_rows=6)
    with pytest.raises(ValueError, match="first_frame_score must be a number > 0, got 0"):
        small_dart(first_frame_score=0)
    with pytest.raises(ValueError, match="first_frame_score must be a number > 0, got -1"):
        small_dart(score_mode="authors", first_frame_score=-1)
    with pytest.raises(ValueError, match=r"first_frame_score: score_mode='content' scores frame 0 from its content; "
                                         r"a constant first-frame score \(0.25\) belongs to score_mode='authors'"):
        small_dart(score_mode="content", first_frame_score=0.25)
    with pytest.raises(ValueError, match=r"score_mode must be one of \('content', 'authors'\), got 'motion'"):
        small_dart(score_mode="motion")
    with pytest.raises(ValueError, match=r"score_mode must be one of \('content', 'authors'\), got 'v2'"):
        VideoScorer.check_head("v2")
    grid = VideoGridTokenizer(img_size=32, patch_size=8, num_frames=3, embed_dim=8)
    with pytest.raises(ValueError, match=r"video must have shape \(B, 3, 3, 32, 32\)"):
        grid(torch.randn(1, 3, 3, 32, 24))
    with pytest.raises(ValueError, match=r"num_tokens: a fixed 3x4x4 spatiotemporal grid has 48 tokens, got 40"):
        VideoGridTokenizer(img_size=32, patch_size=8, num_frames=3, num_tokens=40)
    with pytest.raises(ValueError, match="num_frames=3 must be a multiple of tubelet_size=2"):
        VideoGridTokenizer(img_size=32, patch_size=8, num_frames=3, tubelet_size=2)


def test_grid_tubelets_follow_videomamba_kernel_size(seed):
    grid = VideoGridTokenizer(img_size=16, patch_size=8, num_frames=4, tubelet_size=2, embed_dim=8)
    video = torch.randn(2, 3, 4, 16, 16)
    out = grid(video)
    assert grid.feature_grid == (2, 2, 2) and out.tokens.shape == (2, 8, 8)
    expected = F.conv3d(video, grid.proj.weight, grid.proj.bias, stride=(2, 8, 8))
    torch.testing.assert_close(out.tokens, rearrange(expected, "b d t h w -> b (t h w) d"))
    torch.testing.assert_close(grid.to_feature_map(out.tokens, out), expected)


def test_video_dart_traces_without_graph_breaks(seed):
    tokenizer = small_dart(num_tokens=30)
    pos = torch.randn(1, 48, 24)

    def step(video):
        out = tokenizer(video, pos)
        return out.tokens.sum() + out.pos_embed.sum()

    explanation = torch._dynamo.explain(step)(torch.randn(2, 3, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_video_dart_uses_the_image_stages_dispatch(monkeypatch, seed):
    """The partition, resampling and positional-embedding stages go through the backend registry (one dispatch
    point each), as for images: forcing a backend reaches it."""
    calls = []
    original = backends.dispatch

    def spy(op, device, *args, **kwargs):
        calls.append((op, kwargs.get("backend")))
        return original(op, device, *args, **kwargs)

    monkeypatch.setattr(backends, "dispatch", spy)
    tokenizer = small_dart(resample_backend="torch", partition_backend="torch", posembed_backend="torch")
    tokenizer(torch.randn(1, 3, 3, 32, 32), torch.randn(1, 48, 24))
    assert {op for op, _ in calls} >= {"partition", "resample", "posembed"}
    assert all(backend == "torch" for op, backend in calls if op in ("partition", "resample", "posembed"))


@pytest.mark.gpu
def test_video_dart_on_cuda_matches_the_torch_stages(seed):
    """On CUDA the stages dispatch to the Triton kernels where they take the shapes; same tokens as torch."""
    auto = small_dart(img_size=64, grid_size=8, num_frames=4, num_tokens=96).cuda().eval()
    forced = small_dart(img_size=64, grid_size=8, num_frames=4, num_tokens=96, resample_backend="torch",
                        partition_backend="torch", posembed_backend="torch").cuda().eval()
    forced.load_state_dict(auto.state_dict())
    video = torch.randn(3, 3, 4, 64, 64, device="cuda")
    pos = torch.randn(1, 4 * 64, 24, device="cuda")
    with torch.no_grad():
        a, b = auto(video, pos), forced(video, pos)
    torch.testing.assert_close(a.geometry.token_edges, b.geometry.token_edges, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.pos_embed, b.pos_embed, rtol=1e-4, atol=1e-4)
    # the Triton kernels take the frame stack (4 x 64 rows) and its 32 x 8 score grid
    tall = stack_frames(video)
    assert backends.resolve("resample", video.device, tall, a.geometry, 8, "paper").name == "triton"
    assert backends.resolve("partition", video.device, auto.scores(video), 96, auto.num_rows).name == "triton"


def test_temporal_head_of_one_frame_is_empty():
    head = TemporalDifferenceHead(8)
    assert head(torch.randn(2, 1, 8, 3, 3)).shape == (2, 0, 3, 3)


# ----------------------------------------------------------------------------------------------------------------
# Content scores (the default): every frame from its own content, one scale
# ----------------------------------------------------------------------------------------------------------------
def content_strength_reference(head, features):
    """Literal version of :class:`SpatiotemporalHead`, loops over frames and their neighbours.
    (B, T, C, h, w) -> (B, T, h, w)."""
    batch, frames = features.shape[:2]
    gate = torch.sigmoid(features.mean(dim=(1, 3, 4)) @ head.gate.weight.t() + head.gate.bias)      # (B, C)
    out = []
    for t in range(frames):
        here = features[:, t].permute(0, 2, 3, 1)                                     # (B, h, w, C)
        detail = (here * gate[:, None, None]).sum(-1) * head.detail_weight
        motions = []
        for n in (t - 1, t + 1):
            if 0 <= n < frames:
                diff = here - features[:, n].permute(0, 2, 3, 1)
                motions.append((F.relu(diff @ head.motion.weight.t() + head.motion.bias) * gate[:, None, None]).sum(-1))
        motion = sum(motions) / len(motions) if motions else torch.zeros_like(detail)
        out.append(detail + motion)
    return torch.stack(out, 1)


@pytest.mark.parametrize("frames", [1, 2, 4, 5])
def test_content_scores_follow_their_formula(frames, seed):
    torch.manual_seed(seed)
    tokenizer = small_dart(num_frames=frames, num_tokens=4 * frames + 3)
    assert tokenizer.scorer.score_mode == "content" and tokenizer.scorer.first_frame_score is None
    head = tokenizer.scorer.head
    assert isinstance(head, SpatiotemporalHead) and head.detail_weight.item() == 0.0
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    video = torch.randn(2, 3, frames, 32, 32)
    features = tokenizer.scorer.features(video)
    strength = content_strength_reference(head, features)
    torch.testing.assert_close(head(features), strength, rtol=1e-5, atol=1e-5)
    flat = strength.reshape(2, -1)
    standardised = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-8)
    expected = torch.sigmoid((standardised - 1) * 1.5).view(2, frames * 4, 4)
    torch.testing.assert_close(tokenizer.scores(video), expected, rtol=1e-5, atol=1e-6)


def test_content_scores_give_a_static_frame_0_no_more_tokens_than_the_others(seed):
    """A static scene with one moving square: every frame (frame 0 included) holds about N / T tokens, and the
    square's cells score above the static ones in every frame, frame 0 too (the authors' constant gives frame 0
    most of the tokens on the same clip)."""
    torch.manual_seed(seed)
    frames, size = 4, 64
    video = (0.3 * torch.randn(2, 3, 1, size, size)).repeat(1, 1, frames, 1, 1)
    video = video + 0.03 * torch.randn_like(video)
    for t in range(frames):
        video[:, :, t, 8 + 6 * t:28 + 6 * t, 12:32] += 1.5
    content = small_dart(img_size=size, grid_size=8, num_frames=frames, num_tokens=64)
    authors = small_dart(img_size=size, grid_size=8, num_frames=frames, num_tokens=64, score_mode="authors")
    authors.scorer.load_state_dict(content.scorer.state_dict(), strict=False)
    with torch.no_grad():
        counts = tokens_per_frame(content(video).geometry, frames)
        scores = content.scores(video).view(2, frames, 8, 8)
        authors_counts = tokens_per_frame(authors(video).geometry, frames)
    torch.testing.assert_close(counts.sum(1), torch.full((2,), 64.0))
    later = counts[:, 1:].mean(1)
    assert (counts[:, 0] <= 1.5 * later).all() and (counts[:, 0] >= later / 1.5).all(), counts
    assert (authors_counts[:, 0] > 1.5 * authors_counts[:, 1:].mean(1)).all(), authors_counts
    for t in range(frames):
        on_square = scores[:, t, (8 + 6 * t) // 8 + 1, 2]                           # a cell inside the square
        assert (on_square > scores[:, t, 7, 7]).all(), (t, scores[:, t])            # a static corner cell


def test_content_detail_weight_learns_and_scores_single_frames(seed):
    """detail_weight starts at 0 (tokens follow motion), receives a gradient through the geometry, and once non-zero
    scores a single frame by its content (a one-frame clip has no motion)."""
    torch.manual_seed(seed)
    tokenizer = small_dart(img_size=64, grid_size=4, num_frames=3, num_tokens=40)
    pos = torch.randn(1, 3 * 16, 24)
    out = tokenizer(torch.randn(2, 3, 3, 64, 64), pos)
    (out.tokens.square().mean() + out.pos_embed.square().mean()).backward()
    assert tokenizer.scorer.head.detail_weight.grad.abs().item() > 0
    single = small_dart(num_frames=1, num_tokens=16)
    video = torch.randn(2, 3, 1, 32, 32)
    assert torch.equal(single.scores(video), torch.full((2, 4, 4), torch.sigmoid(torch.tensor(-1.5)).item()))
    with torch.no_grad():
        single.scorer.head.detail_weight.fill_(1.0)
    assert single.scores(video).std(dim=(1, 2)).min() > 0.1
    single.init_weights()
    assert single.scorer.head.detail_weight.item() == 0.0


def test_score_mode_resolution():
    assert resolve_score_mode(None, None) == ("content", None)
    assert resolve_score_mode(None, 0.25) == ("authors", 0.25)      # a config saved before score_mode existed
    assert resolve_score_mode("authors", None) == ("authors", 0.5)
    assert resolve_score_mode("content", None) == ("content", None)
    assert isinstance(small_dart(first_frame_score=0.3).scorer.head, TemporalDifferenceHead)
    assert "score_mode='content'" in repr(small_dart())
