"""Every file-level failure of a run is one line naming the file and the cause (issue 26, item 4): exit 2 from the
CLI, a typed error (``RunFileError``: ``DiskFull``, ``OutputDirUnusable``, ``CorruptRunFile``) from the API, and
nothing of the previous state lost.

- a full disk during a save (a real tiny tmpfs where mounting is permitted, and an injected ENOSPC everywhere);
- output.dir a regular file, or on a read-only file system;
- a corrupt steps.csv (not UTF-8, a step that is not an integer, no step column);
- a corrupt trainer_state.json (invalid JSON, an unknown key) and a truncated or bit-flipped DeepSpeed ``.pt``:
  named when resumed explicitly; passed over by resume=auto, which takes the newest intact checkpoint.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess

import pytest

from dartmamba.files import DiskFullError, atomic_path, atomic_write_bytes
from dartmamba_train.checkpoint import (CheckpointError, CorruptRunFile, DiskFull, OutputDirUnusable, TrainerState,
                                        check_resumable, find_checkpoint, load_checkpoint, read_state, save_checkpoint)
from dartmamba_train.cli import main
from dartmamba_train.lock import OutputDirLock, check_output_dir
from dartmamba_train.logs import RunLogger, check_logs

from tests.train.train_helpers import snapshot, write_recipe

pytest.importorskip("deepspeed")


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of tiny tmpfs mounts (root only; skipped where mounting is not permitted), unmounted after."""
    mounts = []

    def mount(size: int, read_only: bool = False):
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:        # lazily where a failed test's traceback still holds a file open there
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def save(parts, dist, out, epoch, ema=None, is_best=True):
    state = TrainerState(epoch=epoch, global_step=6 * epoch, world_size=1, zero_stage=parts.zero_stage,
                         precision="fp32")
    return save_checkpoint(parts, ema, state, str(out), dist, is_best=is_best, keep_last=5)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, dist_group):
    from tests.train.train_helpers import make_engine

    return make_engine(tmp_path_factory.mktemp("engine"), [])


@pytest.fixture(scope="module")
def saved(engine, dist_group, tmp_path_factory):
    """A run folder holding real checkpoints epoch0001 and epoch0002 (last) and a steps.csv of 12 updates, and the
    tiny recipe it matches."""
    cfg, parts = engine
    folder = tmp_path_factory.mktemp("saved")
    out = folder / "run"
    save(parts, dist_group, out, 1)
    save(parts, dist_group, out, 2)
    rows = "".join(f"{1 + (s - 1) // 6},{s},2.3,0.001,100,1.0\n" for s in range(1, 13))
    (out / "steps.csv").write_text("epoch,step,loss,lr,img_per_s,data_ms\n" + rows)
    return out, write_recipe(folder / "tiny.yaml")


def copy_run(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "run")


# -- a full disk ---------------------------------------------------------------------------------------------------
SAVE_FAILED = re.compile(
    r"^saving checkpoint epoch0002 failed: (?P<file>\S+): no space left on device: the checkpoint needs about "
    r"(?P<needed>[\d.]+ [KMG]iB), (?P<free>[\d.]+ [KMG]iB|\d+ bytes) is free in (?P<root>\S+); the partial checkpoint "
    r"was removed and nothing was published; the previous checkpoint (?P<previous>\S+) is intact and still "
    r"published; free space, then resume=auto continues from it$")


def assert_previous_checkpoint_kept(out, before, message):
    root = out / "checkpoints"
    match = SAVE_FAILED.match(message)
    assert match, message
    assert match["root"] == str(root) and match["previous"] == str(root / "epoch0001")
    assert sorted(os.listdir(root)) == ["best", "epoch0001", "last"]     # no staging folder, no partial tag
    assert snapshot(out) == before                                       # every byte of the previous state kept
    return match


def test_a_full_disk_during_a_save_names_the_file_and_the_space_on_a_real_tmpfs(engine, dist_group, tmpfs):
    """A tmpfs with room for a fifth of a checkpoint more: the second save fails inside DeepSpeed's torch.save
    (torch says only "unexpected pos ..."); the line names the staged file, the bytes needed and free."""
    cfg, parts = engine
    mount = tmpfs(8 * 2**20)
    out = mount / "run"
    save(parts, dist_group, out, 1)
    one = shutil.disk_usage(mount).used
    remount = subprocess.run(["mount", "-o", f"remount,size={one + one // 5}", str(mount)], capture_output=True)
    assert remount.returncode == 0, remount.stderr
    before = snapshot(out)
    with pytest.raises(DiskFull) as err:
        save(parts, dist_group, out, 2)
    match = assert_previous_checkpoint_kept(out, before, str(err.value))
    assert match["file"] == str(out / "checkpoints" / ".staging" / "epoch0002" / "mp_rank_00_model_states.pt")
    assert err.value.free == shutil.disk_usage(mount).free < err.value.needed
    # the estimate is the size of a checkpoint within 25% (model.safetensors is a hard link of last.safetensors)
    used = sum(os.path.getsize(out / "checkpoints" / "epoch0001" / name)
               for name in os.listdir(out / "checkpoints" / "epoch0001"))
    assert 0.75 * used < err.value.needed < 1.25 * used


