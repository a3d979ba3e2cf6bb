"""Our safetensors files carry a SHA-256 of every tensor, in the header and, for our models' files, as the tensor
``__dartmamba_digests__`` that travels with the weights. Every loader verifies it exactly once (dartmamba.load_model
and our readers from the file; timm.create_model(checkpoint_path=...), pretrained_cfg_overlay=dict(file=...),
timm.models.load_checkpoint and load_file + load_state_dict through the model's filter_fn / load hook, which also
remove it), files of other tools still load, and unreadable or missing files are errors naming the file."""
import hashlib
import json
import struct

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import dartmamba
import dartmamba.files as files
from dartmamba.files import (CONFIG_KEY, DIGEST_KEY, DIGEST_TENSOR, CorruptCheckpointError, read_safetensors_header,
                             read_state_dict, write_safetensors)
from dartmamba.models.checkpoints import checkpoint_filter_fn, load_official_checkpoint

from tests.helpers import TINY_DART, TINY_VIM

KWARGS = {**TINY_VIM, **TINY_DART}
TAMPERED = "layers.0.mixer.x_proj.weight"
FROM_FILE = r"checkpoint file {path} is corrupt: "
INTO_MODEL = r"the state dict loaded into VisionMamba is corrupt: "


def header(path):
    """(header dict, offset of the payload) of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), 8 + length


def flip_byte(path, tensor, at=3, bit=0x08):
    """Flip one bit of ``tensor``'s payload, the header left intact (what a bad copy or disk does)."""
    entries, start = header(path)
    data = bytearray(path.read_bytes())
    data[start + entries[tensor]["data_offsets"][0] + at] ^= bit
    path.write_bytes(bytes(data))


def tiny_vim():
    return timm.create_model("vim_tiny_dart", **KWARGS)


@pytest.fixture
def saved(tmp_path):
    model = tiny_vim()
    path = tmp_path / "model.safetensors"
    dartmamba.save_model(model, str(path))
    return model, path


def strict_load_file(path, strict=True):
    model = tiny_vim()
    result = model.load_state_dict(load_file(str(path)), strict=strict)
    assert not result.unexpected_keys and not result.missing_keys
    return model


def timm_load_checkpoint(path, **kwargs):
    model = tiny_vim()
    timm.models.load_checkpoint(model, str(path), **kwargs)
    return model


# name: (loader, the subject its error names); each returns the model or the state dict it read
LOADERS = {
    "load_model": (lambda path: dartmamba.load_model(str(path)), FROM_FILE),
    "read_state_dict": (lambda path: read_state_dict(str(path)), FROM_FILE),
    "create_model(checkpoint_path)": (lambda path: timm.create_model("vim_tiny_dart", **KWARGS,
                                                                     checkpoint_path=str(path)), INTO_MODEL),
    "pretrained_cfg_overlay(file)": (lambda path: timm.create_model(
        "vim_tiny_dart", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **KWARGS),
        INTO_MODEL),
    "timm.models.load_checkpoint": (timm_load_checkpoint, INTO_MODEL),
    "load_checkpoint(filter_fn=checkpoint_filter_fn)": (lambda path: timm_load_checkpoint(
        path, filter_fn=checkpoint_filter_fn), INTO_MODEL),
    "load_file + load_state_dict": (strict_load_file, INTO_MODEL),
    "load_file + load_state_dict(strict=False)": (lambda path: strict_load_file(path, strict=False), INTO_MODEL),
}


def test_digests_are_the_sha256_of_each_tensors_bytes_in_the_file(saved):
    """Anyone can check them with the header's offsets and hashlib; every tensor of the model is listed, in the
    header and in the digest tensor (the same table, with the table's own sha256); headers list model tensors."""
    model, path = saved
    entries, start = header(path)
    digests = json.loads(entries["__metadata__"][DIGEST_KEY])
    assert digests["algorithm"] == "sha256" and list(digests["tensors"]) == list(model.state_dict())
    data = path.read_bytes()
    for name, digest in digests["tensors"].items():
        begin, end = entries[name]["data_offsets"]
        assert hashlib.sha256(data[start + begin:start + end]).hexdigest() == digest, name
    assert entries[DIGEST_TENSOR]["dtype"] == "U8" and len(entries[DIGEST_TENSOR]["shape"]) == 1
    begin, end = entries[DIGEST_TENSOR]["data_offsets"]
    table = json.loads(data[start + begin:start + end])
    assert table["algorithm"] == "sha256" and table["tensors"] == digests["tensors"]
    canonical = json.dumps(table["tensors"], sort_keys=True, separators=(",", ":")).encode()
    assert table["table"] == hashlib.sha256(canonical).hexdigest()
    assert set(read_safetensors_header(str(path))[1]) == set(model.state_dict())


