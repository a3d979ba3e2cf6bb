"""Helpers of the training tests: a tiny recipe (a 2-block DeiT-DART on 32x32 canvases), running train.py in a
fresh process, and DeepSpeed engines of the recipe in this process (with the ``dist_group`` fixture)."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO, "train", "train.py")


def ds_json(stage: int) -> str:
    """The installed recipes' DeepSpeed JSON of ZeRO ``stage`` (an absolute path: recipes written to a temporary
    folder cannot name it relative to themselves)."""
    from importlib.resources import files

    return str(files("dartmamba_configs") / "deepspeed" / f"zero{stage}.json")


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
    "deepspeed": {"config": ds_json(0)},
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



def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under ``folder`` but lock files (their content changes hands)."""
    import hashlib

    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not name.endswith(".lock"):
                with open(path, "rb") as handle:
                    files[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return files


def canvas_batch():
    """A fixed batch of 16 canvases (32x32) and labels."""
    import torch

    from dartmamba.data import ClutteredCanvas, digits_source

    images, labels = digits_source("train")
    ds = ClutteredCanvas(images, labels, canvas_size=32, object_size=(12, 16), num_distractors=(1, 2), seed=5,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    xs, ys = zip(*(ds[i] for i in range(16)))
    return torch.stack(xs), torch.tensor(ys)


def make_engine(tmp_path, overrides, seed=0, freeze=None):
    """(cfg, EngineParts) of the tiny recipe with ``overrides``, weights drawn from ``seed``."""
    import torch

    from dartmamba_train.config import load_config
    from dartmamba_train.engine import (build_deepspeed_config, create_model, create_optimizer, create_scheduler,
                                        initialize_engine)

    cfg = load_config(write_recipe(tmp_path / "r.yaml"), ["optim.lr=3e-3", "train.batch_size=16", *overrides])
    torch.manual_seed(seed)
    model = create_model(cfg, 10)
    if freeze:
        for name, param in model.named_parameters():
            if name.startswith(freeze):
                param.requires_grad_(False)
    optimizer = create_optimizer(cfg, model, 1)
    scheduler = create_scheduler(cfg, optimizer, updates_per_epoch=10)
    return cfg, initialize_engine(cfg, model, optimizer, scheduler, build_deepspeed_config(cfg, 1))


def train_steps(cfg, parts, batch, steps):
    import torch

    from dartmamba_train.engine import train_micro_step

    loss_fn = torch.nn.CrossEntropyLoss()
    parts.engine.train()
    return [train_micro_step(parts.engine, batch[0], batch[1], loss_fn, cfg).item() for _ in range(steps)]


def start_train(args: list[str], log_path, env: dict | None = None) -> subprocess.Popen:
    """``python train/train.py <args>`` started in the background, stdout and stderr into ``log_path`` (a file, not
    a pipe nobody reads: it could fill up). ``train_env`` sets PYTHONUNBUFFERED, so each log line is in the file
    once printed."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, TRAIN_SCRIPT, *args], cwd=REPO, env=env or train_env(), stdout=log,
                                stderr=subprocess.STDOUT)


def read_text(path) -> str:
    """A file's text, '' while it does not exist."""
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def wait_for_log(proc: subprocess.Popen, log_path, needle: str, timeout: float = 300.0,
                 poll_s: float = 0.005) -> bool:
    """Poll ``log_path`` until a line holding ``needle`` is in it (True) or ``proc`` exits without it (False).
    A line counts once its newline is written. Raises TimeoutError after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        text = read_text(log_path)
        complete = text[:text.rfind("\n") + 1]
        if needle in complete:
            return True
        if proc.poll() is not None:
            text = read_text(log_path)
            return needle in text[:text.rfind("\n") + 1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {needle!r} in {log_path} after {timeout:.0f} s")
        time.sleep(poll_s)


def weights_digest(path) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a ``.safetensors`` file's tensors (the file's own digest
    tensor included), independent of the file's header layout."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


TIMING = {"img_per_s", "data_ms", "epoch_time_s"}       # the log columns that differ between identical runs


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(out, ref, *, updates: int, epochs: int) -> None:
    """The run in ``out`` is the uninterrupted run ``ref``: steps.csv (loss and lr strings, update by update: one
    row per update), summary.csv (one row per epoch) and the final weights, bit for bit."""
    import torch
    from safetensors.torch import load_file

    from dartmamba_train.logs import read_csv

    steps, ref_steps = read_csv(os.path.join(out, "steps.csv")), read_csv(os.path.join(ref, "steps.csv"))
    assert [int(r["step"]) for r in ref_steps] == list(range(1, updates + 1))
    assert strip_timing(steps) == strip_timing(ref_steps)
    summary, ref_summary = read_csv(os.path.join(out, "summary.csv")), read_csv(os.path.join(ref, "summary.csv"))
    assert len(summary) == epochs and strip_timing(summary) == strip_timing(ref_summary)
    final = load_file(os.path.join(out, "last.safetensors"))
    ref_final = load_file(os.path.join(ref, "last.safetensors"))
    assert final.keys() == ref_final.keys() and all(torch.equal(final[k], ref_final[k]) for k in final)


def recipe_and_reference(file_name: str, **sections):
    """Module-scoped fixtures ``recipe`` (the tiny recipe with ``sections`` merged, written as ``file_name``) and
    ``reference`` (the output folder of its uninterrupted run): ``recipe, reference = recipe_and_reference(...)``."""
    import pytest

    @pytest.fixture(scope="module")
    def recipe(tmp_path_factory):
        return write_recipe(tmp_path_factory.mktemp("recipe") / file_name, **sections)

    @pytest.fixture(scope="module")
    def reference(recipe, tmp_path_factory):
        out = tmp_path_factory.mktemp("reference")
        run_train(["--config", recipe, f"output.dir={out}"])
        return out

    return recipe, reference
