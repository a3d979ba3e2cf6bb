"""benchmarks/video_canvas.py: the sample-share measure and the study's variants."""
import pytest
import torch

from benchmarks import video_canvas
from dartmamba.tokenizer import VideoDartTokenizer


def test_samples_on_object_of_the_uniform_geometry_is_the_mask_share(seed):
    """Constant scores with N = T * Gh * Gw sample every pixel of every frame once: the share of samples on the
    object is its share of the area."""
    tokenizer = VideoDartTokenizer(img_size=32, patch_size=8, num_frames=3, embed_dim=8, trunk="tiny_cnn",
                                   uniform_scores=True)
    video = torch.randn(2, 3, 3, 32, 32)
    masks = (torch.rand(2, 3, 32, 32) > 0.7).float()
    share = video_canvas.video_samples_on_object(tokenizer, video, masks)
    torch.testing.assert_close(share, masks.mean(dim=(1, 2, 3)))


def test_box_masks_cover_each_box_exactly(seed):
    boxes = torch.tensor([[[2.0, 3.0, 10.0, 7.0], [0.0, 0.0, 16.0, 1.0]]])           # (B=1, T=2, 4), x1/y1 exclusive
    masks = video_canvas.box_masks(boxes, 2, 16)
    assert masks.shape == (1, 2, 16, 16)
    assert masks[0, 0].sum() == 8 * 4 and masks[0, 0, 3:7, 2:10].all() and masks[0, 0, 7, 2] == 0
    assert masks[0, 1].sum() == 16 and masks[0, 1, 0].all()


def test_the_study_compares_equal_tokens_and_two_and_four_times_more():
    recipes = {name: video_canvas._config(name, []) for name in video_canvas.VARIANTS}
    frames = recipes["dart16"].data.video.num_frames
    tokens = {name: cfg.model.kwargs.get("num_tokens") or frames * (cfg.model.kwargs["img_size"] // 8) ** 2
              for name, cfg in recipes.items()}
    dart = [name for name in recipes if name.startswith("dart16")]
    assert tokens == {**dict.fromkeys(dart, 16 * frames), "grid16": 16 * frames, "grid36": 36 * frames,
                      "grid64": 64 * frames}
    assert set(dart) == set(video_canvas.DART_VARIANTS)
    # the two DART variants differ in the scoring alone; the study's default is the content scoring
    content, authors = (recipes[n].model.kwargs["tokenizer_cfg"] for n in ("dart16", "dart16_authors"))
    assert content.get("score_mode", "content") == "content" and authors == {**content, "score_mode": "authors"}
    assert recipes["dart16_authors"].model.kwargs == {**recipes["dart16"].model.kwargs, "tokenizer_cfg": authors}
    assert recipes["dart16_authors_low0"].model.kwargs["tokenizer_cfg"] == {**authors, "first_frame_score": 0.18}
    # the frozen-scorer variants differ from their scoring in the scorer's learning rate alone
    for frozen, trained in (("dart16_frozen", "dart16"), ("dart16_authors_frozen", "dart16_authors")):
        assert recipes[frozen].model == recipes[trained].model
        assert recipes[frozen].optim == recipes[trained].optim.model_copy(
            update={"lr_scale": {"patch_embed.scorer": 0.0}})
    # everything but the tokenizer (and the frame size it implies) is the same
    backbone = {k: v for k, v in recipes["dart16"].model.kwargs.items()
                if k not in ("img_size", "num_tokens", "grid_size", "tokenizer_cfg")}
    for name in ("grid16", "grid36", "grid64"):
        assert {k: v for k, v in recipes[name].model.kwargs.items() if k != "img_size"} == backbone, name
        assert recipes[name].train == recipes["dart16"].train and recipes[name].optim == recipes["dart16"].optim


def test_the_image_benchmarks_leave_the_video_family_out():
    from benchmarks import common
    from dartmamba.models import FAMILIES

    assert FAMILIES["videomamba"].modality == "video" and FAMILIES["vim"].modality == "image"
    assert "videomamba" not in common.FAMILIES and {"vim", "deit"} <= set(common.FAMILIES)
    assert FAMILIES["videomamba"].model_name("middle", "dart") == "videomamba_middle_dart"


def test_untrained_content_scores_follow_the_digit_and_the_authors_scores_favour_frame_0():
    """The study's recipes before any update (as each run builds its model): content scores spread the tokens
    evenly over the frames and put the samples on the moving digit at well over its area share; the authors'
    constant first-frame score gives frame 0 several times the other frames' tokens."""
    content = video_canvas.initial_statistics("dart16", 0, count=32)
    authors = video_canvas.initial_statistics("dart16_authors", 0, count=32)
    assert 1 / 1.5 <= content["frame0_over_later_mean"] <= 1.5, content
    assert content["samples_on_object_over_area"] > 2.0 and content["samples_in_box_over_area"] > 1.5, content
    assert authors["frame0_over_later_mean"] > 2.5, authors
    assert sum(content["tokens_per_frame"]) == pytest.approx(64, abs=0.05)
