"""A randomized crash-and-resume soak (issue 26, item 6): one run of the tiny recipe (max(4, N) epochs of 4
updates, ``keep_last=2``) is killed at N random points, each followed by ``resume=auto``, until a last resume
finishes it.

Kill points, drawn from a seeded RNG among those in the two epochs after the point the next process resumes from
(so the kills spread over the run):

- ``SIGKILL`` from outside once the log shows update k (lines are flushed: ``PYTHONUNBUFFERED``), so it lands at
  update k or a little after, mid-epoch or inside the epoch-end evaluation and save;
- the save's own crash points (``DARTMAMBA_TRAIN_CRASH_AT=save:staged|save:renamed|save:pointed@<epoch>``), the
  final epoch's ``save:pointed`` only as the last kill (after it the run is finished).

Checked at every kill and at the start of every resume (the process paused with SIGSTOP right after it logged
"resumed from", before its first save):

- every ``epochNNNN`` folder is intact (state file parses, weights match their digests), and the ``last`` and
  ``best`` pointers name intact folders; ``last`` never moves back; the newest ``keep_last`` epochs up to ``last``
  are all there (every epoch saves);
- no checkpoint is lost: a tag intact at one observation is intact with the same weights at the next, or was
  superseded by the retention rule (at least ``keep_last`` newer intact tags, and no pointer names it), or was newer
  than the checkpoint the run resumed from (a save killed between its rename and its pointer: the replay redoes it);
- the resume takes the ``last`` pointer's tag, or the newest intact one where the pointer is missing;
- at each resume's start and at the end, ``last.safetensors`` / ``best.safetensors`` hold the weights of the
  checkpoints the pointers name.

And at the end: every checkpoint ever seen, the published files, ``steps.csv`` and ``summary.csv`` equal the
uninterrupted run's (run beside the chain), bit for bit (timing columns aside).

``DARTMAMBA_SOAK_KILLS=<N>`` (default 4) sets the number of kill points, ``DARTMAMBA_SOAK_SEED=<int>`` replays a
draw (the seed is in every failure message; a fresh one is drawn otherwise).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest

from tests.train.train_helpers import (read_text, start_train, strip_timing, train_env, wait_for_log, weights_digest,
                                       write_recipe)

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

UPDATES_PER_EPOCH, KEEP_LAST = 4, 2
WINDOW = 2          # a kill point lies within this many epochs of the resume point: the kills spread over the run
RECIPE = dict(train={"keep_last": KEEP_LAST, "seed": 11},
              data={"kind": "canvas", "num_workers": 0,
                    "canvas": {"canvas_size": 32, "object_size": [12, 16], "num_distractors": [1, 2],
                               "train_length": 32 * UPDATES_PER_EPOCH, "val_length": 32}})
SAVE_POINTS = ("save:staged", "save:renamed", "save:pointed")
TAG = re.compile(r"^epoch(\d{4})$")
UPDATE_LINE = re.compile(r"\(update (\d+)\)")
PROCESS_TIMEOUT_S = 300


def soak_kills() -> int:
    text = os.environ.get("DARTMAMBA_SOAK_KILLS", "4")
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"DARTMAMBA_SOAK_KILLS must be an int >= 1 (the number of kill points), got {text!r}")
    return int(text)


def soak_seed() -> int:
    text = os.environ.get("DARTMAMBA_SOAK_SEED")
    if text is None:
        return random.SystemRandom().randrange(2**32)
    if not text.strip().isdigit():
        raise ValueError(f"DARTMAMBA_SOAK_SEED must be a non-negative int, got {text!r}")
    return int(text)


def epoch_of(tag: str | None) -> int:
    return 0 if tag is None else int(TAG.match(tag).group(1))


def tail(path, lines: int = 25) -> str:
    return "\n".join(read_text(path).splitlines()[-lines:])


class Observation:
    """The checkpoints of a run at one moment: {intact tag: weights digest} and the pointers."""

    def __init__(self, label: str, tags: dict, last: str | None, best: str | None):
        self.label, self.tags, self.last, self.best = label, tags, last, best

    def resume_tag(self) -> str | None:
        """The tag resume=auto continues from: the ``last`` pointer's, else the newest intact one."""
        if self.last in self.tags:
            return self.last
        return max(self.tags) if self.tags else None

    def __repr__(self):
        return f"{self.label}: tags {sorted(self.tags)}, last {self.last}, best {self.best}"