def test_a_full_disk_is_one_line_everywhere_injected(engine, dist_group, tmp_path, monkeypatch):
    """Without a tmpfs: the write of model.safetensors meets ENOSPC (injected in our module's writer); files'
    atomic_path turns it into DiskFullError naming the file, the save into DiskFull; nothing half-written stays."""
    import dartmamba_train.checkpoint as checkpoint

    cfg, parts = engine
    out = tmp_path / "run"
    save(parts, dist_group, out, 1)
    before = snapshot(out)

    def no_space(tensors, path, **kwargs):
        with atomic_path(path, needed=4096) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "write_safetensors", no_space)
    with pytest.raises(DiskFull) as err:
        save(parts, dist_group, out, 2)
    match = assert_previous_checkpoint_kept(out, before, str(err.value))
    assert match["file"] == str(out / "checkpoints" / ".staging" / "epoch0002" / "model.safetensors")


def test_atomic_writes_name_the_file_and_the_space(tmp_path, tmpfs):
    """dartmamba.files: an atomic write that meets a full disk is DiskFullError (an OSError, ENOSPC) naming the
    file, the bytes it needed and the bytes free once its temporary file is gone; the old file is kept."""
    mount = tmpfs(64 * 1024)
    target = mount / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError) as err:
        atomic_write_bytes(target, b"x" * 100_000)
    free = shutil.disk_usage(mount).free
    assert err.value.errno == errno.ENOSPC and err.value.needed == 100_000 and err.value.free == free
    assert str(err.value) == (f"{target}: no space left on device: writing it needs 97.7 KiB, "
                              f"{free / 1024:.1f} KiB free in {mount}")
    assert os.listdir(mount) == ["weights.bin"] and target.read_bytes() == b"old"


# -- output.dir ----------------------------------------------------------------------------------------------------
def main_line(argv, capsys):
    """(exit status, stderr) of the CLI run in this process."""
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_output_dir_a_regular_file_or_read_only_is_one_line_before_anything_is_written(tmp_path, tmpfs, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml")
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    code, line = main_line(["--config", recipe, f"output.dir={blocker}"], capsys)
    assert (code, line) == (2, f"dartmamba-train: output.dir {blocker}: it is a regular file, not a folder; move it "
                               f"away or choose another output.dir")
    assert blocker.read_text() == "not a folder"
    with pytest.raises(OutputDirUnusable, match=rf"^output.dir {blocker}/run: {blocker} is a regular file, not a "
                                                rf"folder; "):
        OutputDirLock(str(blocker / "run")).acquire()         # the API's own path (run() takes this lock first)
    read_only = tmpfs(64 * 1024, read_only=True)
    code, line = main_line(["--config", recipe, f"output.dir={read_only}/run"], capsys)
    assert (code, line) == (2, f"dartmamba-train: output.dir {read_only}/run: cannot create it in {read_only} "
                               f"(read-only file system); make it writable or choose another output.dir")
    with pytest.raises(OutputDirUnusable, match=rf"^output.dir {read_only}: cannot create files in it \(read-only "
                                                rf"file system\)"):
        check_output_dir(str(read_only))
    fresh = tmp_path / "new" / "deeper"
    check_output_dir(str(fresh))
    assert not (tmp_path / "new").exists()                      # the probe leaves nothing behind


# -- corrupt run files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, cause", [
    (b"epoch,step,loss\n1,1,2.3\n\xff\xfe,2,2.2\n",
     "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 24: invalid start byte"),
    (b"epoch,step,loss\n1,1,2.3\n1,abc,2.2\n", "line 3: step 'abc' is not an integer"),
    (b"epoch,update,loss\n1,1,2.3\n", "no 'step' column; its header is 'epoch,update,loss'"),
])
def test_a_corrupt_steps_csv_is_named(saved, tmp_path, capsys, content, cause):
    out = copy_run(saved, tmp_path)
    steps = out / "steps.csv"
    steps.write_bytes(content)
    message = (f"{steps}: cannot read the run's log ({cause}); move the file aside (the run then starts a new one) "
               f"or restore it from a copy")
    with pytest.raises(CorruptRunFile) as err:
        check_logs(str(out), 12)
    assert str(err.value) == message and err.value.path == str(steps)
    with pytest.raises(CorruptRunFile, match=re.escape(message)):
        RunLogger(str(out), 0, progress_bar=False, tensorboard=False, rank_log=False, resume_step=12)
    before = snapshot(out)
    assert main_line(["--config", saved[1], f"output.dir={out}", "resume=auto"], capsys) == (
        2, f"dartmamba-train: {message}")
    assert snapshot(out) == before and steps.read_bytes() == content


