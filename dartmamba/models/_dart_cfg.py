"""Defaults shared by the DART model families."""
from __future__ import annotations


def dart_scorer_cfg(defaults: dict, user_cfg: dict | None, img_size) -> dict:
    """The tokenizer options of a registered DART model: ``defaults`` (trunk, head) under the user's ``dart_cfg``.

    The paper's MobileNetV3 scorer sees the image at half resolution (224 for 448): its published FLOPs count that,
    so ``scorer_input_size`` defaults to half of ``img_size`` for those trunks (an explicit value wins).
    """
    cfg = {**defaults, **(user_cfg or {})}
    if cfg["trunk"].startswith("mobilenetv3"):
        half = img_size // 2 if isinstance(img_size, int) else tuple(side // 2 for side in img_size)
        cfg.setdefault("scorer_input_size", half)
    return cfg
