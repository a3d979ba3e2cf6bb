"""A small configuration of every model dartmamba registers (timm's checklist and the factory-kwargs tests
run them; tests/models/test_timm_checklist.py fails when a registered model has none)."""

SMALL = {
    "vim_tiny_patch16_224": dict(img_size=32, patch_size=8, embed_dim=32, depth=2),
    "vim_small_patch16_224": dict(img_size=32, patch_size=8, embed_dim=48, depth=2),
    "vim_base_patch16_224": dict(img_size=32, patch_size=8, embed_dim=64, depth=2),
    "vim_tiny_dart": dict(img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32, depth=2,
                          dart_cfg=dict(trunk="tiny_cnn")),
    "vim_small_dart": dict(img_size=64, patch_size=8, grid_size=4, num_tokens=16, embed_dim=48, depth=2,
                           dart_cfg=dict(trunk="tiny_cnn")),
    "vim_base_dart": dict(img_size=64, patch_size=8, grid_size=4, num_tokens=20, embed_dim=64, depth=2,
                          dart_cfg=dict(trunk="tiny_cnn", head="v1")),
    "deit_tiny_dart": dict(img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32, depth=2, num_heads=2,
                           dart_cfg=dict(trunk="tiny_cnn")),
    "deit_small_dart": dict(img_size=64, patch_size=8, grid_size=4, num_tokens=16, embed_dim=48, depth=2,
                            num_heads=2, dart_cfg=dict(trunk="tiny_cnn")),
    "deit_base_dart": dict(img_size=64, patch_size=8, grid_size=4, num_tokens=20, embed_dim=64, depth=2,
                           num_heads=2, dart_cfg=dict(trunk="tiny_cnn", head="v2")),
}