class Soak:
    def __init__(self, tmp_path, recipe: str, kills: int, seed: int, epochs: int):
        self.tmp_path, self.recipe, self.kills, self.epochs = tmp_path, recipe, kills, epochs
        self.rng = random.Random(seed)
        self.out = tmp_path / "run"
        self.root = self.out / "checkpoints"
        self.observations: list[Observation] = []
        self.plan: list[str] = []              # what each kill was and where it landed
        self.kills_done = 0
        self.resumes = 0                       # processes that logged "resumed from"
        self.published_checks = 0              # resume starts at which the published files were compared
        self.final_saved = False               # the last process ran the final epoch's save
        self.proc = None
        self.log = None

    # -- observations ----------------------------------------------------------------------------------------------
    def _pointer(self, name: str) -> str | None:
        path = self.root / name
        if not path.is_file():
            return None
        text = path.read_text()
        assert TAG.match(text.strip()), f"checkpoints/{name} holds {text!r}, not a tag"
        return text.strip()

    def observe(self, label: str) -> Observation:
        from dartmamba.files import read_safetensors

        tags = {}
        names = sorted(os.listdir(self.root)) if self.root.is_dir() else []
        for name in names:
            folder = self.root / name
            if not (TAG.match(name) and folder.is_dir()):
                continue
            state = json.loads((folder / "trainer_state.json").read_text())       # a folder with a tag is complete
            assert state["epoch"] == epoch_of(name), f"{label}: {name}/trainer_state.json says epoch {state['epoch']}"
            read_safetensors(folder / "model.safetensors", "checkpoint")          # raises if damaged
            tags[name] = weights_digest(folder / "model.safetensors")
        obs = Observation(label, tags, self._pointer("last"), self._pointer("best"))
        for name in ("last", "best"):
            target = getattr(obs, name)
            assert target is None or target in tags, f"{obs}: the {name} pointer names no intact checkpoint"
        if obs.last is not None:        # every epoch up to the pointer was saved: the newest keep_last must be here
            newest = {f"epoch{e:04d}" for e in range(max(1, epoch_of(obs.last) - KEEP_LAST + 1),
                                                     epoch_of(obs.last) + 1)}
            assert newest <= set(tags), (f"{obs}: the retention rule keeps the newest {KEEP_LAST} checkpoints up to "
                                         f"the last pointer; {sorted(newest - set(tags))} missing")
        if self.observations:
            self._nothing_lost(self.observations[-1], obs)
        self.observations.append(obs)
        return obs

    @staticmethod
    def _nothing_lost(prev: Observation, now: Observation) -> None:
        assert epoch_of(now.last) >= epoch_of(prev.last), f"the last pointer moved back: {prev} -> {now}"
        resumed_from = prev.resume_tag()
        for tag, digest in prev.tags.items():
            if tag in now.tags:
                assert now.tags[tag] == digest, f"{tag}'s weights changed: {prev} -> {now}"
                continue
            newer = [t for t in now.tags if t > tag]
            superseded = len(newer) >= KEEP_LAST and tag not in (now.last, now.best)
            redone = resumed_from is not None and tag > resumed_from
            assert superseded or redone, (f"checkpoint {tag} was lost: intact at '{prev.label}', gone at "
                                          f"'{now.label}' ({prev} -> {now})")

    def check_published(self, obs: Observation) -> None:
        """last/best.safetensors hold the weights of the checkpoints the pointers name."""
        for name in ("last", "best"):
            target = getattr(obs, name)
            path = self.out / f"{name}.safetensors"
            if target is None:
                continue
            assert path.is_file(), f"{obs}: {path.name} is missing"
            assert weights_digest(path) == obs.tags[target], f"{obs}: {path.name} is not checkpoints/{target}"

    # -- processes -------------------------------------------------------------------------------------------------
    def _start(self, index: int, resume: bool, env: dict | None = None):
        self.log = self.tmp_path / f"process{index}.log"
        args = ["--config", self.recipe, f"output.dir={self.out}"] + (["resume=auto"] if resume else [])
        self.proc = start_train(args, self.log, env)

    def _wait(self) -> int:
        try:
            return self.proc.wait(timeout=PROCESS_TIMEOUT_S)
        except Exception:
            self.proc.kill()
            raise

    def _pause(self) -> None:
        """SIGSTOP, and wait until the kernel shows the process stopped (delivery is asynchronous)."""
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stat = read_text(f"/proc/{self.proc.pid}/stat")
            if not stat or stat[stat.rfind(")") + 2] in "TtZX":
                return
            time.sleep(0.001)
        raise AssertionError(f"process {self.proc.pid} did not stop within 10 s of SIGSTOP")

    def _check_resume_start(self, expected: str, label: str) -> None:
        """The process resumes from ``expected``; paused right after, before its first save, the published files
        agree with the pointers and nothing was lost."""
        resumed = wait_for_log(self.proc, self.log, "resumed from ", timeout=PROCESS_TIMEOUT_S)
        assert resumed, f"{label}: exited ({self.proc.poll()}) without resuming:\n{tail(self.log)}"
        self.resumes += 1
        self._pause()
        try:
            text = read_text(self.log)
            match = re.search(rf"resumed from {re.escape(str(self.root))}/(epoch\d{{4}}) \(epoch (\d+), update "
                              rf"(\d+)\)", text)
            assert match, f"{label}: no 'resumed from' line of the expected form:\n{tail(self.log)}"
            assert match.group(1) == expected, f"{label}: resumed from {match.group(1)}, expected {expected}"
            assert int(match.group(3)) == epoch_of(expected) * UPDATES_PER_EPOCH
            if " done in " not in text[match.end():]:          # no epoch ended since, so no save has begun
                obs = self.observe(f"{label}, resumed from {expected}")
                assert obs.last == expected, f"{obs}: the resume did not point last at {expected}"
                self.check_published(obs)
                self.published_checks += 1
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def _draw(self, start_epoch: int, last_kill: bool) -> tuple[str, object]:
        """("update", k) or ("crash", "save:...@e"), after the resume point ``start_epoch``."""
        end = min(start_epoch + WINDOW, self.epochs)
        total = self.epochs * UPDATES_PER_EPOCH
        # updates up to total - 2: a kill that lands a little late still falls before the final save
        updates = list(range(start_epoch * UPDATES_PER_EPOCH + 1, min(end * UPDATES_PER_EPOCH, total - 2) + 1))
        saves = [f"{point}@{epoch}" for epoch in range(start_epoch + 1, end + 1) for point in SAVE_POINTS
                 if last_kill or (point, epoch) != ("save:pointed", self.epochs)]
        if updates and (not saves or self.rng.random() < 0.5):
            return "update", self.rng.choice(updates)
        return "crash", self.rng.choice(saves)

    def run(self) -> None:
        obs = self.observe("start")
        for index in range(self.kills):
            start = obs.resume_tag()
            if epoch_of(start) == self.epochs:
                self.plan.append("(the run had finished: no later kill point)")
                break
            kind, where = self._draw(epoch_of(start), index == self.kills - 1)
            env = dict(train_env(), **({"DARTMAMBA_TRAIN_CRASH_AT": where} if kind == "crash" else {}))
            label = f"kill {index + 1} ({where if kind == 'crash' else f'SIGKILL at update {where}'})"
            self._start(index, resume=index > 0, env=env)
            if start is not None:
                self._check_resume_start(start, label)
            if kind == "update":
                assert wait_for_log(self.proc, self.log, f"(update {where})", timeout=PROCESS_TIMEOUT_S), (
                    f"{label}: the process exited ({self.proc.poll()}) before update {where}:\n{tail(self.log)}")
                self.proc.send_signal(signal.SIGKILL)
            code = self._wait()
            logged = [int(u) for u in UPDATE_LINE.findall(read_text(self.log))]
            landed = f"after update {max(logged)}" if logged else "before any update"
            if kind == "update" and code == 0:      # a starved poller: the run finished before the kill landed
                self.plan.append(f"{label}: the run finished first")
                obs = self.observe(f"{label}, finished first")
                break
            assert code == -signal.SIGKILL, f"{label}: exit status {code}, expected SIGKILL:\n{tail(self.log)}"
            self.kills_done += 1
            self.plan.append(f"{label}: landed {landed}")
            obs = self.observe(f"after {label}")
        start = obs.resume_tag()
        self._start(len(self.plan), resume=bool(self.plan))
        if start is not None:
            self._check_resume_start(start, "final resume")
        code = self._wait()
        assert code == 0, f"final resume: exit status {code}:\n{tail(self.log)}"
        assert "finished in " in read_text(self.log)
        self.final_saved = f"epoch {self.epochs} done in " in read_text(self.log)
        final = self.observe("final")
        assert final.last == f"epoch{self.epochs:04d}", final
        self.check_published(final)


