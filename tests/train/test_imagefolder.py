"""ImageFolder data through timm (create_dataset / create_transform) with the paper's augmentations: samples are
pure functions of (seed, epoch, index), and a run with RandAugment, Mixup/CutMix, random erasing and EMA trains."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dartmamba_train.config import load_config
from dartmamba_train.data import SeededSamples, build_data, model_data_config
from dartmamba_train.logs import read_csv

from tests.train.train_helpers import run_train, write_recipe

FIXED_DEIT = {"name": "deit_tiny_patch16_224",
              "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", 16), ("val", 4)):
        for cls in ("cat", "dog", "eel"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def recipe(tmp_path, root, **train):
    return write_recipe(tmp_path / "r.yaml", model=FIXED_DEIT,
                        data={"kind": "imagefolder", "root": str(root), "num_workers": 0, "img_size": 32,
                              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
                        aug={"mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1},
                        train={"epochs": 2, "batch_size": 8, "compile": False, "precision": "fp32",
                               "log_interval": 1, "ema": {"enabled": True, "decay": 0.9}, **train})


def test_random_transforms_are_a_function_of_seed_epoch_and_index(tmp_path, image_folder):
    import timm

    cfg = load_config(recipe(tmp_path, image_folder))
    model = timm.create_model(cfg.model.name, num_classes=3, **cfg.model.kwargs)
    bundle = build_data(cfg, model_data_config(model))
    assert isinstance(bundle.train_set, SeededSamples) and bundle.num_classes == 3
    assert len(bundle.train_set) == 48 and len(bundle.val_set) == 12 and bundle.input_size == (3, 32, 32)
    first = [bundle.train_set[i][0] for i in (3, 7)]
    torch.manual_seed(123)                                   # global RNG state does not matter
    again = [bundle.train_set[i][0] for i in (7, 3)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    bundle.train_set.set_epoch(1)
    assert not torch.equal(bundle.train_set[3][0], first[0])
    val = bundle.val_set[2][0]
    assert torch.equal(bundle.val_set[2][0], val) and val.shape == (3, 32, 32)


@pytest.mark.slow
def test_imagefolder_run_with_mixup_cutmix_randaugment_and_ema(tmp_path, image_folder):
    out = tmp_path / "run"
    run_train(["--config", recipe(tmp_path, image_folder), f"output.dir={out}"])
    rows = read_csv(str(out / "summary.csv"))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(r["ema_top1"] for r in rows)
    assert all(0 <= float(r["top1"]) <= 100 and float(r["top5"]) == 100.0 for r in rows)   # 3 classes: top-5 = all
    steps = read_csv(str(out / "steps.csv"))
    assert len(steps) == 12 and all(np.isfinite(float(r["loss"])) for r in steps)
    assert (out / "last_ema.safetensors").is_file() and (out / "best_ema.safetensors").is_file()
