"""Checkpoint folder bookkeeping (no DeepSpeed): pointers, pruning, resume lookup, a fresh run's check and moving a
previous run aside, atomic writes."""
from __future__ import annotations

import os

import pytest

from dartmamba.files import atomic_path, atomic_write_text
from dartmamba_train.checkpoint import (STATE_FILE, CheckpointError, OutputNotEmpty, _prune, check_fresh_output,
                                       find_checkpoint, move_aside)


def fake_checkpoint(root, tag):
    folder = root / tag
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    return folder


def test_prune_keeps_last_best_and_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for epoch in range(1, 7):
        fake_checkpoint(root, f"epoch{epoch:04d}")
    (root / "last").write_text("epoch0006")
    (root / "best").write_text("epoch0002")
    _prune(str(root), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["best", "epoch0002", "epoch0005", "epoch0006", "last"]


def test_find_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert find_checkpoint(None, str(out)) is None
    assert find_checkpoint("auto", str(out)) is None                     # nothing to resume yet: a fresh start
    root = out / "checkpoints"
    fake_checkpoint(root, "epoch0003")
    # no pointer and no intact tag (the fake's files do not verify): an error, never a silent fresh start
    with pytest.raises(CheckpointError, match=rf"resume=auto: {root}/last is missing and no checkpoint in {root} is "
                                              rf"intact \(epoch0003: cannot read checkpoint file "):
        find_checkpoint("auto", str(out))
    (root / "last").write_text("epoch0003")
    assert find_checkpoint("auto", str(out)) == (str(root), "epoch0003")
    assert find_checkpoint(str(root), "elsewhere") == (str(root), "epoch0003")
    assert find_checkpoint(str(root / "epoch0003"), "elsewhere") == (str(root), "epoch0003")
    with pytest.raises(FileNotFoundError, match=f"resume: no checkpoint at {tmp_path}/nope"):
        find_checkpoint(str(tmp_path / "nope"), str(out))


def test_a_fresh_run_refuses_a_previous_run_and_overwrite_moves_it_aside(tmp_path):
    check_fresh_output(str(tmp_path))                                    # empty: fine
    fake_checkpoint(tmp_path / "checkpoints", "epoch0009")
    for name in ("last.safetensors", "best_ema.safetensors", "summary.csv", "notes.txt"):
        (tmp_path / name).write_text("old")
    with pytest.raises(OutputNotEmpty, match=r"\(checkpoints/epoch0009, last.safetensors, best_ema.safetensors\); "
                                             r"resume=auto continues that run, output.overwrite=true moves them aside"):
        check_fresh_output(str(tmp_path))
    moved = move_aside(str(tmp_path))
    assert os.path.dirname(moved) == str(tmp_path) and os.path.basename(moved).startswith("previous-")
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(moved), "notes.txt"])
    assert sorted(os.listdir(moved)) == ["best_ema.safetensors", "checkpoints", "last.safetensors", "summary.csv"]
    assert (tmp_path / moved / "checkpoints" / "epoch0009" / STATE_FILE).read_text() == "{}"
    check_fresh_output(str(tmp_path))                                    # nothing left in the way
    assert move_aside(str(tmp_path)) is None


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    path = tmp_path / "file.txt"
    atomic_write_text(str(path), "old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["file.txt"]
    atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["file.txt"]
