"""Small VideoMamba configurations shared by the video model tests and the registry check of the timm checklist
(tests/models/test_timm_checklist.py covers image models; the video models take (B, C, T, H, W) clips and have their
own checklist in tests/models/test_videomamba.py)."""

VIDEO_SMALL = {
    "videomamba_tiny": dict(img_size=32, patch_size=8, num_frames=3, embed_dim=32, depth=2),
    "videomamba_small": dict(img_size=32, patch_size=8, num_frames=2, embed_dim=48, depth=2),
    "videomamba_middle": dict(img_size=16, patch_size=8, num_frames=4, embed_dim=32, depth=3),
    "videomamba_base": dict(img_size=32, patch_size=16, num_frames=3, embed_dim=64, depth=2),
    "videomamba_tiny_dart": dict(img_size=32, patch_size=8, num_frames=3, num_tokens=30, embed_dim=32, depth=2,
                                 tokenizer_cfg=dict(trunk="tiny_cnn")),
    "videomamba_small_dart": dict(img_size=32, patch_size=8, num_frames=2, num_tokens=20, embed_dim=48, depth=2,
                                  tokenizer_cfg=dict(trunk="tiny_cnn")),
    "videomamba_middle_dart": dict(img_size=32, patch_size=8, num_frames=4, grid_size=2, num_tokens=24,
                                   embed_dim=32, depth=2, tokenizer_cfg=dict(trunk="tiny_cnn")),
    "videomamba_base_dart": dict(img_size=64, patch_size=16, num_frames=2, num_tokens=24, embed_dim=64, depth=2,
                                 tokenizer_cfg=dict(trunk="mobilenetv3_small_s16")),
}
