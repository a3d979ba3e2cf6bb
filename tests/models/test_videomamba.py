"""VideoMamba: the timm checklist for clips, sizes, the official layouts, image-checkpoint inflation, video-DART
identity, features, FLOPs."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange

import dartmamba.models  # noqa: F401  (registers the models)
from dartmamba.flops import count_model_flops
from dartmamba.models import VideoMamba
from dartmamba.models.checkpoints import (inflate_image_checkpoint, inflate_patch_weight, load_official_checkpoint,
                                          transfer_fixed_grid_weights)
from dartmamba.tokenizer.resample import resample_macs
from tests.models.checklist import check_timm_model
from tests.models.videomamba_cases import VIDEO_SMALL


def create(name, small=True, **kwargs):
    """The model at its small test size (``VIDEO_SMALL``), or at its registered size (``small=False``)."""
    return timm.create_model(name, **{**(VIDEO_SMALL.get(name, {}) if small else {}), **kwargs})


def clips(name, batch=2, **kwargs):
    cfg = {**VIDEO_SMALL[name], **kwargs}
    return torch.randn(batch, 3, cfg["num_frames"], cfg["img_size"], cfg["img_size"])


# ----------------------------------------------------------------------------------------------------------------
# timm's checklist, for (B, C, T, H, W) clips
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VIDEO_SMALL))
def test_timm_model_checklist_for_clips(name, seed):
    model = create(name, num_classes=7)
    video = clips(name)
    check_timm_model(model, video, 7, input_sizes=((224, 224),),
                     no_decay={"pos_embed", "cls_token", "temporal_pos_embedding"})
    assert model.patch_embed.proj.weight.dim() == 5                  # VideoMamba's Conv3d patch embedding
    features = model.forward_features(video)
    torch.testing.assert_close(model.forward_head(features), model(video))


@pytest.mark.parametrize("name", ["videomamba_tiny", "videomamba_tiny_dart"])
def test_features_only_returns_token_features_on_every_frame(name, seed):
    model = create(name, features_only=True, out_indices=(0, 1))
    cfg = VIDEO_SMALL[name]
    maps = model(clips(name))
    grid = cfg["img_size"] // cfg["patch_size"]
    assert [tuple(m.shape) for m in maps] == [(2, cfg["embed_dim"], cfg["num_frames"], grid, grid)] * 2
    assert model.feature_info.reduction() == [cfg["patch_size"]] * 2


def test_forward_intermediates_formats_and_the_dart_output(seed):
    model = create("videomamba_tiny_dart").eval()
    video = clips("videomamba_tiny_dart")
    out = model.forward_intermediates(video, indices=[0, 1], output_fmt="NCTHW", output_dict=True,
                                      return_prefix_tokens=True)
    assert [tuple(m.shape) for m in out["image_intermediates"]] == [(2, 32, 3, 4, 4)] * 2
    assert [tuple(p.shape) for p in out["image_intermediates_prefix"]] == [(2, 1, 32)] * 2
    assert out["image_features"].shape == (2, 31, 32)
    assert out["dart"].geometry.num_tokens == 30 and out["dart"].scores.shape == (2, 3, 4, 4)
    tokens = model.forward_intermediates(video, indices=1, output_fmt="NLC", intermediates_only=True)
    assert tokens[0].shape == (2, 30, 32)
    torch.testing.assert_close(model.patch_embed.to_feature_map(tokens[0], out["dart"]), out["image_intermediates"][1])
    with pytest.raises(ValueError, match="output_fmt must be 'NCTHW'"):
        model.forward_intermediates(video, output_fmt="NHWC")


def test_registered_sizes_are_videomamba_s(seed):
    expected = {"tiny": (192, 24), "small": (384, 24), "middle": (576, 32), "base": (768, 24)}
    for size, (dim, depth) in expected.items():
        for suffix in ("", "_dart"):
            model = create(f"videomamba_{size}{suffix}", small=False, device="meta")
            assert (model.embed_dim, len(model.layers)) == (dim, depth)
            assert model.pos_embed.shape == (1, 197, dim) and model.temporal_pos_embedding.shape == (1, 8, dim)
            assert model.patch_embed.proj.weight.shape == (dim, 3, 1, 16, 16)
            assert model.num_tokens == 8 * 196


@pytest.mark.parametrize("name", ["videomamba_middle", "videomamba_base_dart"])
def test_meta_device_allocates_nothing_and_dtype_reaches_every_tensor(name):
    model = create(name, small=False, device="meta")          # full size: ~100 M parameters, none allocated
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    small = create("videomamba_tiny_dart", dtype=torch.float64)
    floats = [t for t in list(small.parameters()) + list(small.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)
    video = clips("videomamba_tiny_dart").double()
    assert small(video).dtype == torch.float64


def test_class_token_first_with_spatial_plus_temporal_positions(seed):
    """The embedding written the way VideoMamba's forward_features writes it (Conv3d, (B T) x cells + pos_embed,
    (B cells) x T + temporal, class token first), then the model's own blocks and norm: the same logits."""
    model = create("videomamba_tiny", num_classes=5).eval()
    with torch.no_grad():
        model.temporal_pos_embedding.normal_()
        model.cls_token.normal_()
    video = clips("videomamba_tiny")
    x = model.patch_embed.proj(video)
    batch, dim, frames, height, width = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(batch * frames, height * width, dim)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    cls_tokens = x[:batch, :1]
    x = rearrange(x[:, 1:], "(b t) n m -> (b n) t m", b=batch, t=frames) + model.temporal_pos_embedding
    x = torch.cat([cls_tokens, rearrange(x, "(b n) t m -> b (t n) m", b=batch, t=frames)], dim=1)
    with torch.no_grad():
        hidden, residual, _ = model.run_layers(x)
        expected = model.head(model.final_norm(hidden, residual)[:, 0])
        torch.testing.assert_close(model(video), expected, rtol=1e-5, atol=1e-5)


