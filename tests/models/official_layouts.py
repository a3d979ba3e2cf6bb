"""Official checkpoint layouts (hustvl/Vim, DART's darvim_* / darvit_*), built from the official model definitions'
key lists and shapes, for the checkpoint and pretrained tests."""
import math

import torch
import torchvision


def hustvl_vim_state_dict(dim, depth, num_classes, num_patches=196, d_state=16):
    """The hustvl/Vim key layout and shapes (bimamba v2, middle cls token, RMSNorm, no in/out_proj bias)."""
    d_inner, dt_rank = 2 * dim, math.ceil(dim / 16)
    state = {"cls_token": (1, 1, dim), "pos_embed": (1, num_patches + 1, dim),
             "patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,),
             "head.weight": (num_classes, dim), "head.bias": (num_classes,), "norm_f.weight": (dim,)}
    for i in range(depth):
        p = f"layers.{i}."
        state[p + "norm.weight"] = (dim,)
        state[p + "mixer.in_proj.weight"] = (2 * d_inner, dim)
        state[p + "mixer.out_proj.weight"] = (dim, d_inner)
        for suffix, a_name, d_name in (("", "A_log", "D"), ("_b", "A_b_log", "D_b")):
            state[p + f"mixer.{a_name}"] = (d_inner, d_state)
            state[p + f"mixer.{d_name}"] = (d_inner,)
            state[p + f"mixer.conv1d{suffix}.weight"] = (d_inner, 1, 4)
            state[p + f"mixer.conv1d{suffix}.bias"] = (d_inner,)
            state[p + f"mixer.x_proj{suffix}.weight"] = (dt_rank + 2 * d_state, d_inner)
            state[p + f"mixer.dt_proj{suffix}.weight"] = (d_inner, dt_rank)
            state[p + f"mixer.dt_proj{suffix}.bias"] = (d_inner,)
    return {k: torch.randn(shape) for k, shape in state.items()}


def official_scorer_state(trunk: torch.nn.Module, head_shapes: dict) -> dict:
    """The official scorer's tensors under patch_embed.spn.spn.spn.: a torchvision MobileNetV3 ``features[:k]``
    trunk (BatchNorm statistics randomised) as ``features.*`` and the head's ``mlp.net.*`` tensors."""
    for module in trunk.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    prefix = "patch_embed.spn.spn.spn."
    state = {prefix + "features." + key: value.clone() for key, value in trunk.state_dict().items()}
    state.update({prefix + key: torch.randn(shape) * 0.05 for key, shape in head_shapes.items()})
    return state


def official_dart_vim_state_dict(dim, depth, num_classes):
    """A darvim_tiny-style state dict: Vim layers + tokenizer under patch_embed (torchvision MobileNetV3-small
    features[:13] trunk under patch_embed.spn.spn.spn.features, head v2 MLP 576 -> 96 -> 576 under mlp.net)."""
    state = hustvl_vim_state_dict(dim, depth, num_classes)
    trunk = torchvision.models.mobilenet_v3_small().features[:13]
    state.update(official_scorer_state(trunk, {"mlp.net.0.weight": (96, 576), "mlp.net.0.bias": (96,),
                                               "mlp.net.2.weight": (576, 96), "mlp.net.2.bias": (576,)}))
    return state, trunk


def official_dart_deit_state_dict(dim, depth, heads, num_classes):
    """A darvit_sm-style state dict: timm DeiT (VisionTransformer) keys with pos_embed (1, 197, D), and the scorer
    under patch_embed.spn.spn.spn.: torchvision MobileNetV3-large features[:15] (160 ch, the v1 cut) and the v1
    head mlp.net.{0,2} (160 -> 160 -> 1)."""
    from timm.models.vision_transformer import VisionTransformer

    deit = VisionTransformer(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                             num_classes=num_classes)
    state = {k: torch.randn_like(v) for k, v in deit.state_dict().items()}
    trunk = torchvision.models.mobilenet_v3_large().features[:15]
    state.update(official_scorer_state(trunk, {"mlp.net.0.weight": (160, 160), "mlp.net.0.bias": (160,),
                                               "mlp.net.2.weight": (1, 160), "mlp.net.2.bias": (1,)}))
    return state, trunk
