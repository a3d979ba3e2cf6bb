"""Official checkpoint layouts (built here from the official definitions) and our own checkpoint format."""

import pytest
import timm
import torch

import dartmamba
from dartmamba.models.checkpoints import load_official_checkpoint
from tests.models.official_layouts import (hustvl_vim_state_dict, official_dart_deit_state_dict,
                                           official_dart_vim_state_dict)


def test_full_size_hustvl_layout_has_415_tensors():
    assert len(hustvl_vim_state_dict(192, 24, 1000)) == 415


def test_load_hustvl_vim_checkpoint(tmp_path, seed):
    state = hustvl_vim_state_dict(dim=32, depth=2, num_classes=10)
    path = tmp_path / "vim_t_midclstok.pth"
    torch.save({"model": state, "epoch": 299}, str(path))
    model = timm.create_model("vim_tiny_patch16_224", embed_dim=32, depth=2, num_classes=10)
    report = load_official_checkpoint(model, str(path))
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(state)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_official_dart_vim_checkpoint(tmp_path, seed):
    state, trunk = official_dart_vim_state_dict(dim=32, depth=2, num_classes=10)
    path = tmp_path / "darvim_tiny.pth"
    torch.save({"model": state}, str(path))
    model = timm.create_model("vim_tiny_dart", embed_dim=32, depth=2, num_classes=10)
    assert model.patch_embed.scorer.score_norm == "sample"
    report = load_official_checkpoint(model, str(path))
    assert report.missing == [] and report.unexpected == [], report
    assert model.patch_embed.scorer.score_norm == "batch"          # what the official models were trained with
    own = model.state_dict()
    assert torch.equal(own["patch_embed.scorer.head.fc1.weight"], state["patch_embed.spn.spn.spn.mlp.net.0.weight"])
    assert torch.equal(own["layers.1.mixer.A_b_log"], state["layers.1.mixer.A_b_log"])
    images = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed.scorer.trunk(images), trunk.eval()(images), rtol=1e-5, atol=1e-5)
        logits = model.eval()(images)
    assert torch.isfinite(logits).all()


def test_load_official_dart_deit_checkpoint(tmp_path, seed):
    state, trunk = official_dart_deit_state_dict(dim=32, depth=2, heads=2, num_classes=10)
    path = tmp_path / "darvit_sm.pth"
    torch.save({"model": state}, str(path))
    model = timm.create_model("deit_small_dart", embed_dim=32, depth=2, num_heads=2, num_classes=10)
    report = load_official_checkpoint(model, str(path))
    assert report.missing == [] and report.unexpected == [] and report.resized == [], report
    assert model.patch_embed.scorer.score_norm == "batch"
    own = model.state_dict()
    assert torch.equal(own["patch_embed.scorer.head.fc2.weight"], state["patch_embed.spn.spn.spn.mlp.net.2.weight"])
    for key in ("blocks.1.attn.qkv.weight", "pos_embed", "cls_token", "patch_embed.proj.weight", "head.bias"):
        assert torch.equal(own[key], state[key]), key
    images = torch.randn(2, 3, 224, 224)       # the trunk sees the 224 resize of the 448 input
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed.scorer.trunk(images), trunk.eval()(images), rtol=1e-5, atol=1e-5)
        logits = model.eval()(torch.randn(2, 3, 448, 448))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_mismatched_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    state = hustvl_vim_state_dict(dim=32, depth=2, num_classes=10)
    state["layers.1.mixer.x_proj_b.weight"] = torch.randn(5, 64)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, str(path))
    model = timm.create_model("vim_tiny_patch16_224", embed_dim=32, depth=2, num_classes=10)
    with pytest.raises(ValueError, match=r"checkpoint .*bad.pth: checkpoint tensor 'layers.1.mixer.x_proj_b.weight' "
                                         r"has shape \(5, 64\), the model expects \(34, 64\)"):
        load_official_checkpoint(model, str(path))
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": hustvl_vim_state_dict(32, 2, 10)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cannot read checkpoint file .*truncated.pth: it is truncated, corrupt"):
        load_official_checkpoint(model, str(truncated))
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*missing.pth"):
        load_official_checkpoint(model, str(tmp_path / "missing.pth"))


SMALL_DART = dict(img_size=64, patch_size=8, grid_size=4, num_tokens=12, embed_dim=32, depth=2, num_classes=5,
                  dart_cfg=dict(trunk="tiny_cnn"))


def test_own_checkpoint_roundtrip_and_timm_pretrained_file(tmp_path, seed):
    model = timm.create_model("vim_tiny_dart", **SMALL_DART).eval()
    path = tmp_path / "model.safetensors"
    dartmamba.save_model(model, str(path))
    images = torch.randn(2, 3, 64, 64)
    loaded = dartmamba.load_model(str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    via_timm = timm.create_model("vim_tiny_dart", pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
                                 **SMALL_DART).eval()
    with torch.no_grad():
        torch.testing.assert_close(via_timm(images), model(images), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]     # no temp files left behind


def test_own_checkpoint_errors_name_file_and_key(tmp_path):
    model = timm.create_model("vim_tiny_dart", **SMALL_DART)
    path = tmp_path / "model.safetensors"
    dartmamba.save_model(model, str(path))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*broken.safetensors"):
        dartmamba.load_model(str(broken))
    other = timm.create_model("vim_tiny_dart", **{**SMALL_DART, "embed_dim": 48})
    from safetensors.torch import save_file
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(mismatched),
              metadata={"dartmamba_config": '{"model": "vim_tiny_dart", "kwargs": ' +
                        '{"img_size": 64, "patch_size": 8, "grid_size": 4, "num_tokens": 12, "embed_dim": 32, '
                        '"depth": 2, "num_classes": 5, "dart_cfg": {"trunk": "tiny_cnn"}}}'})
    with pytest.raises(ValueError, match=r"checkpoint .*mismatched.safetensors: 'cls_token' has shape \(1, 1, 48\)"):
        dartmamba.load_model(str(mismatched))
    with pytest.raises(ValueError, match="path must end with .safetensors"):
        dartmamba.save_model(model, str(tmp_path / "model.pt"))