def test_uniform_video_dart_with_grid_weights_equals_the_grid_model(seed):
    grid = create("videomamba_tiny", num_classes=5).eval()
    dart = create("videomamba_tiny_dart", num_tokens=48, num_classes=5,
                  tokenizer_cfg=dict(trunk="tiny_cnn", uniform_scores=True)).eval()
    report = transfer_fixed_grid_weights(dart, grid.state_dict())
    assert report.unexpected == [] and all(k.startswith("patch_embed.scorer.") for k in report.missing)
    video = clips("videomamba_tiny")
    with torch.no_grad():
        torch.testing.assert_close(dart(video), grid(video), rtol=1e-4, atol=1e-4)
        dart_maps = dart.forward_intermediates(video, indices=1, intermediates_only=True)
        grid_maps = grid.forward_intermediates(video, indices=1, intermediates_only=True)
        torch.testing.assert_close(dart_maps[0], grid_maps[0], rtol=1e-4, atol=1e-4)


def test_flops_include_the_video_tokenizer():
    kwargs = {k: v for k, v in VIDEO_SMALL["videomamba_tiny_dart"].items()}
    kwargs["num_tokens"] = 48                   # the grid's count: same backbone cost
    dart = count_model_flops("videomamba_tiny_dart", **kwargs)
    grid = count_model_flops("videomamba_tiny", **VIDEO_SMALL["videomamba_tiny"])
    assert dart.input_size == grid.input_size == (3, 3, 32, 32) and dart.num_tokens == grid.num_tokens == 48
    assert dart.parts["backbone"] == grid.parts["backbone"] > 0 and dart.scan == grid.scan > 0
    assert dart.parts["embed"] == grid.parts["embed"] == 48 * 32 * 3 * 8 * 8
    assert dart.parts["resample"] == resample_macs(1, 48, 3, 8)
    # the tiny CNN on 3 frames of 32x32: 3 convolutions per frame
    trunk = 3 * (16 * 16 * 16 * 3 * 9 + 8 * 8 * 32 * 16 * 9 + 4 * 4 * 64 * 32 * 9)
    assert dart.parts["scorer_trunk"] == trunk
    assert dart.parts["scorer_head"] >= 2 * 4 * 4 * 64 * 64       # motion on 2 differences of 4x4 cells
    assert dart.parts["posembed"] > 0 and dart.total > grid.total
    assert grid.parts["scorer_trunk"] == grid.parts["resample"] == grid.parts["posembed"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint layouts, from the key lists of the official model definitions
# ----------------------------------------------------------------------------------------------------------------
def videomamba_official_state(embed_dim, depth, num_frames, grid, patch, num_classes, d_state=16, generator=None):
    """A state dict in OpenGVLab/VideoMamba's ``VisionMamba`` (video_sm) layout, written from its module tree:
    ``cls_token``, ``pos_embed``, ``temporal_pos_embedding``, ``patch_embed.proj`` (Conv3d, kernel (1, p, p)),
    ``head``, ``layers.i.mixer`` (mamba_simple.Mamba with bimamba: A_log, D, in_proj, conv1d, x_proj, dt_proj, and
    A_b_log, conv1d_b, x_proj_b, dt_proj_b, D_b; out_proj; no biases on the projections), ``layers.i.norm``
    (mamba's RMSNorm: weight only), ``norm_f``."""
    inner, rank = 2 * embed_dim, math.ceil(embed_dim / 16)
    shapes = {"cls_token": (1, 1, embed_dim), "pos_embed": (1, grid * grid + 1, embed_dim),
              "temporal_pos_embedding": (1, num_frames, embed_dim),
              "patch_embed.proj.weight": (embed_dim, 3, 1, patch, patch), "patch_embed.proj.bias": (embed_dim,),
              "head.weight": (num_classes, embed_dim), "head.bias": (num_classes,)}
    for i in range(depth):
        mixer = f"layers.{i}.mixer."
        shapes.update({mixer + "A_log": (inner, d_state), mixer + "D": (inner,),
                       mixer + "in_proj.weight": (2 * inner, embed_dim), mixer + "conv1d.weight": (inner, 1, 4),
                       mixer + "conv1d.bias": (inner,), mixer + "x_proj.weight": (rank + 2 * d_state, inner),
                       mixer + "dt_proj.weight": (inner, rank), mixer + "dt_proj.bias": (inner,),
                       mixer + "A_b_log": (inner, d_state), mixer + "conv1d_b.weight": (inner, 1, 4),
                       mixer + "conv1d_b.bias": (inner,), mixer + "x_proj_b.weight": (rank + 2 * d_state, inner),
                       mixer + "dt_proj_b.weight": (inner, rank), mixer + "dt_proj_b.bias": (inner,),
                       mixer + "D_b": (inner,), mixer + "out_proj.weight": (embed_dim, inner),
                       f"layers.{i}.norm.weight": (embed_dim,)})
    shapes["norm_f.weight"] = (embed_dim,)
    return {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in shapes.items()}


def authors_dart_video_state(embed_dim, depth, num_frames, patch, num_classes, generator=None):
    """The authors' ``DVisionMamba`` (ykx3/DART video/videomamba.py) layout: VideoMamba's top level (``pos_embed``
    always 1 + 14 * 14 at 224 / 16), and under ``patch_embed.`` (DynamicVideoPatchEmbed) ``proj`` (Conv3d),
    ``score_backbone.features.*`` (torchvision mobilenet_v3_small ``features[:11]``, BatchNorm buffers included) and
    ``score_head1`` / ``score_head2`` (Linear 48 -> 48)."""
    import torchvision

    state = videomamba_official_state(embed_dim, depth, num_frames, 14, patch, num_classes, generator=generator)
    trunk = torchvision.models.mobilenet_v3_small().features[:11]
    for key, value in trunk.state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=generator) * 0.1 + (1.0 if key.endswith("running_var") else 0)
            value = value.abs() if key.endswith("running_var") else value
        state[f"patch_embed.score_backbone.features.{key}"] = value
    for head in ("score_head1", "score_head2"):
        state[f"patch_embed.{head}.weight"] = torch.randn(48, 48, generator=generator) * 0.1
        state[f"patch_embed.{head}.bias"] = torch.randn(48, generator=generator) * 0.1
    return state


