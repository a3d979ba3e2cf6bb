"""The moving-digit clips (``data.kind: video_canvas``): the data set, its config, and training the video models through
the real entry points (``dartmamba-train`` in one process, the ``deepspeed`` launcher with two ranks)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from dartmamba.data import MovingDigitClips, digits_source
from dartmamba.data.video_canvas import bounce
from dartmamba_train.config import ConfigError, load_config

from dartmamba_train.config import deep_merge
from tests.train.train_helpers import REPO, TINY_DART, TRAIN_SCRIPT, ds_json, train_env, write_recipe

VIDEO_RECIPE = os.path.join(REPO, "configs", "video", "videomamba_dart.yaml")
GRID_RECIPE = os.path.join(REPO, "configs", "video", "videomamba_grid.yaml")

# the image tests' tiny recipe on 3-frame clips, with a VideoMamba-DART instead of the DeiT-DART
TINY_VIDEO = {**deep_merge(TINY_DART, {
    "data": {"kind": "video_canvas", "num_classes": 10, "canvas": {"train_length": 64, "val_length": 24},
             "video": {"num_frames": 3, "speed": [1.0, 2.0]}},
    "train": {"epochs": 1, "batch_size": 16},
}), "model": {"name": "videomamba_tiny_dart",
              "kwargs": {"img_size": 32, "patch_size": 8, "num_frames": 3, "num_tokens": 24, "embed_dim": 32,
                         "depth": 2, "d_state": 8, "expand": 1, "tokenizer_cfg": {"trunk": "tiny_cnn"}}}}


def clips(**overrides):
    images, labels = digits_source("train")
    cfg = dict(num_frames=4, canvas_size=48, object_size=(12, 16), num_distractors=(2, 3), length=20, seed=3)
    cfg.update(overrides)
    return MovingDigitClips(images, labels, **cfg), labels


def test_bounce_reflects_at_the_borders():
    positions = bounce(np.array([0.0, 4.0]), np.array([3.0, -3.0]), np.arange(6.0), np.array([5.0, 5.0]))
    np.testing.assert_allclose(positions[:, 0], [0, 3, 4, 1, 2, 5])
    np.testing.assert_allclose(positions[:, 1], [4, 1, 2, 5, 2, 1])


def test_clips_show_one_digit_moving_over_a_static_scene():
    data, labels = clips(frame_noise_std=0.0, speed=(2.0, 3.0))
    for index in range(6):
        sample = data.render(index)
        assert sample.video.shape == (3, 4, 48, 48) and sample.label == labels[index % len(labels)]
        boxes = sample.boxes
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all()
        sizes = boxes[:, 2:] - boxes[:, :2]
        assert (sizes == sizes[0]).all() and 12 <= sizes[0].max() <= 16
        steps = (boxes[1:, :2] - boxes[:-1, :2]).norm(dim=1)
        assert (steps <= 3.0 + 1.5).all() and steps.sum() > 0           # constant speed, rounded to pixels
        # outside the object's boxes in two consecutive frames, nothing changes
        for t in range(3):
            still = torch.ones(48, 48, dtype=torch.bool)
            for box in (boxes[t], boxes[t + 1]):
                x0, y0, x1, y1 = box.long().tolist()
                still[y0:y1, x0:x1] = False
            assert torch.equal(sample.video[:, t][:, still], sample.video[:, t + 1][:, still])
        assert torch.allclose(sample.masks.sum(dim=(1, 2)), sample.masks[0].sum())


def test_clips_are_pure_functions_of_seed_epoch_and_index():
    data, _ = clips(resample_per_epoch=True)
    first = data.render(5).video
    assert torch.equal(data.render(5).video, first)
    data.set_epoch(1)
    assert not torch.equal(data.render(5).video, first)
    fixed, _ = clips()
    before = fixed.render(2).video
    fixed.set_epoch(7)
    assert torch.equal(fixed.render(2).video, before)


def test_frame_noise_is_fresh_in_every_frame_and_decoys_stand_still():
    data, _ = clips(frame_noise_std=0.05)
    video = data.render(1).video
    assert not torch.equal(video[:, 0, :4, :4], video[:, 1, :4, :4])
    decoyed, labels = clips(num_decoys=1, frame_noise_std=0.0, num_distractors=(0, 0))
    sample = decoyed.render(3)
    assert len(sample.decoys) == 1 and sample.decoys[0] != sample.source_index
    moving = torch.zeros(48, 48, dtype=torch.bool)
    for box in sample.boxes:
        x0, y0, x1, y1 = box.long().tolist()
        moving[y0:y1, x0:x1] = True
    static = sample.video[:, :, ~moving]                                  # (C, T, pixels)
    assert (static == static[:, :1]).all() and static.max() > 0.5        # the decoy's ink, in every frame


def test_output_size_area_averages_every_frame_and_normalisation():
    data, _ = clips(output_size=24, frame_noise_std=0.0)
    full, _ = clips(frame_noise_std=0.0)
    small, big = data.render(0), full.render(0)
    torch.testing.assert_close(small.video, torch.nn.functional.avg_pool3d(big.video, (1, 2, 2)))
    torch.testing.assert_close(small.boxes, big.boxes / 2)
    normed, _ = clips(mean=[0.5] * 3, std=[0.25] * 3)
    video, label = normed[0]
    torch.testing.assert_close(video, (normed.render(0).video - 0.5) / 0.25)


def test_bad_arguments_are_clear_errors():
    images, labels = digits_source("train")
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 0"):
        MovingDigitClips(images, labels, num_frames=0)
    with pytest.raises(ValueError, match="speed must be >= 0"):
        MovingDigitClips(images, labels, speed=(-1.0, 2.0))
    with pytest.raises(ValueError, match="num_decoys must be an int >= 0"):
        MovingDigitClips(images, labels, num_decoys=-1)
    with pytest.raises(ValueError, match="output_size must be an int in"):
        MovingDigitClips(images, labels, canvas_size=32, object_size=(8, 12), output_size=40)
    with pytest.raises(IndexError, match="index 20 out of range for MovingDigitClips of length 20"):
        clips()[0].render(20)


def test_video_recipes_load_and_build_their_data():
    import timm

    import dartmamba.models  # noqa: F401
    from dartmamba_train.data import build_data, model_data_config

    for path in (VIDEO_RECIPE, GRID_RECIPE):
        cfg = load_config(path, ["data.canvas.train_length=8", "data.canvas.val_length=4"])
        model = timm.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
        bundle = build_data(cfg, model_data_config(model))
        video, label = bundle.train_set[0]
        assert isinstance(bundle.train_set, MovingDigitClips) and bundle.num_classes == 10
        assert tuple(video.shape) == bundle.input_size == (3, 4, model.patch_embed.img_size[0],
                                                           model.patch_embed.img_size[1])
        assert model(video[None]).shape == (1, 10)


def test_video_config_errors_name_the_key(tmp_path):
    recipe = write_recipe(tmp_path / "v.yaml", TINY_VIDEO)
    with pytest.raises(ConfigError, match="data.num_classes: required when data.kind is 'video_canvas'"):
        load_config(recipe, ["data.num_classes=null"])
    with pytest.raises(ConfigError, match="aug.cutmix: must be 0 for video clips"):
        load_config(recipe, ["aug.cutmix=1.0"])
    with pytest.raises(ConfigError, match=r"data.video.speed: expected low <= high"):
        load_config(recipe, ["data.video.speed=[3.0, 1.0]"])
    with pytest.raises(ConfigError, match="unknown key 'data.video.frames'"):
        load_config(recipe, ["data.video.frames=4"])

    import timm

    import dartmamba.models  # noqa: F401
    from dartmamba_train.data import build_data, model_data_config

    cfg = load_config(recipe, ["data.video.num_frames=4"])
    model = timm.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    with pytest.raises(ConfigError, match="the clips are 4 frames of 32x32 but the model takes 3 frames of 32x32"):
        build_data(cfg, model_data_config(model))
    image_model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=1)
    with pytest.raises(ConfigError, match="'video_canvas' needs a video model"):
        build_data(load_config(recipe), model_data_config(image_model))


def _reported_top1_matches_the_weights(out) -> None:
    import timm
    from safetensors.torch import load_file

    import dartmamba.models  # noqa: F401
    from dartmamba_train.data import build_data, model_data_config
    from dartmamba_train.logs import read_csv

    cfg = load_config(str(out / "config.yaml"))
    model = timm.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    model.load_state_dict(load_file(str(out / "last.safetensors")))
    model.eval()
    val = build_data(cfg, model_data_config(model)).val_set
    videos, labels = zip(*(val[i] for i in range(len(val))))
    with torch.no_grad():
        predictions = model(torch.stack(videos)).argmax(dim=1)
    top1 = 100.0 * (predictions == torch.tensor(labels)).float().mean().item()
    assert float(read_csv(str(out / "summary.csv"))[-1]["top1"]) == pytest.approx(top1, abs=1e-4)


def test_dartmamba_train_trains_a_video_model(tmp_path):
    pytest.importorskip("deepspeed")
    recipe = write_recipe(tmp_path / "v.yaml", TINY_VIDEO)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dartmamba.train_entry", "--config", recipe, f"output.dir={out}"],
                            cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "videomamba_tiny_dart" in result.stdout + result.stderr
    _reported_top1_matches_the_weights(out)


@pytest.mark.slow
def test_two_ranks_train_a_video_model_with_the_deepspeed_launcher(tmp_path):
    pytest.importorskip("deepspeed")
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not on PATH"
    recipe = write_recipe(tmp_path / "v.yaml", TINY_VIDEO, train={"epochs": 1, "batch_size": 8})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, launcher, "--num_gpus", "2", "--master_port", str(port), TRAIN_SCRIPT, "--config", recipe,
           f"output.dir={out}", "output.rank_log=true", "deepspeed.stage=2"]
    result = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from dartmamba_train.logs import read_csv

    ranks = [read_csv(str(out / "ranks" / f"rank{r}.csv")) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4                   # 64 clips / (2 ranks x 8)
    assert [r["loss"] for r in ranks[0]] == [r["loss"] for r in ranks[1]]
    assert all(a["local_loss"] != b["local_loss"] for a, b in zip(*ranks))
    _reported_top1_matches_the_weights(out)
