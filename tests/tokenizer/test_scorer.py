import warnings

import pytest
import torch
import timm
from safetensors.torch import save_file

from dartmamba.tokenizer import DartScorer, standardise_scores
from dartmamba.tokenizer.scorer import MobileNetV3Trunk


@pytest.mark.parametrize("trunk,channels", [("mobilenetv3_small", 576), ("mobilenetv3_small_v1", 96),
                                            ("mobilenetv3_large", 960), ("mobilenetv3_large_v1", 160)])
def test_mobilenet_trunks_cut_where_the_notes_say(trunk, channels):
    scorer = DartScorer((14, 14), trunk=trunk, trunk_weights="random")
    assert scorer.trunk.out_chans == channels and scorer.trunk_frozen
    assert not any(p.requires_grad for p in scorer.trunk.parameters())
    features = scorer.trunk(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, channels, 7, 7)


def test_trunk_weights_load_from_a_local_timm_file_and_stay_frozen(tmp_path):
    reference = timm.create_model("mobilenetv3_small_100", pretrained=False)
    path = tmp_path / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    scorer = DartScorer((14, 14), trunk="mobilenetv3_small", trunk_weights=str(path))
    for key, value in scorer.trunk.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    before = {k: v.clone() for k, v in scorer.trunk.state_dict().items()}
    scorer.train()
    assert not scorer.trunk.training and scorer.head.training
    images = torch.randn(2, 3, 224, 224)
    scorer(images).sum().backward()               # BatchNorm running stats must not move in a training step
    scorer.init_weights()
    for key, value in scorer.trunk.state_dict().items():
        assert torch.equal(value, before[key]), f"frozen trunk changed: {key}"
    assert all(p.grad is None for p in scorer.trunk.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scorer.head.parameters())


def test_bad_trunk_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="trunk_weights file not found"):
        DartScorer((14, 14), trunk="mobilenetv3_small", trunk_weights=str(tmp_path / "missing.pth"))
    path = tmp_path / "partial.safetensors"
    save_file({"conv_stem.weight": torch.zeros(16, 3, 3, 3)}, str(path))
    with pytest.raises(KeyError, match="lacks .* trunk tensors, first: 'bn1.weight'"):
        DartScorer((14, 14), trunk="mobilenetv3_small", trunk_weights=str(path))


@pytest.mark.parametrize("head,low,high", [("v1", 0.1, 1.1), ("v2", 0.0, 1.0)])
def test_heads_give_bounded_positive_scores(head, low, high, seed):
    """The scores are the head's squash of the standardised raw scores, written out here: v1 sigmoid(s) + 0.1, v2
    sigmoid(2 s); hence their bounds."""
    scorer = DartScorer((8, 8), trunk="tiny_cnn", head=head)
    images = torch.randn(3, 3, 64, 64)
    scores = scorer(images)
    assert scores.shape == (3, 8, 8)
    raw = scorer.raw_scores(images)
    s = (raw - raw.mean((1, 2), keepdim=True)) / (raw.std((1, 2), keepdim=True) + 1e-8)
    expected = torch.sigmoid(s) + 0.1 if head == "v1" else torch.sigmoid(2 * s)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
    assert (scores > low).all() and (scores < high).all()
    assert scores.std() > 1e-3                     # not a constant map


def test_score_norm_sample_is_batch_independent_and_batch_is_not(seed):
    raw = torch.randn(4, 5, 5)
    changed = raw.clone()
    changed[1:] = 10 * torch.randn(3, 5, 5) + 3
    sample = standardise_scores(raw, "sample")
    torch.testing.assert_close(standardise_scores(changed, "sample")[0], sample[0])
    torch.testing.assert_close(sample.mean((1, 2)), torch.zeros(4), atol=1e-6, rtol=0)
    batch = standardise_scores(raw, "batch")
    torch.testing.assert_close(batch.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert not torch.allclose(standardise_scores(changed, "batch")[0], batch[0])
    with pytest.raises(ValueError, match="score_norm must be one of"):
        standardise_scores(raw, "layer")


def test_scorer_input_resize(seed):
    scorer = DartScorer((14, 14), trunk="tiny_cnn", input_size=112)
    seen = []
    scorer.trunk.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    assert scorer(torch.randn(2, 3, 448, 448)).shape == (2, 14, 14)
    assert seen == [torch.Size([2, 3, 112, 112])]


@pytest.mark.parametrize("tv_name,trunk,cut", [("mobilenet_v3_small", "mobilenetv3_small", 13),
                                               ("mobilenet_v3_large", "mobilenetv3_large_v1", 15)])
def test_torchvision_weights_give_the_torchvision_features_exactly(tv_name, trunk, cut, tmp_path, seed):
    """The official DART trunk is torchvision's MobileNetV3: its weights map onto our timm-named trunk and give the
    same features (BatchNorm eps 1e-3 included)."""
    import torchvision

    full = getattr(torchvision.models, tv_name)().eval()
    for module in full.modules():                      # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_()
    path = tmp_path / "tv.pth"
    torch.save(full.state_dict(), str(path))
    scorer = DartScorer((14, 14), trunk=trunk, head="v1", trunk_weights=str(path))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(scorer.trunk(images), full.features[:cut](images), rtol=1e-5, atol=1e-5)


def test_truncated_trunk_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    torch.save({"conv_stem.weight": torch.zeros(16, 3, 3, 3)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read trunk_weights file .*broken.pth: it is truncated, corrupt"):
        DartScorer((14, 14), trunk="mobilenetv3_small", trunk_weights=str(path))


def test_tiny_trunk_channels_last_path_matches_the_plain_layers(seeds):
    """The CPU forward (channels-last activations and per-call channels-last weights) equals running the layers on
    the NCHW input, forward and every gradient; parameters keep the default layout."""
    from dartmamba.tokenizer.scorer import TinyConvTrunk

    trunk = TinyConvTrunk(dtype=torch.float64)
    for seed in seeds:
        x = torch.randn(3, 3, 32, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        fast = trunk(x.requires_grad_())
        assert fast.is_contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(fast)
        fast_grads = torch.autograd.grad(fast, [x, *trunk.parameters()], grad)
        plain = trunk.layers(x)
        plain_grads = torch.autograd.grad(plain, [x, *trunk.parameters()], grad)
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
        for a, b in zip(fast_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(p.is_contiguous() for p in trunk.parameters())
