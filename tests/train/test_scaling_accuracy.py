"""The scaling study's accuracy metric through dartmamba_train.scaling.canvas_cell: real canvas training runs."""
from __future__ import annotations

import csv
import os

import pytest


pytest.importorskip("deepspeed")

from benchmarks import scaling  # noqa: E402
from dartmamba_train.scaling import canvas_cell, canvas_overrides  # noqa: E402

MODEL = {"patch_size": 8, "embed_dim": 32, "depth": 1, "d_state": 4, "expand": 1}
DART = {"img_size": 64, "grid_size": 4, "dart_cfg": {"trunk": "tiny_cnn", "head": "v2"}}
TRAIN = {"epochs": 1, "threads": 1,
         "overrides": ["data.canvas.train_length=128", "data.canvas.val_length=64", "train.batch_size=32"]}


def test_study_trains_each_cell_on_the_canvas_and_resumes(tmp_path):
    cells = scaling.make_cells(["vim"], ["ti"], ["fixed", "dart"], [16], MODEL, None, DART)
    out = tmp_path / "study"
    first = scaling.run_study(cells, ["flops", "accuracy"], out, train_fn=canvas_cell, train_kwargs=TRAIN,
                              log=lambda *_: None)
    assert (first.done, first.skipped, first.remaining) == (4, 0, 0)
    with open(out / "scaling.csv", newline="") as handle:
        rows = {row["tokenizer"]: row for row in csv.DictReader(handle)}
    for tokenizer, row in rows.items():
        assert row["accuracy_status"] == "ok"
        accuracy = float(row["accuracy"])
        run_dir = out / "train" / row["cell"] / "run"
        with open(run_dir / "summary.csv", newline="") as handle:
            final = list(csv.DictReader(handle))[-1]
        assert accuracy == pytest.approx(float(final["top1"]))        # the study reports the run's own top-1
        assert 0.0 <= accuracy <= 100.0
        saved = (run_dir / "config.yaml").read_text()
        assert row["model"] in saved                                   # the cell's own model was trained
    assert "output_size: 32" in (out / "train" / rows["fixed"]["cell"] / "run" / "config.yaml").read_text()
    assert float(rows["dart"]["gflops"]) > float(rows["fixed"]["gflops"])   # the scorer and resampling cost
    for name in ("accuracy_vs_tokens.png", "accuracy_vs_flops.png"):
        assert (out / name).stat().st_size > 0

    again = scaling.run_study(cells, ["flops", "accuracy"], out, train_fn=canvas_cell, train_kwargs=TRAIN,
                              log=lambda *_: None)
    assert (again.done, again.skipped) == (0, 4)


def test_a_finished_run_is_reused_without_training(tmp_path):
    name, kwargs = scaling.cell_model("vim", "ti", "fixed", 16, overrides=MODEL)
    cell = {"family": "vim", "size": "tiny", "tokenizer": "fixed", "tokens": 16, "model": name,
            "model_kwargs": kwargs, "workdir": str(tmp_path / "cell"), **TRAIN}
    run_dir = tmp_path / "cell" / "run"
    os.makedirs(run_dir)
    (run_dir / "summary.csv").write_text("epoch,top1,top5\n1,42.5,90.0\n")
    result = canvas_cell(cell)
    assert result["accuracy"] == 42.5 and result["train_seconds"] is None
    assert not (tmp_path / "cell" / "train.log").exists()


@pytest.mark.parametrize("tokenizer, kwargs, message", [
    ("dart", {"img_size": 448, "num_tokens": 16}, "a DART cell resamples from the whole canvas, so "
                                                  "model_kwargs['img_size'] must be the canvas size 64, got 448"),
    ("fixed", {"img_size": 128, "patch_size": 8}, "a fixed grid of 256 tokens reads 128x128 pixels, more than the "
                                                  "64x64 canvas"),
    ("fixed", {"img_size": (32, 64)}, "model_kwargs['img_size'] must be one int for the canvas"),
])
def test_cells_the_canvas_cannot_hold_are_refused_by_name(tokenizer, kwargs, message):
    cell = {"family": "vim", "size": "tiny", "tokenizer": tokenizer, "tokens": 256 if tokenizer == "fixed" else 16,
            "model": "vim_tiny_dart", "model_kwargs": kwargs}
    with pytest.raises(ValueError) as info:
        canvas_overrides(cell, 64)
    assert message in str(info.value)
    assert f"cell vim-tiny-{tokenizer}-" in str(info.value)


def test_a_failed_run_is_an_error_with_the_log(tmp_path):
    cell = {"family": "vim", "size": "tiny", "tokenizer": "fixed", "tokens": 16, "model": "vim_no_such_model",
            "model_kwargs": {"img_size": 32, "patch_size": 8}, "workdir": str(tmp_path / "cell"), **TRAIN}
    with pytest.raises(RuntimeError, match=r"training exited with status \d+ \(log: .*train\.log\)"):
        canvas_cell(cell)