@pytest.mark.parametrize("loader", list(LOADERS))
def test_flipped_payload_bytes_are_caught_by_every_reader(saved, loader):
    model, path = saved
    load, subject = LOADERS[loader]
    load(path)                                                 # the intact file loads
    flip_byte(path, TAMPERED)
    with pytest.raises(CorruptCheckpointError, match=subject.format(path=path) + rf"tensor '{TAMPERED}' does not "
                                                     r"match its sha256 digest \(the file changed after it was saved"):
        load(path)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_reader_hashes_each_tensor_once_and_loads_the_files_tensors(saved, loader, monkeypatch):
    """Verified exactly once per load (the filter drops the digest tensor before the load hook would see it), and
    the model holds the file's tensors, the digest tensor stripped (strict loading saw no unexpected key)."""
    model, path = saved
    hashed = []
    digest = files.tensor_digest
    monkeypatch.setattr(files, "tensor_digest", lambda tensor: hashed.append(tensor.shape) or digest(tensor))
    loaded = LOADERS[loader][0](path)
    assert len(hashed) == len(model.state_dict())
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    assert sorted(loaded) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_the_load_hook_strips_the_digest_tensor_without_touching_the_callers_dict(saved):
    _, path = saved
    state = load_file(str(path))
    result = tiny_vim().load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert DIGEST_TENSOR in state                              # torch hands the hook a copy of the caller's dict


def test_the_load_hook_verifies_under_a_prefix(saved):
    """Our model inside another one, loaded from a state dict whose keys (digest tensor included) carry its prefix."""
    model, path = saved

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_vim()

    state = {f"backbone.{k}": v for k, v in load_file(str(path)).items()}
    wrapper = Wrapper()
    result = wrapper.load_state_dict(state, strict=True)
    assert not result.unexpected_keys and not result.missing_keys
    assert torch.equal(wrapper.backbone.state_dict()[TAMPERED], model.state_dict()[TAMPERED])
    state[f"backbone.{TAMPERED}"] = state[f"backbone.{TAMPERED}"] + 1
    with pytest.raises(CorruptCheckpointError, match=INTO_MODEL + rf"tensor '{TAMPERED}' does not match"):
        Wrapper().load_state_dict(state)


def test_a_filter_fn_that_keeps_the_digest_tensor_is_verified_on_what_it_keeps(saved):
    """timm's load_checkpoint(filter_fn=f): the load hook verifies every listed tensor that arrives under its name;
    tensors f dropped are load_state_dict's business, renamed ones are not checked."""
    model, path = saved
    drop_head = lambda state, model: {k: v for k, v in state.items() if not k.startswith("head.")}  # noqa: E731
    target = tiny_vim()
    head = target.head.weight.detach().clone()
    result = timm.models.load_checkpoint(target, str(path), strict=False, filter_fn=drop_head)
    assert result.missing_keys == ["head.weight", "head.bias"] and not result.unexpected_keys
    assert torch.equal(target.head.weight, head) and torch.equal(target.state_dict()[TAMPERED],
                                                                  model.state_dict()[TAMPERED])
    rename = lambda state, model: {k.replace("norm_f.", "final_norm."): v for k, v in state.items()}  # noqa: E731
    result = timm.models.load_checkpoint(tiny_vim(), str(path), strict=False, filter_fn=rename)
    assert result.unexpected_keys == ["final_norm.weight"]
    # a filter that changes a tensor under its own name without verifying and dropping the digest tensor
    scale = lambda state, model: {k: v * 2 if k == TAMPERED else v for k, v in state.items()}  # noqa: E731
    with pytest.raises(CorruptCheckpointError, match=INTO_MODEL + rf"tensor '{TAMPERED}' does not match its sha256 "
                                                     rf"digest .*a filter_fn changed it.*must drop '{DIGEST_TENSOR}'"):
        timm.models.load_checkpoint(tiny_vim(), str(path), filter_fn=scale)
    flip_byte(path, TAMPERED)
    with pytest.raises(CorruptCheckpointError, match=INTO_MODEL + rf"tensor '{TAMPERED}' does not match"):
        timm.models.load_checkpoint(tiny_vim(), str(path), strict=False, filter_fn=drop_head)