def test_official_videomamba_layout_loads_with_nothing_missing_or_unexpected(tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    state = videomamba_official_state(32, 2, 3, 4, 8, 5, generator=generator)
    path = tmp_path / "videomamba_t16_k400_f8_res224.pth"
    torch.save({"model": state, "epoch": 3}, path)
    model = create("videomamba_tiny", num_classes=5)
    assert set(model.state_dict()) == set(state)
    report = load_official_checkpoint(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_official_videomamba_checkpoint_loads_into_other_clip_lengths(tmp_path, seed):
    state = videomamba_official_state(32, 2, 8, 4, 8, 5, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / "f8.pth"
    torch.save({"model": state}, path)
    model = create("videomamba_tiny", num_classes=5, num_frames=4)
    report = load_official_checkpoint(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.resized == ["temporal_pos_embedding"]
    expected = F.interpolate(state["temporal_pos_embedding"].transpose(1, 2), size=4, mode="linear",
                             align_corners=False).transpose(1, 2)
    torch.testing.assert_close(model.temporal_pos_embedding.detach(), expected)


def test_authors_dart_video_layout_loads_with_nothing_missing_or_unexpected(tmp_path, seed):
    """All of the authors' tensors land (the trunk's ``features.8-10``, which their forward discards, are the only
    ones dropped); the loaded trunk computes torchvision's ``features[:8]`` with torchvision's BatchNorm eps."""
    import torchvision

    state = authors_dart_video_state(32, 2, 2, 16, 5, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / "dvideomamba.pth"
    torch.save({"model": state}, path)
    model = create("videomamba_tiny_dart", img_size=224, patch_size=16, num_frames=2, num_tokens=300,
                   tokenizer_cfg={"score_mode": "authors"}, num_classes=5)
    report = load_official_checkpoint(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    own = model.state_dict()
    for theirs, ours in (("patch_embed.score_head1.weight", "patch_embed.scorer.head.motion.weight"),
                         ("patch_embed.score_head2.bias", "patch_embed.scorer.head.gate.bias"),
                         ("patch_embed.proj.weight", "patch_embed.proj.weight"), ("pos_embed", "pos_embed")):
        assert torch.equal(own[ours], state[theirs]), theirs
    reference = torchvision.models.mobilenet_v3_small().features[:8]
    reference.load_state_dict({k[len("patch_embed.score_backbone.features."):]: v for k, v in state.items()
                               if k.startswith("patch_embed.score_backbone.features.")
                               and int(k.split(".")[3]) < 8})
    frames = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed.scorer.trunk(frames), reference.eval()(frames),
                                   rtol=1e-4, atol=1e-4)
    assert model.patch_embed.scorer.score_norm == "sample"      # the authors standardise per video


def test_authors_layout_with_a_missing_trunk_stage_is_a_clear_error(tmp_path, seed):
    state = authors_dart_video_state(32, 1, 2, 16, 5, generator=torch.Generator().manual_seed(seed))
    state = {k: v for k, v in state.items() if not k.startswith("patch_embed.score_backbone.features.7.")}
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    model = create("videomamba_tiny_dart", img_size=224, patch_size=16, num_frames=2, depth=1,
                   tokenizer_cfg={"score_mode": "authors"}, num_classes=5)
    with pytest.raises(ValueError, match=r"broken.pth \(scorer trunk\): \d+ MobileNetV3 trunk tensors, this trunk "
                                         r"has \d+"):
        load_official_checkpoint(model, str(path))


def test_authors_layout_into_a_content_scoring_model_is_a_clear_error(tmp_path, seed):
    """Their head computes their formula: loading it into the default content scorer would silently change what it
    computes, so it says which option to use."""
    state = authors_dart_video_state(32, 1, 2, 16, 5, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / "dvideomamba.pth"
    torch.save({"model": state}, path)
    model = create("videomamba_tiny_dart", img_size=224, patch_size=16, num_frames=2, depth=1, num_classes=5)
    with pytest.raises(ValueError, match=r"dvideomamba.pth: its scorer head \(patch_embed.score_head1.weight\) is "
                                         r"the authors' DART-video head, which computes their formula; this model "
                                         r"scores with score_mode='content'. Build it with "
                                         r"tokenizer_cfg=\{'score_mode': 'authors'\} to load this checkpoint"):
        load_official_checkpoint(model, str(path))


# ----------------------------------------------------------------------------------------------------------------
# Inflating image checkpoints
# ----------------------------------------------------------------------------------------------------------------
def test_inflate_patch_weight_centre_and_spread(seed):
    weight = torch.randn(4, 3, 2, 2)
    centred = inflate_patch_weight(weight, 3)
    assert torch.equal(centred[:, :, 1], weight) and not centred[:, :, [0, 2]].any()
    spread = inflate_patch_weight(weight, 2, center=False)
    torch.testing.assert_close(spread.sum(2), weight)
    assert torch.equal(inflate_patch_weight(weight, 1)[:, :, 0], weight)


def test_inflated_videomamba_image_checkpoint_is_the_image_model_on_one_frame(seed):
    """A VideoMamba image checkpoint (Conv2d patches, class token first) inflated into a one-frame video model
    computes what the image model computes: Conv2d patchify, class token first, + pos_embed, the same blocks."""
    video_model = create("videomamba_tiny", num_frames=1, num_classes=5).eval()
    image_state = {k: v.clone() for k, v in video_model.state_dict().items() if k != "temporal_pos_embedding"}
    image_state["patch_embed.proj.weight"] = torch.randn(32, 3, 8, 8) * 0.05
    image_state["pos_embed"] = torch.randn(1, 17, 32) * 0.02
    report = inflate_image_checkpoint(video_model, {"model": image_state}, keep_head=True)
    assert report.missing == ["temporal_pos_embedding"] and report.unexpected == [] and report.skipped == []
    assert report.resized == ["patch_embed.proj.weight"]
    assert not video_model.temporal_pos_embedding.any()
    images = torch.randn(2, 3, 32, 32)
    x = F.conv2d(images, image_state["patch_embed.proj.weight"], image_state["patch_embed.proj.bias"], stride=8)
    x = torch.cat([video_model.cls_token.expand(2, -1, -1), x.flatten(2).transpose(1, 2)], 1) + image_state["pos_embed"]
    with torch.no_grad():
        hidden, residual, _ = video_model.run_layers(x)
        expected = video_model.head(video_model.final_norm(hidden, residual)[:, 0])
        torch.testing.assert_close(video_model(images[:, :, None]), expected, rtol=1e-5, atol=1e-5)


def test_inflating_a_vim_checkpoint_moves_its_middle_class_embedding_first_and_drops_the_head(seed):
    vim = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_classes=1000)
    video_model = create("videomamba_tiny", num_classes=5)
    report = inflate_image_checkpoint(video_model, vim.state_dict(), source_cls_pos_index="middle")
    assert report.skipped == ["head.weight", "head.bias"] and report.unexpected == []
    assert sorted(report.missing) == ["head.bias", "head.weight", "temporal_pos_embedding"]
    pos = vim.pos_embed.detach()
    middle = vim.cls_pos_index
    assert torch.equal(video_model.pos_embed[:, 0], pos[:, middle])
    assert torch.equal(video_model.pos_embed[:, 1:], torch.cat([pos[:, :middle], pos[:, middle + 1:]], 1))
    assert torch.equal(video_model.patch_embed.proj.weight[:, :, 0], vim.patch_embed.proj.weight)
    assert torch.equal(video_model.layers[1].mixer.A_b_log, vim.layers[1].mixer.A_b_log)
    # a different grid: the spatial embedding is resampled
    bigger = create("videomamba_tiny", img_size=48, num_classes=5)
    report = inflate_image_checkpoint(bigger, vim.state_dict(), source_cls_pos_index="middle")
    assert "pos_embed" in report.resized and bigger.pos_embed.shape == (1, 37, 32)
    assert torch.equal(bigger.pos_embed[:, 0], pos[:, middle])


def test_inflating_into_tubelets_and_into_video_dart(seed):
    image_state = {k: v for k, v in create("videomamba_tiny", num_frames=1).state_dict().items()
                   if k != "temporal_pos_embedding"}
    image_state["patch_embed.proj.weight"] = torch.randn(32, 3, 8, 8)
    tubelets = create("videomamba_tiny", num_frames=4, tokenizer_cfg=dict(tubelet_size=2))
    assert tubelets.temporal_pos_embedding.shape == (1, 2, 32)
    inflate_image_checkpoint(tubelets, image_state)
    weight = tubelets.patch_embed.proj.weight
    assert weight.shape == (32, 3, 2, 8, 8) and torch.equal(weight[:, :, 1], image_state["patch_embed.proj.weight"])
    assert not weight[:, :, 0].any()
    dart = create("videomamba_tiny_dart")
    report = inflate_image_checkpoint(dart, image_state)
    assert all(k.startswith("patch_embed.scorer.") or k in ("temporal_pos_embedding", "head.weight", "head.bias")
               for k in report.missing)
    assert torch.equal(dart.patch_embed.proj.weight[:, :, 0], image_state["patch_embed.proj.weight"])


def test_save_and_load_model_round_trip(tmp_path, seed):
    from dartmamba.models.checkpoints import load_model, save_model

    model = create("videomamba_tiny_dart", num_classes=4, device="cpu").eval()
    path = tmp_path / "clip_model.safetensors"
    save_model(model, str(path))
    loaded = load_model(str(path)).eval()
    assert isinstance(loaded, VideoMamba)
    video = clips("videomamba_tiny_dart")
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model(video), rtol=0, atol=0)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="global_pool must be 'token' or 'avg'"):
        create("videomamba_tiny", global_pool="max")
    with pytest.raises(TypeError):
        create("videomamba_tiny", tokenizer="grid")      # an image tokenizer takes no num_frames
    with pytest.raises(ValueError, match=r"video must have shape \(B, C, T, H, W\) \(B, 3, 3, 32, 32\), got "
                                         r"\(2, 3, 32, 32\)"):
        create("videomamba_tiny")(torch.randn(2, 3, 32, 32))


def test_videomamba_and_vim_share_one_constructor_and_nothing_image_only(monkeypatch):
    """VideoMamba and Vim both extend MambaBackbone and run its constructor once (none is skipped); Vim's
    image-only parts (the middle class token, set_input_size) are not VideoMamba's."""
    from dartmamba.models.vim import MambaBackbone, VisionMamba

    calls = []
    real_init = MambaBackbone.__init__

    def counting_init(self, **kwargs):
        calls.append(type(self).__name__)
        real_init(self, **kwargs)

    monkeypatch.setattr(MambaBackbone, "__init__", counting_init)
    model = create("videomamba_tiny")
    timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2)
    assert calls == ["VideoMamba", "VisionMamba"]
    assert isinstance(model, MambaBackbone) and not isinstance(model, VisionMamba)
    assert model.cls_index == model.cls_pos_index == 0 and model.num_frames == 3
    with pytest.raises(NotImplementedError, match=r"^VideoMamba.set_input_size: a new clip resolution is not "
                                                  r"supported"):
        model.set_input_size(img_size=64)