@pytest.mark.parametrize("text, cause", [
    ('{"epoch": 2, "global_step": ', "not valid JSON (Expecting value: line 1 column 29 (char 28))"),
    ('{"epoch": 2, "global_step": 12, "bogus": 1}', "unknown key(s) 'bogus' (expected "),
    ('{"epoch": "two"}', "'epoch' must be a non-negative integer, got 'two'"),
])
def test_a_corrupt_trainer_state_is_named_and_passed_over(saved, tmp_path, capsys, text, cause):
    out = copy_run(saved, tmp_path)
    root = out / "checkpoints"
    path = root / "epoch0002" / "trainer_state.json"
    path.write_text(text)
    with pytest.raises(CorruptRunFile) as err:
        read_state(str(root), "epoch0002")
    assert str(err.value).startswith(f"{path}: not a readable trainer state: {cause}")
    assert str(err.value).endswith(f"; restore the file from a copy, or resume from another checkpoint "
                                   f"(resume={root}/epochNNNN; resume=auto takes the newest intact one when the "
                                   f"'last' pointer names none)")
    before = snapshot(out)
    code, line = main_line(["--config", saved[1], f"output.dir={out}", f"resume={root}/epoch0002"], capsys)
    assert (code, line) == (2, f"dartmamba-train: {err.value}")
    notes = []
    assert find_checkpoint("auto", str(out), notes) == (str(root), "epoch0001")      # the newest intact one
    assert notes[0].startswith(f"resume=auto: {root}/last names epoch0002, which is damaged; resuming from "
                               f"{root}/epoch0001, the newest intact checkpoint (state file and weight digests "
                               f"verified); passed over epoch0002: {path}: not a readable trainer state: {cause}")
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_deepspeed_file_is_named_and_passed_over(saved, engine, dist_group, tmp_path, capsys, damage):
    out = copy_run(saved, tmp_path)
    root = out / "checkpoints"
    pt = root / "epoch0002" / "mp_rank_00_model_states.pt"
    data = bytearray(pt.read_bytes())
    if damage == "truncated":
        pt.write_bytes(data[:len(data) // 2])
        problem = f"{pt} is truncated or corrupt (BadZipFile: File is not a zip file)"
    else:                       # torch.load reads this silently; the entry's CRC-32 does not match
        data[len(data) // 2] ^= 0xFF
        pt.write_bytes(data)
        problem = f"{pt} is corrupt (its entry "
    notes = []
    assert find_checkpoint("auto", str(out), notes) == (str(root), "epoch0002" if damage == "bit flip" else
                                                        "epoch0001")
    if damage == "truncated":                  # the cheap check (zip directory) already passes it over
        assert notes[0].startswith(f"resume=auto: {root}/last names epoch0002, which is damaged; resuming from "
                                   f"{root}/epoch0001") and f"passed over epoch0002: {problem}" in notes[0]
        with pytest.raises(CorruptRunFile, match=re.escape(f"resume: {problem}; restore the file from a copy")):
            check_resumable(str(root), "epoch0002", world_size=1, zero_stage=0, precision="fp32")
        code, line = main_line(["--config", saved[1], f"output.dir={out}", "resume=" + str(root / "epoch0002")],
                               capsys)
        assert code == 2 and line.startswith(f"dartmamba-train: resume: {problem}; "), line
    cfg, parts = engine
    with pytest.raises(CorruptRunFile, match=re.escape(f"resume: {problem}")):
        load_checkpoint(parts, None, str(root), "epoch0002", dist_group, "fp32")    # every CRC, before DeepSpeed


def test_no_intact_checkpoint_left_is_one_line(saved, tmp_path):
    out = copy_run(saved, tmp_path)
    root = out / "checkpoints"
    for tag in ("epoch0001", "epoch0002"):
        (root / tag / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match=rf"^resume=auto: {root}/last names epoch0002, which is damaged and "
                                              rf"no checkpoint in {root} is intact \(epoch0002: "):
        find_checkpoint("auto", str(out))


def test_a_save_over_a_damaged_tag_keeps_it_aside(engine, dist_group, saved, tmp_path):
    """resume=auto passed over a damaged epoch0002; saving epoch0002 again keeps the damaged copy (renamed), since
    a hand repair may still need it."""
    cfg, parts = engine
    out = copy_run(saved, tmp_path)
    root = out / "checkpoints"
    (root / "epoch0002" / "trainer_state.json").write_text("{")
    damaged = snapshot(root / "epoch0002")
    save(parts, dist_group, out, 2)
    aside = [name for name in os.listdir(root) if name.startswith("damaged-epoch0002-")]
    assert len(aside) == 1 and snapshot(root / aside[0]) == damaged
    assert read_state(str(root), "epoch0002").global_step == 12