def test_remap_loads_by_order_and_leaves_the_digest_tensor_out(tmp_path):
    """timm's remap zips the model's tensors with the file's, in the file's order. safetensors stores wider dtypes
    first, so the uint8 digest tensor comes after every float tensor and falls off the end of the zip: remap loads as
    it would without it, unverified (the names are the model's, not the file's)."""
    model = timm.create_model("vim_tiny_patch16_224", **TINY_VIM)
    assert {v.dtype for v in model.state_dict().values()} == {torch.float32}
    renamed = {f"t{i:04d}": v for i, v in enumerate(model.state_dict().values())}
    path = tmp_path / "renamed.safetensors"
    write_safetensors(renamed, str(path), config={"model": "vim_tiny_patch16_224", "kwargs": TINY_VIM})
    assert list(load_file(str(path)))[-1] == DIGEST_TENSOR
    target = timm.create_model("vim_tiny_patch16_224", **TINY_VIM)
    timm.models.load_checkpoint(target, str(path), remap=True)
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    flip_byte(path, "t0001")
    timm.models.load_checkpoint(target, str(path), remap=True)              # not verified: documented
    assert not torch.equal(target.state_dict()[list(model.state_dict())[1]], list(model.state_dict().values())[1])


@pytest.mark.parametrize("damage, problem", [
    (dict(at=0, bit=0x01), r"it does not hold a digest table \(JSONDecodeError: "),    # '{' -> 'z': not JSON
    (dict(at=-5, bit=0x01), r"the table does not match its own sha256 digest"),      # a hex digit of the check
], ids=["not-json", "edited"])
@pytest.mark.parametrize("loader", ["read_state_dict", "timm.models.load_checkpoint", "pretrained_cfg_overlay(file)"])
def test_a_damaged_digest_tensor_is_named(saved, damage, problem, loader):
    _, path = saved
    entries, _ = header(path)
    begin, end = entries[DIGEST_TENSOR]["data_offsets"]
    at = damage["at"] if damage["at"] >= 0 else end - begin + damage["at"]
    flip_byte(path, DIGEST_TENSOR, at=at, bit=damage["bit"])
    load, subject = LOADERS[loader]
    with pytest.raises(CorruptCheckpointError, match=subject.format(path=path) + rf"its digest tensor "
                                                     rf"'{DIGEST_TENSOR}' is damaged: {problem}"):
        load(path)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_files_without_digests_still_load(tmp_path, saved, loader):
    """A file written by another tool (plain safetensors, the config kept so load_model can build the model)."""
    model, path = saved
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain),
              metadata={"format": "pt", CONFIG_KEY: json.dumps(getattr(model, CONFIG_KEY))})
    assert DIGEST_KEY not in header(plain)[0]["__metadata__"]
    loaded = LOADERS[loader][0](plain)
    loaded = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    assert torch.equal(loaded[TAMPERED], model.state_dict()[TAMPERED])


@pytest.mark.parametrize("loader", list(LOADERS))
def test_header_only_files_are_verified_by_our_readers_not_by_timms(tmp_path, saved, loader):
    """Files written before the digest tensor existed: our readers verify them from the header; timm's loaders and
    load_file never see the header, so they load them as before, unverified (the documented limit)."""
    model, _ = saved
    old = tmp_path / "old.safetensors"
    write_safetensors(model.state_dict(), str(old), config=getattr(model, CONFIG_KEY), digest_tensor=False)
    assert DIGEST_KEY in header(old)[0]["__metadata__"] and DIGEST_TENSOR not in header(old)[0]
    flip_byte(old, TAMPERED)
    load, subject = LOADERS[loader]
    if subject == FROM_FILE:
        with pytest.raises(CorruptCheckpointError, match=FROM_FILE.format(path=old) + rf"tensor '{TAMPERED}'"):
            load(old)
    else:
        loaded = load(old)
        assert not torch.equal(loaded.state_dict()[TAMPERED], model.state_dict()[TAMPERED])


