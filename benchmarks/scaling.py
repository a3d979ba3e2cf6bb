"""Scaling study: model size (Ti/S/B) x token count (121 .. 1568) x tokenizer (fixed grid, DART) x family (Vim,
DeiT) -> one CSV, plots and a summary, resumable.

A *cell* is (family, size, tokenizer, tokens); it runs the registered model :func:`benchmarks.common.cell_model`
names (fixed grid: token count through the image size, e.g. 448 -> 784 tokens, (512, 784) -> 1568; DART: 448
input and ``num_tokens=N``). Per cell the runner measures the requested *metrics*:

- ``flops``  forward GFLOPs per image by part (fake tensors, no device time; dartmamba.flops),
- ``infer``  inference img/s, latency, peak memory (benchmarks.throughput),
- ``train``  training-step img/s and peak memory,
- ``accuracy`` a training run on the cluttered-canvas data through a pluggable callable (below).

Resuming. The CSV holds one row per cell. After every metric of every cell the whole file is rewritten atomically
(temporary file + rename), so an interrupted study loses at most the metric in flight and never leaves a broken
file. A rerun with the same ``--out`` skips what is already there (a metric counts as done when its columns are
filled; a throughput measured on another device is redone; failed measurements -- OOM, errors -- are kept unless
``--retry-failed``). ``--time-budget`` stops starting new work after that many seconds; ``--max-cells`` after that
many newly finished cells. Rerun the same command to continue.

Training (``accuracy``). The runner calls ``train_fn(cell) -> dict`` with ``cell`` holding family, size,
tokenizer, tokens, model, model_kwargs, workdir (a per-cell directory) and the ``--train-kwargs``; the returned dict
needs ``accuracy`` (top-1, %) and may add ``train_*`` extras (epochs, seconds, ...). Plug one in with
``--train-fn package.module:function``, or with ``--train-cmd`` (a shell command template; ``{model}``,
``{model_kwargs}`` (JSON, shell-quoted), ``{tokens}``, ``{workdir}`` are filled in) that must write
``{workdir}/metrics.json`` holding ``accuracy`` (or ``top1``).

Outputs in ``--out`` (default benchmarks/results/scaling): ``scaling.csv``, ``throughput_vs_tokens.png``,
``flops_vs_tokens.png``, ``accuracy_vs_tokens.png`` and ``accuracy_vs_flops.png`` (when accuracies exist),
``summary.md`` (fitted exponents of cost vs tokens from 196 to 1568, with the linear-scaling check).

Examples:
  python -m benchmarks.scaling --metrics flops                                  # all 60 cells, CPU, ~1 min
  python -m benchmarks.scaling --metrics flops infer --sizes s --batch-size 128 --amp bf16 --time-budget 300
  python -m benchmarks.scaling --metrics accuracy --train-fn mytrain:train_cell --train-kwargs '{"epochs": 30}'
  python -m benchmarks.scaling --plots-only --out benchmarks/results/nvidia-h100-80gb-hbm3/scaling
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (FAMILIES, SCALING_TOKENS, SIZE_ALIASES, TOKENIZERS,  # noqa: E402
                               atomic_write_text, cell_model, csv_text, markdown_table)

METRICS = ("flops", "infer", "train", "accuracy")
LINEAR_MAX_EXPONENT = 1.1        # Vim: cost must grow at most like tokens^1.1 from 196 to 1568 tokens
FIT_RANGE = (196, 1568)

KEY_COLUMNS = ["cell", "family", "size", "tokenizer", "tokens", "model", "model_kwargs"]
FLOP_COLUMNS = ["gflops", "gflops_scorer_trunk", "gflops_scorer_head", "gflops_resample", "gflops_posembed",
                "gflops_embed", "gflops_backbone", "gflops_scan", "gflops_head", "params_m"]
SPEED_FIELDS = ["img_per_s", "latency_ms", "peak_mem_mib", "batch", "amp", "compile", "device", "status"]
COLUMNS = (KEY_COLUMNS + FLOP_COLUMNS + [f"infer_{f}" for f in SPEED_FIELDS] + [f"train_{f}" for f in SPEED_FIELDS]
           + ["accuracy", "accuracy_status", "train_info", "job_status", "updated"])


@dataclass
class Cell:
    family: str
    size: str
    tokenizer: str
    tokens: int
    model: str = ""
    model_kwargs: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.family}-{self.size}-{self.tokenizer}-{self.tokens}"


def make_cells(families, sizes, tokenizers, tokens, common: dict | None = None, fixed_kwargs: dict | None = None,
               dart_kwargs: dict | None = None) -> list[Cell]:
    """Cells in run order: size, then family, then tokenizer, then token count (list the most wanted first)."""
    cells = []
    for size in sizes:
        size = SIZE_ALIASES.get(size.lower(), size)
        for family in families:
            for tokenizer in tokenizers:
                extra = fixed_kwargs if tokenizer == "fixed" else dart_kwargs
                overrides = {**(common or {}), **(extra or {})}
                for n in tokens:
                    name, kwargs = cell_model(family, size, tokenizer, n, overrides=overrides)
                    cells.append(Cell(family, size, tokenizer, int(n), name, kwargs))
    return cells


# ----------------------------------------------------------------------------------------------------------------
# The CSV store
# ----------------------------------------------------------------------------------------------------------------
class Store:
    """Rows keyed by cell, persisted to one CSV. Every update is a merge: under an exclusive lock of
    ``<csv>.lock`` (``fcntl.flock``, held by the kernel: released however the process dies) the file is read
    again, the cell's values are merged into its row, and the file is rewritten atomically (temporary file +
    rename). So jobs of a fanned-out study that finish at the same time, in different processes or on different
    machines sharing the folder, lose nothing, and a reader never sees a partial file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        self.extra_columns: list[str] = []
        self.reload()

    def reload(self) -> None:
        self.rows, self.extra_columns = {}, []
        if self.path.exists():
            with open(self.path, newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get("cell"):
                        self.rows[row["cell"]] = row
                        self.extra_columns += [k for k in row if k not in COLUMNS and k not in self.extra_columns]

    def get(self, cell: Cell) -> dict:
        return self.rows.get(cell.key, {})

    def update(self, cell: Cell, values: dict) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.reload()                       # what other jobs merged since
                row = self.rows.setdefault(cell.key, {})
                row.update({"cell": cell.key, "family": cell.family, "size": cell.size, "tokenizer": cell.tokenizer,
                            "tokens": cell.tokens, "model": cell.model,
                            "model_kwargs": json.dumps(cell.model_kwargs, sort_keys=True)})
                row.update(values)
                row["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                self.extra_columns += [k for k in values if k not in COLUMNS and k not in self.extra_columns]
                self.save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def save(self) -> None:
        atomic_write_text(self.path, csv_text(list(self.rows.values()), COLUMNS + self.extra_columns))


def _filled(value) -> bool:
    return value not in (None, "")


def is_done(row: dict, metric: str, device: str | None = None, retry_failed: bool = False) -> bool:
    if metric == "flops":
        return _filled(row.get("gflops"))
    if metric in ("infer", "train"):
        status = row.get(f"{metric}_status")
        if not _filled(status):
            return False
        if device is not None and row.get(f"{metric}_device") not in (None, "", device):
            return False
        return status == "ok" or not retry_failed
    if metric == "accuracy":
        if _filled(row.get("accuracy")):
            return True
        return _filled(row.get("accuracy_status")) and not retry_failed
    raise ValueError(f"unknown metric {metric!r}")


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------
def measure_flops(cell: Cell) -> dict:
    from dartmamba.flops import count_model_flops

    report = count_model_flops(cell.model, **cell.model_kwargs)
    row = report.as_row()
    values = {k: row[k] for k in FLOP_COLUMNS if k in row}
    return values


def measure_speed(cell: Cell, mode: str, opts: dict) -> dict:
    from benchmarks.throughput import run_one

    result = run_one(cell.model, cell.model_kwargs, opts["batch_size"], mode, opts["device"], opts["amp"],
                     opts["compile"], opts["warmup"], opts["repeats"], opts["iters"])
    values = {f"{mode}_{k}": result.get(k) for k in SPEED_FIELDS}
    if result.get("params_m") is not None:
        values["params_m"] = result["params_m"]
    return values


def train_fn_from_path(spec: str) -> Callable[[dict], dict]:
    """'package.module:function' -> the function (an installed module, e.g. ``dartmamba_train.scaling``, or one in
    the working directory)."""
    if ":" not in spec:
        raise SystemExit(f"--train-fn must look like package.module:function, got {spec!r}")
    module_name, func_name = spec.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def train_fn_from_command(template: str) -> Callable[[dict], dict]:
    """A train_fn running a shell command that writes ``{workdir}/metrics.json`` with ``accuracy`` or ``top1``."""

    def train(cell: dict) -> dict:
        workdir = Path(cell["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        fields = {"{model}": cell["model"], "{model_kwargs}": shlex.quote(json.dumps(cell["model_kwargs"])),
                  "{tokens}": str(cell["tokens"]), "{workdir}": shlex.quote(str(workdir))}
        command = template
        for placeholder, value in fields.items():     # plain replacement: other braces in the command stay
            command = command.replace(placeholder, value)
        subprocess.run(command, shell=True, check=True)
        metrics = json.loads((workdir / "metrics.json").read_text())
        accuracy = metrics.get("accuracy", metrics.get("top1"))
        if accuracy is None:
            raise KeyError(f"{workdir / 'metrics.json'} has no 'accuracy' or 'top1'")
        return {"accuracy": accuracy, **{k: v for k, v in metrics.items() if k not in ("accuracy", "top1")}}

    return train


def measure_accuracy(cell: Cell, train_fn: Callable[[dict], dict], out_dir: Path, train_kwargs: dict) -> dict:
    info = {"family": cell.family, "size": cell.size, "tokenizer": cell.tokenizer, "tokens": cell.tokens,
            "model": cell.model, "model_kwargs": dict(cell.model_kwargs),
            "workdir": str(out_dir / "train" / cell.key), **train_kwargs}
    result = dict(train_fn(info))
    if "accuracy" not in result:
        raise KeyError(f"train_fn returned no 'accuracy' for {cell.key}: {sorted(result)}")
    accuracy = float(result.pop("accuracy"))
    return {"accuracy": accuracy, "accuracy_status": "ok", "train_info": json.dumps(result, sort_keys=True,
                                                                                    default=str)}


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    done: int = 0          # metrics measured in this run
    skipped: int = 0       # metrics already in the CSV
    remaining: int = 0     # metrics left when the run stopped early
    stopped: str = ""      # why it stopped early ("" when complete)


def run_study(cells: list[Cell], metrics, out_dir: str | Path, *, speed_opts: dict | None = None,
              train_fn: Callable[[dict], dict] | None = None, train_kwargs: dict | None = None,
              time_budget: float | None = None, max_cells: int | None = None, retry_failed: bool = False,
              plots: bool = True, log=print) -> StudyResult:
    """Measure ``metrics`` for every cell, resuming from ``out_dir/scaling.csv``; write plots and the summary.

    Metrics run in phases (all FLOPs first: they are free; then inference, training speed, accuracy), cells in the
    given order within a phase. A ``train_fn`` that raises an ``Exception`` fails that cell only (recorded as
    ``accuracy_status``); KeyboardInterrupt / SystemExit stop the study with everything finished so far saved.
    """
    from benchmarks.common import device_name, resolve_device

    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"metrics must be among {METRICS}, got {metric!r}")
    if "accuracy" in metrics and train_fn is None:
        raise ValueError("the accuracy metric needs a train_fn (--train-fn or --train-cmd)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(out_dir / "scaling.csv")
    opts = {"batch_size": 64, "device": "auto", "amp": "none", "compile": False, "warmup": 3, "repeats": 5,
            "iters": 5, **(speed_opts or {})}
    device_label = None
    if any(m in metrics for m in ("infer", "train")):
        device = resolve_device(opts["device"]) if isinstance(opts["device"], str) else opts["device"]
        opts["device"] = device
        device_label = device_name(device)
    start = time.perf_counter()
    result = StudyResult()
    finished_cells: set[str] = set()
    todo = [(metric, cell) for metric in metrics for cell in cells]
    try:
        for index, (metric, cell) in enumerate(todo):
            if is_done(store.get(cell), metric, device_label, retry_failed):
                result.skipped += 1
                continue
            if time_budget is not None and time.perf_counter() - start > time_budget:
                result.stopped = f"time budget of {time_budget:.0f} s used"
                break
            if max_cells is not None and len(finished_cells) >= max_cells:
                result.stopped = f"--max-cells {max_cells} reached"
                break
            t0 = time.perf_counter()
            if metric == "flops":
                values = measure_flops(cell)
                note = f"{values['gflops']:.3f} GFLOPs"
            elif metric in ("infer", "train"):
                values = measure_speed(cell, metric, opts)
                status = values[f"{metric}_status"]
                note = f"{values[f'{metric}_img_per_s']:,.1f} img/s" if status == "ok" else status
            else:
                try:
                    values = measure_accuracy(cell, train_fn, out_dir, train_kwargs or {})
                    note = f"accuracy {values['accuracy']:.2f}"
                except Exception as exc:  # noqa: BLE001  (one failed run is a result; Ctrl-C still stops the study)
                    values = {"accuracy_status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
                    note = values["accuracy_status"]
            store.update(cell, values)
            result.done += 1
            finished_cells.add(cell.key)
            log(f"[{index + 1}/{len(todo)}] {metric:8s} {cell.key:28s} {note}  ({time.perf_counter() - t0:.1f} s)")
    finally:
        result.remaining = sum(1 for m, c in todo if not is_done(store.get(c), m, device_label, retry_failed))
        if plots:
            write_outputs(out_dir, log=log)
    if result.stopped:
        log(f"stopped early ({result.stopped}): {result.remaining} measurements left; rerun the same command to "
            f"resume")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Fan-out: a job per cell (submitit: SLURM, or local processes)
# ----------------------------------------------------------------------------------------------------------------
EXECUTORS = ("local", "slurm")


def cell_done(row: dict, metrics, device: str | None = None, retry_failed: bool = False) -> bool:
    """Every metric of the cell is done, or its job failed (and failures are not retried)."""
    if str(row.get("job_status") or "").startswith("failed") and not retry_failed:
        return True
    return all(is_done(row, metric, device, retry_failed) for metric in metrics)


def _train_fn_from_spec(spec: dict | None) -> Callable[[dict], dict] | None:
    if not spec:
        return None
    return train_fn_from_path(spec["fn"]) if spec.get("fn") else train_fn_from_command(spec["cmd"])


def run_cell_job(out_dir: str, cell: dict, metrics: list, speed_opts: dict | None, train_spec: dict | None,
                 train_kwargs: dict | None, retry_failed: bool) -> dict:
    """One job of a fanned-out study: measure the cell's missing metrics (each merged into ``scaling.csv`` as it
    finishes, :class:`Store`), write the cell's row to ``cells/<cell>.json``, mark its ``job_status`` ok. Returns
    the row."""
    one = Cell(**cell)
    fn = _train_fn_from_spec(train_spec) if "accuracy" in metrics else None
    run_study([one], metrics, out_dir, speed_opts=speed_opts, train_fn=fn, train_kwargs=train_kwargs,
              retry_failed=retry_failed, plots=False)
    store = Store(Path(out_dir) / "scaling.csv")
    store.update(one, {"job_status": "ok"})
    row = store.get(one)
    (Path(out_dir) / "cells").mkdir(exist_ok=True)
    atomic_write_text(Path(out_dir) / "cells" / f"{one.key}.json", json.dumps(row, indent=1, sort_keys=True))
    return row


def run_study_jobs(cells: list[Cell], metrics, out_dir: str | Path, *, executor: str, max_parallel: int | None = None,
                   speed_opts: dict | None = None, train_spec: dict | None = None, train_kwargs: dict | None = None,
                   retry_failed: bool = False, job_opts: dict | None = None, poll_s: float = 1.0, plots: bool = True,
                   log=print, pool=None) -> StudyResult:
    """:func:`run_study` fanned out: one submitit job per unfinished cell (``executor`` ``"slurm"``, or ``"local"``
    processes), at most ``max_parallel`` at a time; each job merges its results into ``scaling.csv`` itself
    (:func:`run_cell_job`), so the study survives this process. A cell whose job fails is recorded in
    ``job_status`` and skipped by reruns unless ``retry_failed``. Progress lines count done / running / failed /
    pending. ``train_spec``: ``{"fn": "module:function"}`` or ``{"cmd": template}`` (jobs rebuild the function).
    ``job_opts``: ``time`` (minutes), ``cpus``, ``gpus``, ``partition``, ``account``. ``pool``: a submitit-like
    executor to use instead (``submit(fn, *args)`` -> a job with ``done()``, ``exception()``, ``job_id``)."""
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"metrics must be among {METRICS}, got {metric!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel must be an integer >= 1, got {max_parallel}")
    if "accuracy" in metrics and not (train_spec and (train_spec.get("fn") or train_spec.get("cmd"))):
        raise ValueError("the accuracy metric needs a train_fn (--train-fn or --train-cmd)")
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(out_dir / "scaling.csv")
    todo = [cell for cell in cells if not cell_done(store.get(cell), metrics, None, retry_failed)]
    result = StudyResult(skipped=len(cells) - len(todo))
    opts = {"time": 60, "cpus": 1, "gpus": 0, **(job_opts or {})}
    if pool is None:
        import submitit

        pool = submitit.AutoExecutor(folder=str(out_dir / "jobs" / "%j"), cluster=executor)
        params = dict(name="scaling", nodes=1, tasks_per_node=1, cpus_per_task=int(opts["cpus"]),
                      timeout_min=int(opts["time"]))
        if opts["gpus"]:
            params["gpus_per_node"] = int(opts["gpus"])
        if executor == "slurm":
            params.update({f"slurm_{k}": opts[k] for k in ("partition", "account") if opts.get(k)})
        pool.update_parameters(**params)
    job_fn = importlib.import_module("benchmarks.scaling").run_cell_job   # by module name, also from a script run
    pending, running, failed = list(todo), {}, 0
    last = None
    log(f"{len(todo)} cell(s) to run as {executor} jobs ({result.skipped} already done), at most "
        f"{max_parallel or len(todo)} at a time; job logs in {out_dir / 'jobs'}")
    try:
        while pending or running:
            while pending and (max_parallel is None or len(running) < max_parallel):
                cell = pending.pop(0)
                job = pool.submit(job_fn, str(out_dir), asdict(cell), list(metrics), speed_opts, train_spec,
                                  train_kwargs, retry_failed)
                running[job] = cell
            for job in [j for j in running if j.done()]:
                cell = running.pop(job)
                error = job.exception()
                if error is None:
                    result.done += 1
                else:
                    failed += 1
                    lines = [line for line in str(error).strip().splitlines() if line.strip()]
                    why = f"failed: job {job.job_id}: {lines[-1][:200] if lines else type(error).__name__}"
                    store.update(cell, {"job_status": why})
                    log(f"{cell.key}: {why} (log: {out_dir / 'jobs' / str(job.job_id)})")
            state = (result.done, len(running), failed, len(pending))
            if state != last:
                log(f"progress: {result.done} done / {len(running)} running / {failed} failed / {len(pending)} "
                    f"pending")
                last = state
            if running:
                time.sleep(poll_s)
    finally:
        store.reload()
        result.remaining = sum(1 for c in cells if not cell_done(store.get(c), metrics, None, retry_failed))
        if plots:
            write_outputs(out_dir, log=log)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Summary and plots
# ----------------------------------------------------------------------------------------------------------------
def _num(value):
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def load_rows(csv_path: Path) -> list[dict]:
    if not Path(csv_path).exists():
        return []
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["tokens"] = int(row["tokens"])
    return rows


def _series(rows, value, transform=None):
    """{(family, size, tokenizer): [(tokens, value)]} sorted by tokens, numeric values only."""
    out: dict[tuple, list] = {}
    for row in rows:
        v = _num(row.get(value))
        if v is None or v <= 0:
            continue
        if transform is not None:
            v = transform(v)
        out.setdefault((row["family"], row["size"], row["tokenizer"]), []).append((row["tokens"], v))
    order = {"vim": 0, "deit": 1, "tiny": 0, "small": 1, "base": 2, "fixed": 0, "dart": 1}
    return {k: sorted(v) for k, v in sorted(out.items(), key=lambda kv: [order.get(x, 9) for x in kv[0]])}


def exponents(rows: list[dict]) -> list[dict]:
    """Fitted exponents of cost vs tokens over FIT_RANGE per (family, size, tokenizer): GFLOPs and time per image
    (inference, training) = 1 / img/s."""
    from dartmamba.flops import fit_exponent

    table: dict[tuple, dict] = {}
    for label, value, transform in (("gflops", "gflops", None), ("infer_time", "infer_img_per_s", lambda v: 1 / v),
                                    ("train_time", "train_img_per_s", lambda v: 1 / v)):
        for key, pts in _series(rows, value, transform).items():
            try:
                k = fit_exponent([t for t, _ in pts], [v for _, v in pts], *FIT_RANGE)
            except ValueError:
                continue
            table.setdefault(key, {"family": key[0], "size": key[1], "tokenizer": key[2]})[label] = k
    return list(table.values())


def scaling_checks(exps: list[dict]) -> list[str]:
    """The issue's criteria: Vim cost grows at most like tokens^1.1 from 196 to 1568 tokens; DeiT faster."""
    lines = []
    by_key = {(e["family"], e["size"], e["tokenizer"]): e for e in exps}
    for e in exps:
        if e["family"] != "vim":
            continue
        for label in ("gflops", "infer_time", "train_time"):
            if label not in e:
                continue
            ok = e[label] <= LINEAR_MAX_EXPONENT
            line = (f"- Vim-{e['size']} {e['tokenizer']}: {label} exponent {e[label]:.3f} "
                    f"{'<=' if ok else '>'} {LINEAR_MAX_EXPONENT} ({'ok' if ok else 'MISS'})")
            deit = by_key.get(("deit", e["size"], e["tokenizer"]), {})
            if label in deit:
                faster = deit[label] > e[label]
                line += (f"; DeiT-{e['size']} {e['tokenizer']}: {deit[label]:.3f} "
                         f"({'grows faster: ok' if faster else 'does not grow faster: MISS'})")
            lines.append(line)
    return lines


def summary_markdown(rows: list[dict]) -> str:
    exps = exponents(rows)
    device = next((r.get("infer_device") or r.get("train_device") for r in rows
                   if r.get("infer_device") or r.get("train_device")), None)
    table_cols = [("family", "family", ""), ("size", "size", ""), ("tokenizer", "tok.", ""), ("tokens", "tokens", "d"),
                  ("gflops", "GFLOPs", ".4g"), ("gflops_scorer_trunk", "scorer GF", ".3g"),
                  ("infer_img_per_s", "infer img/s", ",.0f"), ("infer_peak_mem_mib", "infer MiB", ",.0f"),
                  ("train_img_per_s", "train img/s", ",.0f"), ("train_peak_mem_mib", "train MiB", ",.0f"),
                  ("accuracy", "acc. %", ".2f")]
    present = [c for c in table_cols if any(_filled(r.get(c[0])) for r in rows) or c[0] in ("family", "tokens")]
    numeric = [{k: (_num(v) if k not in ("family", "size", "tokenizer", "model", "cell") else v)
                for k, v in r.items()} for r in rows]
    for r in numeric:
        r["tokens"] = int(r["tokens"])
    settings = ""
    first = next((r for r in rows if _filled(r.get("infer_batch")) or _filled(r.get("train_batch"))), None)
    if first:
        settings = (f" batch {first.get('infer_batch') or first.get('train_batch')}, amp "
                    f"{first.get('infer_amp') or first.get('train_amp')}, compile "
                    f"{first.get('infer_compile') or first.get('train_compile')};")
    parts = [f"### Scaling study{' on ' + device if device else ''}", "",
             f"Cells: {len(rows)};{settings} GFLOPs = forward multiply-adds per image (tokenizer and scan counted).",
             "", markdown_table(numeric, present)]
    if exps:
        exp_cols = [("family", "family", ""), ("size", "size", ""), ("tokenizer", "tokenizer", ""),
                    ("gflops", "GFLOPs exp.", ".3f"), ("infer_time", "infer time exp.", ".3f"),
                    ("train_time", "train time exp.", ".3f")]
        exp_cols = [c for c in exp_cols if c[2] == "" or any(c[0] in e for e in exps)]
        parts += ["", f"### Cost ~ tokens^k, fitted from {FIT_RANGE[0]} to {FIT_RANGE[1]} tokens "
                      f"(time = 1 / img/s)", "", markdown_table(exps, exp_cols)]
        checks = scaling_checks(exps)
        if checks:
            parts += ["", f"Checks (Vim linear: k <= {LINEAR_MAX_EXPONENT}; DeiT grows faster):", "", *checks]
    return "\n".join(parts) + "\n"


_STYLE = {("vim", "fixed"): ("tab:blue", "-"), ("vim", "dart"): ("tab:blue", "--"),
          ("deit", "fixed"): ("tab:red", "-"), ("deit", "dart"): ("tab:red", "--")}
_MARK = {"tiny": "o", "small": "s", "base": "^"}


def _label(key) -> str:
    family, size, tokenizer = key
    return f"{'Vim' if family == 'vim' else 'DeiT'}-{size[0].upper()}{'i' if size == 'tiny' else ''} {tokenizer}"


def _plot_lines(ax, series: dict, suffix: dict | None = None) -> None:
    for key, pts in series.items():
        color, ls = _STYLE.get((key[0], key[2]), ("k", "-"))
        ax.plot([t for t, _ in pts], [v for _, v in pts], ls, color=color, marker=_MARK.get(key[1], "o"),
                label=_label(key) + ((suffix or {}).get(key, "")))


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg); returns the files written. Plots with no data are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from dartmamba.flops import fit_exponent

    written = []
    device = next((r.get("infer_device") or r.get("train_device") for r in rows
                   if r.get("infer_device") or r.get("train_device")), "")

    tokens = sorted({r["tokens"] for r in rows})

    def token_axis(ax):
        ax.set_xscale("log")
        ax.set_xticks(tokens)
        ax.set_xticklabels([str(t) for t in tokens], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())

    def finish(fig, ax, name, title, xlabel, ylabel, logx=True, logy=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            token_axis(ax) if xlabel == "tokens" else ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    speed = {m: _series(rows, f"{m}_img_per_s") for m in ("infer", "train")}
    speed = {m: s for m, s in speed.items() if s}
    if speed:
        fig, axes = plt.subplots(1, len(speed), figsize=(6 * len(speed), 4.5), squeeze=False)
        for ax, (mode, series) in zip(axes[0], speed.items()):
            _plot_lines(ax, series)
            ax.set_title(f"{'inference' if mode == 'infer' else 'training'}", fontsize=10)
            token_axis(ax)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel("img/s")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle(f"Throughput vs tokens{' - ' + device if device else ''}", fontsize=10)
        fig.tight_layout()
        path = out_dir / "throughput_vs_tokens.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    flops = _series(rows, "gflops")
    if flops:
        suffix = {}
        for key, pts in flops.items():
            try:
                suffix[key] = f" (k={fit_exponent([t for t, _ in pts], [v for _, v in pts], *FIT_RANGE):.2f})"
            except ValueError:
                pass
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        _plot_lines(ax, flops, suffix)
        finish(fig, ax, "flops_vs_tokens.png", "Forward GFLOPs vs tokens (k: exponent, 196-1568)", "tokens",
               "GFLOPs (multiply-adds)")

    accuracy = _series(rows, "accuracy")
    if accuracy:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        _plot_lines(ax, accuracy)
        finish(fig, ax, "accuracy_vs_tokens.png", "Accuracy vs tokens (cluttered canvas)", "tokens", "top-1 %",
               logy=False)
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        pairs: dict[tuple, list] = {}
        for row in rows:
            acc, gf = _num(row.get("accuracy")), _num(row.get("gflops"))
            if acc is not None and gf is not None:
                pairs.setdefault((row["family"], row["size"], row["tokenizer"]), []).append((gf, acc))
        if pairs:
            _plot_lines(ax, {k: sorted(v) for k, v in sorted(pairs.items())})
            finish(fig, ax, "accuracy_vs_flops.png", "Accuracy vs GFLOPs (cluttered canvas)", "GFLOPs", "top-1 %",
                   logy=False)
        else:
            plt.close(fig)
    return written


def write_outputs(out_dir: Path, log=print) -> None:
    rows = load_rows(out_dir / "scaling.csv")
    if not rows:
        return
    atomic_write_text(out_dir / "summary.md", summary_markdown(rows))
    try:
        written = write_plots(rows, out_dir)
    except ImportError as exc:
        log(f"plots skipped: {exc}")
        return
    if written:
        log("plots: " + ", ".join(p.name for p in written))


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "scaling"),
                        help="study directory (scaling.csv, plots, summary.md; default relative to the working "
                             "directory); reuse it to resume")
    parser.add_argument("--metrics", nargs="+", default=["flops", "infer"], choices=METRICS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", default=["ti", "s", "b"], help="ti s b (run order)")
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=TOKENIZERS)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(SCALING_TOKENS))
    parser.add_argument("--model-kwargs", default=None, help="JSON kwargs for every cell's model")
    parser.add_argument("--fixed-kwargs", default=None, help="JSON kwargs for fixed-grid cells only")
    parser.add_argument("--dart-kwargs", default=None,
                        help="JSON kwargs for DART cells only, e.g. '{\"dart_cfg\": {\"scorer_input_size\": 448}}'")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    parser.add_argument("--compile", nargs="?", const="default", default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; stop starting new work after it")
    parser.add_argument("--max-cells", type=int, default=None, help="stop after this many newly finished cells")
    parser.add_argument("--retry-failed", action="store_true", help="redo measurements that failed (OOM, errors)")
    parser.add_argument("--train-fn", default=None, help="package.module:function for the accuracy metric")
    parser.add_argument("--train-cmd", default=None, help="shell command template for the accuracy metric")
    parser.add_argument("--train-kwargs", default=None, help="JSON passed to train_fn with each cell")
    parser.add_argument("--plots-only", action="store_true", help="only redraw plots and summary from the CSV")
    jobs = parser.add_argument_group("fan-out: a job per cell (submitit)")
    jobs.add_argument("--executor", choices=EXECUTORS, default=None,
                      help="run each cell as a job: on SLURM, or as local processes (default: cells in this process)")
    jobs.add_argument("--max-parallel", type=int, default=None, help="jobs running at a time (default: all)")
    jobs.add_argument("--job-time", type=int, default=60, help="each job's time limit in minutes (default 60)")
    jobs.add_argument("--job-cpus", type=int, default=1, help="CPUs per job (default 1)")
    jobs.add_argument("--job-gpus", type=int, default=0, help="GPUs per job (default 0)")
    jobs.add_argument("--partition", default=None, help="SLURM partition of the jobs")
    jobs.add_argument("--account", default=None, help="SLURM account of the jobs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from benchmarks.common import parse_json_arg

    args = parse_args(argv)
    out_dir = Path(args.out)
    if args.plots_only:
        write_outputs(out_dir)
        print((out_dir / "summary.md").read_text() if (out_dir / "summary.md").exists() else "no rows")
        return 0
    cells = make_cells(args.families, args.sizes, args.tokenizers, args.tokens, parse_json_arg(args.model_kwargs),
                       parse_json_arg(args.fixed_kwargs, "--fixed-kwargs"),
                       parse_json_arg(args.dart_kwargs, "--dart-kwargs"))
    train_fn = None
    if "accuracy" in args.metrics:
        if args.train_fn:
            train_fn = train_fn_from_path(args.train_fn)
        elif args.train_cmd:
            train_fn = train_fn_from_command(args.train_cmd)
        else:
            raise SystemExit("--metrics accuracy needs --train-fn module:function or --train-cmd TEMPLATE")
    speed = {"batch_size": args.batch_size, "device": args.device, "amp": args.amp, "compile": args.compile or False,
             "warmup": args.warmup, "repeats": args.repeats, "iters": args.iters}
    if args.executor:
        for name in ("max_parallel", "job_time", "job_cpus"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise SystemExit(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
        result = run_study_jobs(cells, args.metrics, out_dir, executor=args.executor, max_parallel=args.max_parallel,
                                speed_opts=speed, train_spec={"fn": args.train_fn, "cmd": args.train_cmd},
                                train_kwargs=parse_json_arg(args.train_kwargs, "--train-kwargs"),
                                retry_failed=args.retry_failed,
                                job_opts={"time": args.job_time, "cpus": args.job_cpus, "gpus": args.job_gpus,
                                          "partition": args.partition, "account": args.account})
        print(f"\n{result.done} cell job(s) finished, {result.skipped} cell(s) already done, {result.remaining} left; "
              f"CSV: {out_dir / 'scaling.csv'}\n")
        return 0 if result.remaining == 0 else 1
    result = run_study(cells, args.metrics, out_dir, speed_opts=speed, train_fn=train_fn,
                       train_kwargs=parse_json_arg(args.train_kwargs, "--train-kwargs"), time_budget=args.time_budget,
                       max_cells=args.max_cells, retry_failed=args.retry_failed)
    print(f"\n{result.done} measured, {result.skipped} already done, {result.remaining} left; CSV: "
          f"{out_dir / 'scaling.csv'}\n")
    summary = out_dir / "summary.md"
    if summary.exists():
        print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
