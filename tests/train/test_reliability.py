"""Work is never lost or poisoned (issue 26, "Bad" classes), with real processes on the tiny recipe:

- a damaged ``checkpoints/last`` pointer resumes from the newest intact checkpoint and deletes nothing;
- a fresh run into a folder holding checkpoints stops before writing; ``output.overwrite=true`` moves them aside;
- a diverged run stops (exit 3) naming the update, the lr and the last finite checkpoint, and publishes nothing
  non-finite; ``train.nonfinite=skip`` skips non-finite micro-batches and counts them; the CSVs write ``nan``;
- a kill inside the final save, after the pointer moved, is repaired by the resume (the published files agree).
"""
from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from dartmamba_train.checkpoint import CRASH_ENV, OutputNotEmpty, find_checkpoint, read_state, repair_published
from dartmamba_train.logs import read_csv

from tests.train.train_helpers import run_train, snapshot, train_env, write_recipe

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

# 2 epochs of 6 updates, every checkpoint kept
RECIPE = dict(train={"epochs": 2, "keep_last": 5})
# the same, with timm's fixed-grid DeiT (no DART scorer): a diverged run gives a NaN loss, not a tokenizer error
FIXED = dict(model={"name": "deit_tiny_patch16_224",
                    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
             train={"epochs": 1, "keep_last": 5})


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", **RECIPE)


@pytest.fixture(scope="module")
def finished(recipe, tmp_path_factory):
    """A finished 2-epoch run: checkpoints epoch0001 (best) and epoch0002 (last)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(["--config", recipe, f"output.dir={out}"])
    root = out / "checkpoints"
    assert (root / "last").read_text() == "epoch0002" and (root / "best").read_text() == "epoch0001"
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def same_tensors(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(path):
    return all(bool(torch.isfinite(v).all()) for v in load_file(str(path)).values() if v.is_floating_point())


@pytest.mark.parametrize("pointer, problem", [
    ("", "is empty"),
    ("\x00\x17garbage\n", "names '\\x00\\x17garbage', which is not a checkpoint there"),
    ("epoch0009", "names 'epoch0009', which is not a checkpoint there"),
])
def test_a_damaged_pointer_resumes_the_newest_intact_checkpoint_and_deletes_nothing(recipe, finished, tmp_path,
                                                                                     pointer, problem):
    out = copy_run(finished, tmp_path / "run")
    root = out / "checkpoints"
    (root / "last").write_text(pointer)
    tags = {name: snapshot(root / name) for name in ("epoch0001", "epoch0002")}
    result = run_train(["--config", recipe, f"output.dir={out}", "resume=auto"])
    assert "removed the checkpoints" not in result.stdout
    assert (f"resume=auto: {root}/last {problem}; resuming from {root}/epoch0002, the newest intact checkpoint "
            f"(state file and weight digests verified)") in result.stdout, result.stdout[-3000:]
    assert f"resumed from {root}/epoch0002 (epoch 2, update 12)" in result.stdout
    assert {name: snapshot(root / name) for name in tags} == tags           # nothing deleted or changed
    assert (root / "last").read_text() == "epoch0002"                        # the pointer repaired
    assert same_tensors(out / "last.safetensors", root / "epoch0002" / "model.safetensors")


def test_a_damaged_newest_checkpoint_is_passed_over_by_name(finished, tmp_path):
    """Pointer garbage and epoch0002's weights truncated: epoch0001 is taken, and the note says why."""
    out = copy_run(finished, tmp_path / "run")
    root = out / "checkpoints"
    (root / "last").write_text("garbage")
    weights = root / "epoch0002" / "model.safetensors"
    weights.unlink()                           # a hard link to last.safetensors: do not truncate that one too
    weights.write_bytes(b"not a safetensors file")
    notes = []
    assert find_checkpoint("auto", str(out), notes) == (str(root), "epoch0001")
    assert len(notes) == 1 and notes[0].startswith(
        f"resume=auto: {root}/last names 'garbage', which is not a checkpoint there; resuming from "
        f"{root}/epoch0001, the newest intact checkpoint (state file and weight digests verified); passed over "
        f"epoch0002: cannot read checkpoint file {weights}: it is truncated, corrupt or not a checkpoint")


def test_a_fresh_run_into_a_folder_with_checkpoints_stops_before_writing(recipe, finished):
    before = snapshot(finished)
    result = run_train(["--config", recipe, f"output.dir={finished}"], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"dartmamba-train: output.dir {finished} holds the checkpoints of a previous run (checkpoints/epoch0001, "
        f"checkpoints/epoch0002, checkpoints/last, checkpoints/best, last.safetensors, best.safetensors); "
        f"resume=auto continues that run, output.overwrite=true moves them aside into {finished}/previous-<UTC time>/ "
        f"and starts over, or choose another output.dir")
    assert snapshot(finished) == before
    from dartmamba_train.config import load_config
    from dartmamba_train.loop import preflight

    with pytest.raises(OutputNotEmpty, match="holds the checkpoints of a previous run"):
        preflight(load_config(recipe, [f"output.dir={finished}"]))


def test_overwrite_moves_the_previous_run_aside(recipe, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    result = run_train(["--config", recipe, f"output.dir={out}", "output.overwrite=true", "train.epochs=1"])
    moved = [p for p in os.listdir(out) if p.startswith("previous-")]
    assert len(moved) == 1, os.listdir(out)
    assert (f"output.overwrite: moved the previous run's checkpoints, weights and logs aside into {out}/{moved[0]}"
            in result.stdout)
    assert snapshot(out / moved[0]) == before                              # every file kept, none deleted
    assert sorted(os.listdir(out / "checkpoints")) == ["best", "epoch0001", "last"]          # the new run's
    assert len(read_csv(str(out / "steps.csv"))) == 6
    from dartmamba_train.config import ConfigError, load_config
    from dartmamba_train.loop import preflight

    with pytest.raises(ConfigError, match=r"^output.overwrite: true starts a new run; it cannot be combined with "
                                          r"resume=auto \(set one of them\)$"):
        preflight(load_config(recipe, [f"output.dir={out}", "output.overwrite=true", "resume=auto"]))


def test_a_diverged_run_stops_and_publishes_nothing_nonfinite(tmp_path):
    """The fixed-grid DeiT with optim.lr=1e6: the loss is NaN at update 2. Exit 3, one line, no weights written,
    ``nan`` in steps.csv."""
    recipe = write_recipe(tmp_path / "fixed.yaml", **FIXED)
    out = tmp_path / "run"
    result = run_train(["--config", recipe, f"output.dir={out}", "optim.lr=1e6"], check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip() == (
        "dartmamba-train: training diverged: non-finite loss (nan) at update 2 (lr 9.330e+05); nothing non-finite "
        "was saved; no checkpoint was saved; train.nonfinite=skip skips such micro-batches instead")
    assert not (out / "checkpoints").exists() and not (out / "last.safetensors").exists()
    assert [r["loss"] for r in read_csv(str(out / "steps.csv"))] == ["2.32262", "nan"]


def test_divergence_after_a_checkpoint_names_it_and_keeps_it_published(recipe, finished, tmp_path):
    """The DART recipe resumed with optim.lr=1e6: its tokenizer fails on the diverged weights; the user still reads
    'diverged', and the last checkpoint stays the published one."""
    out = copy_run(finished, tmp_path / "run")
    root = out / "checkpoints"
    result = run_train(["--config", recipe, f"output.dir={out}", "resume=auto", "train.epochs=3", "optim.lr=1e6"],
                       check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dartmamba-train: training diverged: non-finite loss or weights "
                                                   "at update "), lines
    assert lines[0].endswith(f"nothing non-finite was saved; the last finite checkpoint is {root}/epoch0002 "
                             f"(resume={root}/epoch0002 with a lower optim.lr continues from it); "
                             f"train.nonfinite=skip skips such micro-batches instead")
    assert (root / "last").read_text() == "epoch0002" and not (root / "epoch0003").exists()
    assert all_finite(out / "last.safetensors") and all_finite(out / "best.safetensors")
    assert same_tensors(out / "last.safetensors", root / "epoch0002" / "model.safetensors")


def test_skip_policy_finishes_with_finite_weights_and_counts_the_skipped(tmp_path):
    recipe = write_recipe(tmp_path / "fixed.yaml", **FIXED)
    out = tmp_path / "run"
    result = run_train(["--config", recipe, f"output.dir={out}", "optim.lr=1e6", "train.nonfinite=skip"])
    assert "; 5 non-finite micro-batch(es) skipped; outputs in" in result.stdout
    assert "update 6)  loss nan " in result.stdout and "skipped 5 non-finite" in result.stdout
    steps = read_csv(str(out / "steps.csv"))
    assert [r["loss"] for r in steps] == ["2.32262"] + ["nan"] * 5      # intervals with no finite loss
    assert all_finite(out / "last.safetensors")
    summary = read_csv(str(out / "summary.csv"))
    assert summary[0]["train_loss"] == "2.32262" and summary[0]["val_loss"] in ("nan", "inf")


def test_a_kill_inside_the_final_save_is_repaired_by_the_resume(recipe, tmp_path):
    """Killed after the final epoch's pointer moved, before last/best.safetensors were published: resume=auto of
    the finished run publishes them again."""
    out = tmp_path / "run"
    env = dict(train_env(), **{CRASH_ENV: "save:pointed@2"})
    crashed = run_train(["--config", recipe, f"output.dir={out}"], check=False, env=env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    root = out / "checkpoints"
    assert (root / "last").read_text() == "epoch0002"
    assert not same_tensors(out / "last.safetensors", root / "epoch0002" / "model.safetensors")     # stale
    result = run_train(["--config", recipe, f"output.dir={out}", "resume=auto"])
    assert "resume: published again after an interrupted save: last.safetensors <- epoch0002" in result.stdout
    assert os.path.samefile(out / "last.safetensors", root / "epoch0002" / "model.safetensors")
    best = (root / "best").read_text()
    assert os.path.samefile(out / "best.safetensors", root / best / "model.safetensors")
    state = read_state(str(root), "epoch0002")
    assert repair_published(str(out), str(root), "epoch0002", state, with_ema=False) == []   # they agree now


def test_nonfinite_weights_are_never_saved(tmp_path, dist_group):
    """The last guard (in-process): save_checkpoint refuses NaN weights before it writes anything."""
    from dartmamba_train.checkpoint import NonFiniteWeights, TrainerState, save_checkpoint

    from tests.train.train_helpers import make_engine

    cfg, parts = make_engine(tmp_path, [])
    name, param = next(iter(parts.engine.module.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    state = TrainerState(epoch=1, global_step=6, world_size=1, zero_stage=parts.zero_stage, precision="fp32")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteWeights, match=rf"^the weights after epoch 1 are not finite \(tensor '{name}'\); "
                                               rf"not saved$"):
        save_checkpoint(parts, None, state, str(out), dist_group, is_best=True, keep_last=2)
    assert not out.exists()