def test_files_of_other_models_get_no_digest_tensor_and_load_strictly_into_them(tmp_path):
    """No config (a plain timm model trained by dartmamba_train): the header table only, so timm's strict loaders
    see exactly the model's tensors."""
    model = timm.create_model("test_vit")
    path = tmp_path / "plain_timm.safetensors"
    write_safetensors(model.state_dict(), str(path))
    assert DIGEST_TENSOR not in header(path)[0] and DIGEST_KEY in header(path)[0]["__metadata__"]
    loaded = timm.create_model("test_vit", checkpoint_path=str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_write_safetensors_refuses_a_digest_tensor_among_the_tensors(saved, tmp_path):
    _, path = saved
    with pytest.raises(ValueError, match=rf"^tensors must not hold '{DIGEST_TENSOR}' \(write_safetensors writes it; "
                                         r"drop the one a loaded file held\)$"):
        write_safetensors(load_file(str(path)), str(tmp_path / "again.safetensors"))


def test_a_state_dict_of_ours_saved_with_torch_is_verified_by_read_state_dict(saved, tmp_path):
    _, path = saved
    state = load_file(str(path))
    state[TAMPERED] = state[TAMPERED].clone()
    state[TAMPERED][0, 0] += 1
    pth = tmp_path / "resaved.pth"
    torch.save({"model": state}, str(pth))
    with pytest.raises(CorruptCheckpointError, match=FROM_FILE.format(path=pth) + rf"tensor '{TAMPERED}'"):
        read_state_dict(str(pth))


def test_a_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint file not found: {missing}$"):
        dartmamba.load_model(str(missing))


def test_a_truncated_file_named_by_our_reader_and_reported_by_safetensors_through_timm(saved):
    """``checkpoint_path=`` to a truncated file: timm's loader raises safetensors' own error, which does not name
    the file (dartmamba no longer wraps timm's reader; a clear message is issue 26's). Our reader names it."""
    _, path = saved
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(Exception, match=r"^Error while deserializing header") as err:
        timm.create_model("vim_tiny_dart", **KWARGS, checkpoint_path=str(path))
    assert type(err.value).__name__ == "SafetensorError" and not getattr(err.value, "__notes__", None)
    with pytest.raises(ValueError, match=rf"cannot read checkpoint file {path}: it is truncated, corrupt or not a "
                                         r"checkpoint"):
        dartmamba.load_model(str(path))


def test_official_loader_refuses_a_file_where_nothing_matches(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch.save({"model": {"encoder.weight": torch.randn(4, 4), "decoder.bias": torch.randn(4)}}, str(path))
    model = timm.create_model("vim_tiny_patch16_224", **TINY_VIM)
    with pytest.raises(ValueError, match=rf"checkpoint {path}: none of its 2 tensors matches a tensor of the model "
                                         r"\(first unexpected: \['encoder.weight', 'decoder.bias'\]\); it is not a "
                                         r"checkpoint of this architecture"):
        load_official_checkpoint(model, str(path))


def test_weight_transfer_verifies_and_drops_the_digest_tensor(tmp_path):
    """transfer_fixed_grid_weights / inflate_image_checkpoint take any state dict, load_file's of our files too."""
    from dartmamba.models.checkpoints import inflate_image_checkpoint, transfer_fixed_grid_weights

    fixed = timm.create_model("vim_tiny_patch16_224", **TINY_VIM, img_size=64, patch_size=8)
    path = tmp_path / "fixed.safetensors"
    dartmamba.save_model(fixed, str(path))
    report = transfer_fixed_grid_weights(tiny_vim(), load_file(str(path)))
    assert report.unexpected == [] and DIGEST_TENSOR not in report.loaded
    report = inflate_image_checkpoint(timm.create_model("videomamba_tiny", **TINY_VIM, img_size=64, patch_size=8,
                                                        num_frames=2), load_file(str(path)), "middle")
    assert report.unexpected == [] and DIGEST_TENSOR not in report.loaded
    flip_byte(path, TAMPERED)
    for transfer in (transfer_fixed_grid_weights, inflate_image_checkpoint):
        with pytest.raises(CorruptCheckpointError, match=rf"tensor '{TAMPERED}' does not match its sha256 digest"):
            transfer(tiny_vim(), load_file(str(path)))