def test_random_kills_and_resumes_reproduce_the_uninterrupted_run(tmp_path):
    from dartmamba_train.logs import read_csv

    kills, seed = soak_kills(), soak_seed()
    epochs = max(4, kills)                 # a longer soak gets a longer run to spread its kill points over
    began = time.monotonic()
    recipe = write_recipe(tmp_path / "soak.yaml", **{**RECIPE, "train": {**RECIPE["train"], "epochs": epochs}})
    ref = tmp_path / "reference"
    # the uninterrupted run, every checkpoint kept (keep_last changes no weights), beside the chain: 2 cores
    reference = start_train(["--config", recipe, f"output.dir={ref}", f"train.keep_last={epochs}"],
                            tmp_path / "reference.log")
    soak = Soak(tmp_path, recipe, kills, seed, epochs)
    try:
        soak.run()
        assert soak.kills_done >= 1, "no kill landed before the run finished"
        assert reference.wait(timeout=PROCESS_TIMEOUT_S) == 0, tail(tmp_path / "reference.log")
        ref_root = ref / "checkpoints"
        expected = {f"epoch{e:04d}": weights_digest(ref_root / f"epoch{e:04d}" / "model.safetensors")
                    for e in range(1, epochs + 1)}
        for obs in soak.observations:                # every checkpoint ever seen is the uninterrupted run's
            for tag, digest in obs.tags.items():
                assert digest == expected[tag], f"{obs}: {tag}'s weights differ from the uninterrupted run's"
        final = soak.observations[-1]
        ref_best = (ref_root / "best").read_text().strip()
        assert final.best == ref_best, f"{final}: best should be {ref_best}"
        for name in ("last", "best"):
            assert weights_digest(soak.out / f"{name}.safetensors") == weights_digest(ref / f"{name}.safetensors"), \
                f"{name}.safetensors differs from the uninterrupted run's"
        for name in ("steps.csv", "summary.csv"):
            rows, ref_rows = read_csv(str(soak.out / name)), read_csv(str(ref / name))
            assert strip_timing(rows) == strip_timing(ref_rows), f"{name} differs from the uninterrupted run's"
        assert len(read_csv(str(soak.out / "steps.csv"))) == epochs * UPDATES_PER_EPOCH
        kept = {f"epoch{e:04d}" for e in range(epochs - KEEP_LAST + 1, epochs + 1)} | {ref_best}
        assert kept <= set(final.tags), f"{final}: the retention rule keeps {sorted(kept)}"
        if soak.final_saved:                     # the final save ran: it clears leftovers and prunes
            assert set(final.tags) == kept, final
            assert [n for n in os.listdir(soak.root) if n.startswith(".")] == []
    except Exception as err:
        raise AssertionError(f"soak seed {seed} (DARTMAMBA_SOAK_SEED={seed} DARTMAMBA_SOAK_KILLS={kills} draws the "
                             f"same kill points; logs in {tmp_path}); kills so far: {soak.plan}: {err}") from err
    finally:
        for proc in (soak.proc, reference):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    print(f"\nsoak seed {seed}: {soak.kills_done} kill point(s), {soak.resumes} resume(s) "
          f"({soak.published_checks} paused at their start and checked), {len(soak.observations)} observations, "
          f"{time.monotonic() - began:.0f} s: " + "; ".join(soak.plan))
