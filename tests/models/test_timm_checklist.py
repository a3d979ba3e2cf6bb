"""timm's model-test checklist for every model this package registers, at small sizes; parameter-count table."""
import pytest
import timm
import torch

import dartmamba.models  # noqa: F401
from tests.models.checklist import check_timm_model
from tests.models.small_configs import SMALL
from tests.models.videomamba_cases import VIDEO_SMALL



def registered_by_dartmamba() -> set[str]:
    """Every model whose timm entry point is defined in a dartmamba module (a new family is found without a name
    pattern)."""
    return {name for name in timm.list_models()
            if timm.models.model_entrypoint(name).__module__.startswith("dartmamba.")}


def test_every_registered_model_is_covered():
    """Image models are checked here; video models (input (B, C, T, H, W)) have the same checklist for clips in
    tests/models/test_videomamba.py, over VIDEO_SMALL."""
    ours = registered_by_dartmamba()
    assert {"vim_tiny_patch16_224", "deit_small_dart"} <= ours
    assert not set(SMALL) & set(VIDEO_SMALL)
    assert ours == set(SMALL) | set(VIDEO_SMALL), sorted(ours ^ (set(SMALL) | set(VIDEO_SMALL)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_timm_model_checklist(name, seed):
    num_classes = 7
    model = timm.create_model(name, num_classes=num_classes, **SMALL[name])
    size = SMALL[name]["img_size"]
    images = torch.randn(2, 3, size, size)
    check_timm_model(model, images, num_classes, input_sizes=((224, 224), (448, 448)),
                     no_decay={"pos_embed", "cls_token"})


def test_optimizer_groups_exclude_norms_biases_embeddings():
    from timm.optim import create_optimizer_v2

    model = timm.create_model("vim_tiny_dart", num_classes=4, **SMALL["vim_tiny_dart"])
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("pos_embed", "cls_token", "layers.0.norm.weight", "layers.0.mixer.A_log", "layers.0.mixer.A_b_log",
                 "layers.0.mixer.dt_proj.bias", "head.bias", "patch_embed.proj.bias"):
        assert id(named[name]) in no_decay, name
    assert id(named["layers.0.mixer.in_proj.weight"]) not in no_decay


def test_grad_checkpointing_gives_the_same_gradients(seed):
    model = timm.create_model("vim_tiny_dart", num_classes=4, **SMALL["vim_tiny_dart"])
    images = torch.randn(2, 3, 64, 64)
    model(images).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).square().sum().backward()
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6, msg=name)


PUBLISHED = {  # millions; fixed-grid: the model papers; DART: the official checkpoints (notes, section 5)
    "deit_tiny_patch16_224": (5.7, None), "deit_small_patch16_224": (22.1, None), "deit_base_patch16_224": (86.6, None),
    "vim_tiny_patch16_224": (7.148008, None), "vim_small_patch16_224": (25.796584, None),
    "vim_base_patch16_224": (97.59844, None),
    "deit_tiny_dart": (6.31, 5.73), "deit_small_dart": (24.11, 22.08),
    "vim_tiny_dart": (8.20, 7.26), "vim_small_dart": (28.98, 25.98),
}


def test_parameter_counts_match_published(capsys):
    rows = []
    for name, (total_ref, trainable_ref) in PUBLISHED.items():
        with torch.device("meta"):
            model = timm.create_model(name)
        total = sum(t.numel() for t in model.state_dict().values() if t.dtype != torch.int64) / 1e6
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        rows.append((name, total, total_ref, trainable, trainable_ref))
    with capsys.disabled():
        print("\n| model | params (M, all tensors) | published | trainable (M) | published |")
        print("|---|---|---|---|---|")
        for name, total, total_ref, trainable, trainable_ref in rows:
            print(f"| {name} | {total:.3f} | {total_ref} | {trainable:.3f} | {trainable_ref or '-'} |")
    for name, total, total_ref, trainable, trainable_ref in rows:
        assert abs(total - total_ref) / total_ref < 0.03, name
        if trainable_ref is not None:
            assert abs(trainable - trainable_ref) / trainable_ref < 0.03, name
