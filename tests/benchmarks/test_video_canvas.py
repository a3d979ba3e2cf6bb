"""benchmarks/video_canvas.py: the sample-share measure and the study's variants."""
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


def test_the_study_compares_equal_tokens_and_two_and_four_times_more():
    recipes = {name: video_canvas._config(name, []) for name in video_canvas.VARIANTS}
    frames = recipes["dart16"].data.video.num_frames
    tokens = {name: cfg.model.kwargs.get("num_tokens") or frames * (cfg.model.kwargs["img_size"] // 8) ** 2
              for name, cfg in recipes.items()}
    assert tokens == {"dart16": 16 * frames, "grid16": 16 * frames, "grid36": 36 * frames, "grid64": 64 * frames}
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
