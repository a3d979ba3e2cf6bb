"""Helpers of the training tests (imported by name; tests/ has no packages): a tiny recipe (a 2-block DeiT-DART or DeiT on 32x32 canvases) and an
in-process, single-rank gloo group for DeepSpeed."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO, "train", "train.py")

TINY_DART = {
    "model": {"name": "deit_tiny_dart",
              "kwargs": {"img_size": 32, "patch_size": 8, "grid_size": 4, "num_tokens": 16, "embed_dim": 32,
                         "depth": 2, "num_heads": 2, "dart_cfg": {"trunk": "tiny_cnn", "head": "v2"}}},
    "data": {"kind": "canvas", "num_workers": 0,
             "canvas": {"canvas_size": 32, "object_size": [12, 16], "num_distractors": [1, 2],
                        "train_length": 192, "val_length": 48}},
    "aug": {"mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1},
    "optim": {"lr": 2.0e-3, "weight_decay": 0.05},
    "sched": {"warmup_epochs": 0},
    "train": {"epochs": 3, "batch_size": 32, "compile": False, "precision": "fp32", "log_interval": 1,
              "keep_last": 1},
    "deepspeed": {"config": "deepspeed/zero0.json"},
    "output": {"progress_bar": False},
}


def write_recipe(path, recipe=None, **sections) -> str:
    data = yaml.safe_load(yaml.safe_dump(recipe or TINY_DART))
    for key, value in sections.items():
        data[key] = value if key == "model" else {**data.get(key, {}), **value}
    with open(path, "w") as handle:
        yaml.safe_dump(data, handle)
    return str(path)


def train_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)        # the in-process group of other tests must not leak into subprocesses
    return env


def run_train(args: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``python train/train.py <args>`` in a fresh process."""
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, *args], capture_output=True, text=True, cwd=REPO,
                            env=kwargs.pop("env", train_env()), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result

