"""The dense-prediction example: a segmentation head on features_only backbones learns the canvas object masks."""
import pytest
import torch

from dartmamba.demos.segment_canvas import SegmentationModel, mask_iou, prior_bce, train_segmentation

TINY = {"embed_dim": 32, "depth": 2, "d_state": 4, "expand": 1, "patch_size": 8}
CASES = {
    "dart": ("vim_tiny_dart", {**TINY, "img_size": 64, "grid_size": 8, "num_tokens": 16,
                               "dart_cfg": {"trunk": "tiny_cnn", "head": "v2"}}),
    "fixed": ("vim_tiny_patch16_224", {**TINY, "img_size": 32}),
    "deit_dart": ("deit_tiny_dart", {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 64,
                                     "grid_size": 8, "num_tokens": 16, "dart_cfg": {"trunk": "tiny_cnn"}}),
}


@pytest.mark.parametrize("case", ["dart", "fixed"])
def test_segmentation_loss_falls_below_the_constant_prior(case):
    name, kwargs = CASES[case]
    result = train_segmentation(name, kwargs, steps=40, batch_size=16, lr=3e-3, train_length=256, val_length=64,
                                seed=int(torch.randint(1000, ()).item()))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first, result.losses
    # a head that learned nothing spatial cannot beat the best constant prediction on held-out canvases
    assert result.val_loss < 0.9 * result.val_prior, (result.val_loss, result.val_prior)


@pytest.mark.parametrize("case", list(CASES))
def test_head_gives_one_logit_per_input_pixel_and_trains_the_scorer(case):
    name, kwargs = CASES[case]
    model = SegmentationModel(name, **kwargs)
    size = kwargs["img_size"]
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, size, size)
    logits.square().mean().backward()
    if "dart" in case:   # the scorer sits before the feature maps, so the dense loss reaches it
        scorer = {n: p for n, p in model.named_parameters() if "scorer" in n and p.requires_grad}
        # head v1's last bias shifts every raw score equally, which the standardisation removes: its gradient is 0 in
        # exact arithmetic (rounding noise at most), every other scorer parameter's is not
        v1 = any(getattr(m, "head_version", None) == "v1" for m in model.modules())
        shift = {n for n in scorer if v1 and n.endswith("scorer.head.fc2.bias")}
        largest = max(p.grad.abs().max().item() for p in scorer.values())
        assert scorer and all(scorer[n].grad is not None and scorer[n].grad.abs().sum() > 0
                              for n in scorer if n not in shift), scorer.keys()
        assert all(scorer[n].grad.abs().max() <= 1e-5 * largest for n in shift)


def test_iou_and_prior_on_known_values():
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    logits = torch.tensor([[[5.0, 5.0], [-5.0, -5.0]]])
    assert mask_iou(logits, masks) == pytest.approx(0.5)
    p = torch.tensor(0.25)
    assert prior_bce(masks) == pytest.approx(-(p * p.log() + (1 - p) * (1 - p).log()).item(), rel=1e-5)
