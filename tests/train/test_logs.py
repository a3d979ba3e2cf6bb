"""Run outputs: steps.csv / summary.csv semantics on resume, torn lines, TensorBoard (optional dependency)."""
from __future__ import annotations

import sys

import pytest

from dartmamba_train.logs import RunLogger, read_csv


def interval(logger, step, loss):
    logger.interval(epoch=0, epochs=2, step=step, step_in_epoch=step, steps_in_epoch=4, loss=loss, local_loss=loss,
                    lr=1e-3, img_per_s=100.0, data_ms=1.0, eta_s=10.0)


def test_resume_keeps_rows_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path, capsys):
    logger = RunLogger(str(tmp_path), 0, progress_bar=False, tensorboard=False, rank_log=True)
    for step in range(1, 5):
        interval(logger, step, 2.0 / step)
    logger.close()
    with open(tmp_path / "steps.csv", "a") as handle:
        handle.write("1,5,0.4")                       # a line cut short by kill -9
    assert [r["step"] for r in read_csv(str(tmp_path / "steps.csv"))] == ["1", "2", "3", "4"]
    history = [{"epoch": 1, "step": 2, "train_loss": 1.5, "lr": 1e-3, "val_loss": 1.0, "top1": 50.0, "top5": 90.0,
                "ema_top1": None, "ema_top5": None, "epoch_time_s": 3.0, "img_per_s": 10.0}]
    resumed = RunLogger(str(tmp_path), 0, progress_bar=False, tensorboard=False, rank_log=True, resume_step=2,
                        history=history)
    assert [r["step"] for r in read_csv(str(tmp_path / "steps.csv"))] == ["1", "2"]
    assert [r["step"] for r in read_csv(str(tmp_path / "ranks" / "rank0.csv"))] == ["1", "2"]
    summary = read_csv(str(tmp_path / "summary.csv"))
    assert summary == [{"epoch": "1", "step": "2", "train_loss": "1.5", "lr": "0.001", "val_loss": "1", "top1": "50",
                        "top5": "90", "ema_top1": "", "ema_top5": "", "epoch_time_s": "3", "img_per_s": "10"}]
    interval(resumed, 3, 0.7)
    assert read_csv(str(tmp_path / "steps.csv"))[-1]["loss"] == "0.7"
    resumed.close()
    assert "epoch 1/2 step 3/4 (update 3)  loss 0.7000  lr 1.000e-03  100 img/s  data 1.0 ms/step  ETA 0:00:10" \
        in capsys.readouterr().out


def test_other_ranks_write_nothing_shared(tmp_path):
    logger = RunLogger(str(tmp_path), 1, progress_bar=True, tensorboard=True, rank_log=False)
    interval(logger, 1, 1.0)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    logger = RunLogger(str(tmp_path), 0, progress_bar=False, tensorboard=True, rank_log=False)
    interval(logger, 1, 1.0)
    logger.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"output.tensorboard=true needs the tensorboard package "
                                          r"\(pip install 'dartmamba\[tensorboard\]'\)"):
        RunLogger(str(tmp_path), 0, progress_bar=False, tensorboard=True, rank_log=False)
