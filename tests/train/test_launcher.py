"""Two CPU processes under the ``deepspeed`` launcher (gloo): ranks agree on the loss, hold different data, and the
checkpoint loads back (consolidated safetensors = DeepSpeed's own zero_to_fp32 consolidation; the reported
accuracy is what the loaded weights give)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from dartmamba_train.logs import read_csv

from tests.train.train_helpers import REPO, TRAIN_SCRIPT, train_env, write_recipe

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_with_the_deepspeed_launcher(tmp_path):
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not on PATH"
    recipe = write_recipe(tmp_path / "r.yaml", train={"epochs": 2, "batch_size": 16, "compile": False,
                                                      "precision": "fp32", "log_interval": 1, "keep_last": 1})
    out = tmp_path / "run"
    cmd = [sys.executable, launcher, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN_SCRIPT,
           "--config", recipe, f"output.dir={out}", "output.rank_log=true", "deepspeed.stage=2"]
    result = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [read_csv(str(out / "ranks" / f"rank{r}.csv")) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12                  # 192 canvases / (2 ranks x 16) x 2 epochs
    assert [r["loss"] for r in ranks[0]] == [r["loss"] for r in ranks[1]]         # the all-reduced loss
    assert all(a["local_loss"] != b["local_loss"] for a, b in zip(*ranks))        # different shards
    for a, b in zip(*ranks):
        assert float(a["loss"]) == pytest.approx((float(a["local_loss"]) + float(b["local_loss"])) / 2, rel=1e-5)
    steps = read_csv(str(out / "steps.csv"))
    assert [r["loss"] for r in steps] == [r["loss"] for r in ranks[0]]

    # the checkpoint loads back: DeepSpeed's own consolidation of the ZeRO-2 partitions = our safetensors
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (out / "checkpoints" / "last").read_text()
    zero_state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    weights = load_file(str(out / "last.safetensors"))
    assert set(zero_state) <= set(weights)
    assert all(torch.equal(zero_state[k].float(), weights[k]) for k in zero_state)

    # and the accuracy the run reported is what the loaded weights give on the validation canvases
    import dartmamba.models  # noqa: F401
    from dartmamba.data import ClutteredCanvas, digits_source
    from dartmamba_train.config import load_config
    from dartmamba_train.data import build_data, model_data_config

    cfg = load_config(str(out / "config.yaml"))
    model = timm.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    model.load_state_dict(weights)
    model.eval()
    val = build_data(cfg, model_data_config(model)).val_set
    assert isinstance(val, ClutteredCanvas) and len(val) == 48
    images, labels = zip(*(val[i] for i in range(len(val))))
    with torch.no_grad():
        predictions = model(torch.stack(images)).argmax(dim=1)
    top1 = 100.0 * (predictions == torch.tensor(labels)).float().mean().item()
    reported = float(read_csv(str(out / "summary.csv"))[-1]["top1"])
    assert reported == pytest.approx(top1, abs=1e-4)
    assert digits_source  # the val canvases come from the held-out digits
