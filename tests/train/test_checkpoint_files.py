"""Checkpoint folder bookkeeping (no DeepSpeed): pointers, pruning, resume lookup, fresh-run clearing, atomic
writes."""
from __future__ import annotations

import os

import pytest

from dartmamba.files import atomic_path, atomic_write_text
from dartmamba_train.checkpoint import STATE_FILE, _prune, clear_checkpoints, find_checkpoint


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
    assert find_checkpoint("auto", str(out)) is None                     # no pointer: the save never completed
    (root / "last").write_text("epoch0003")
    assert find_checkpoint("auto", str(out)) == (str(root), "epoch0003")
    assert find_checkpoint(str(root), "elsewhere") == (str(root), "epoch0003")
    assert find_checkpoint(str(root / "epoch0003"), "elsewhere") == (str(root), "epoch0003")
    with pytest.raises(FileNotFoundError, match=f"resume: no checkpoint at {tmp_path}/nope"):
        find_checkpoint(str(tmp_path / "nope"), str(out))


def test_a_fresh_run_clears_a_previous_runs_checkpoints(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", "epoch0009")
    for name in ("last.safetensors", "best_ema.safetensors", "summary.csv"):
        (tmp_path / name).write_text("old")
    assert clear_checkpoints(str(tmp_path)) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
    assert clear_checkpoints(str(tmp_path)) is False


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
