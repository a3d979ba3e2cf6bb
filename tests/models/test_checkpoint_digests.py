"""Our safetensors files carry a SHA-256 of every tensor; every reader of ours verifies it (dartmamba.load_model,
timm.create_model(checkpoint_path=...), pretrained_cfg_overlay=dict(file=...), timm.models.load_checkpoint), files
of other tools still load, and unreadable or missing files are errors naming the file."""
import hashlib
import json
import struct

import pytest
import timm
import torch
from safetensors.torch import save_file

import dartmamba
from dartmamba.files import CONFIG_KEY, DIGEST_KEY, CorruptCheckpointError, read_state_dict
from dartmamba.models.checkpoints import load_official_checkpoint

from tests.helpers import TINY_DART, TINY_VIM

KWARGS = {**TINY_VIM, **TINY_DART}


def header(path):
    """(header dict, offset of the payload) of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), 8 + length


def flip_byte(path, tensor, at=3):
    """Flip one bit of ``tensor``'s payload, the header left intact (what a bad copy or disk does)."""
    entries, start = header(path)
    data = bytearray(path.read_bytes())
    data[start + entries[tensor]["data_offsets"][0] + at] ^= 0x08
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path):
    model = timm.create_model("vim_tiny_dart", **KWARGS)
    path = tmp_path / "model.safetensors"
    dartmamba.save_model(model, str(path))
    return model, path


def test_digests_are_the_sha256_of_each_tensors_bytes_in_the_file(saved):
    """Anyone can check them with the header's offsets and hashlib; every tensor of the model is listed."""
    model, path = saved
    entries, start = header(path)
    digests = json.loads(entries["__metadata__"][DIGEST_KEY])
    assert digests["algorithm"] == "sha256" and list(digests["tensors"]) == list(model.state_dict())
    data = path.read_bytes()
    for name, digest in digests["tensors"].items():
        begin, end = entries[name]["data_offsets"]
        assert hashlib.sha256(data[start + begin:start + end]).hexdigest() == digest, name


LOADERS = {
    "load_model": lambda path: dartmamba.load_model(str(path)),
    "create_model(checkpoint_path)": lambda path: timm.create_model("vim_tiny_dart", **KWARGS,
                                                                    checkpoint_path=str(path)),
    "pretrained_cfg_overlay(file)": lambda path: timm.create_model(
        "vim_tiny_dart", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **KWARGS),
    "timm.models.load_checkpoint": lambda path: timm.models.load_checkpoint(
        timm.create_model("vim_tiny_dart", **KWARGS), str(path)),
    "read_state_dict": lambda path: read_state_dict(str(path)),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_flipped_payload_bytes_are_caught_by_every_reader(saved, loader):
    model, path = saved
    LOADERS[loader](path)                                      # the intact file loads
    flip_byte(path, "layers.0.mixer.x_proj.weight")
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint file {path} is corrupt: tensor "
                                                     r"'layers.0.mixer.x_proj.weight' does not match its sha256 digest"):
        LOADERS[loader](path)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_files_without_digests_still_load(tmp_path, saved, loader):
    """A file written by another tool (plain safetensors, the config kept so load_model can build the model)."""
    model, path = saved
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain),
              metadata={"format": "pt", CONFIG_KEY: json.dumps(getattr(model, CONFIG_KEY))})
    assert DIGEST_KEY not in header(plain)[0]["__metadata__"]
    LOADERS[loader](plain)


def test_a_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint file not found: {missing}$"):
        dartmamba.load_model(str(missing))


def test_timm_checkpoint_path_to_a_truncated_file_names_the_file(saved):
    _, path = saved
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(Exception) as err:
        timm.create_model("vim_tiny_dart", **KWARGS, checkpoint_path=str(path))
    assert err.value.__notes__ == [f"cannot read checkpoint file {path}: it is missing, truncated, corrupt or not a "
                                   f"checkpoint"]
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
