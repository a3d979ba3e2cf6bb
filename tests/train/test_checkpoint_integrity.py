"""Resume verifies what it restores (in-process gloo group): the weights DeepSpeed restores must hash to the digests
of the checkpoint's model.safetensors (true bit for bit for every ZeRO stage and precision), and a damaged DeepSpeed
file or EMA file is an error naming it, before training continues."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from dartmamba.files import tensor_digest
from dartmamba_train.checkpoint import CheckpointError, TrainerState, load_checkpoint, save_checkpoint
from dartmamba_train.engine import consolidated_state_dict

from tests.train.train_helpers import canvas_batch, make_engine, train_steps

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def batch():
    return canvas_batch()


def saved_run(tmp_path, dist_group, batch, overrides, ema=None):
    cfg, parts = make_engine(tmp_path, overrides, seed=0)
    train_steps(cfg, parts, batch, 2)
    state = TrainerState(epoch=1, global_step=2, world_size=1, zero_stage=parts.zero_stage,
                         precision=cfg.train.precision)
    out = tmp_path / "run"
    save_checkpoint(parts, ema, state, str(out), dist_group, is_best=True, keep_last=2)
    return cfg, parts, out / "checkpoints"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_restored_weights_match_the_saved_digests(tmp_path, dist_group, batch, stage, precision):
    overrides = [f"deepspeed.stage={stage}", f"train.precision={precision}"]
    cfg, parts, root = saved_run(tmp_path, dist_group, batch, overrides)
    saved = consolidated_state_dict(parts)
    _, fresh = make_engine(tmp_path, overrides, seed=1)                   # other initial weights
    assert any(not torch.equal(saved[k], v) for k, v in consolidated_state_dict(fresh).items())
    state = load_checkpoint(fresh, None, str(root), "epoch0001", dist_group, precision)
    assert state.global_step == 2
    restored = consolidated_state_dict(fresh)
    assert all(tensor_digest(restored[k]) == tensor_digest(saved[k]) for k in saved)


def test_a_damaged_deepspeed_file_is_refused_at_resume(tmp_path, dist_group, batch):
    cfg, parts, root = saved_run(tmp_path, dist_group, batch, ["deepspeed.stage=0", "train.precision=fp32"])
    states = root / "epoch0001" / "mp_rank_00_model_states.pt"
    content = torch.load(states, weights_only=False)
    content["module"]["head.bias"][0] += 1.0                  # what a flipped exponent bit on disk would do
    torch.save(content, states)
    _, fresh = make_engine(tmp_path, ["deepspeed.stage=0", "train.precision=fp32"], seed=1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(fresh, None, str(root), "epoch0001", dist_group, "fp32")
    assert str(err.value).startswith(f"resume: the weights DeepSpeed restored from {root}/epoch0001 are not the ones "
                                     f"saved there (tensor 'head.bias' does not match its sha256 digest of "
                                     f"model.safetensors)")


def test_a_damaged_ema_file_is_refused_at_resume(tmp_path, dist_group, batch):
    from timm.utils import ModelEmaV3

    cfg, parts = make_engine(tmp_path, ["deepspeed.stage=0", "train.precision=fp32"], seed=0)
    ema = ModelEmaV3(parts.engine.module, decay=0.5)
    train_steps(cfg, parts, batch, 1)
    out = tmp_path / "run"
    save_checkpoint(parts, ema, TrainerState(epoch=1, global_step=1), str(out), dist_group, is_best=False,
                    keep_last=2)
    path = out / "checkpoints" / "epoch0001" / "model_ema.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])                 # safetensors: header length, JSON header, payloads
    begin, _ = json.loads(data[8:8 + length])["head.weight"]["data_offsets"]
    data[8 + length + begin + 3] ^= 0x40                      # inside a weight's payload (not the digest tensor)
    os.remove(path)                                           # a hard link to last_ema.safetensors: write a new file
    path.write_bytes(bytes(data))
    _, fresh = make_engine(tmp_path, ["deepspeed.stage=0", "train.precision=fp32"], seed=1)
    with pytest.raises(CheckpointError, match=rf"resume: EMA checkpoint file {path} is corrupt: tensor '[^']+' does "
                                              r"not match its sha256 digest"):
        load_checkpoint(fresh, ModelEmaV3(fresh.engine.module, decay=0.5), str(out / "checkpoints"), "epoch0001",
                        dist_group, "fp32")
