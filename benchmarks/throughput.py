"""Throughput (img/s), latency and peak memory of any registered model, inference or training, CPU or GPU.

Every measurement: build the model (random weights), make one random batch on the device, run ``--warmup``
iterations (torch.compile compiles here; its time is reported as ``first_iter_s``), then ``--repeats`` timed
repeats of ``--iters`` iterations each, with a device synchronisation before and after every repeat. Reported:
the median over repeats of the time per batch (``latency_ms``) and ``img_per_s = batch / latency``; peak memory
(CUDA: ``torch.cuda.max_memory_allocated`` over the timed repeats, weights and optimizer state included; CPU: the
growth of the process's peak resident set over the timed repeats, i.e. activations and workspace); and the device
by name.

Several cells (models, token counts, batch sizes, modes) on the CPU are timed side by side (``--interleave``, on by
default there): every model is built and warmed up first, then each round times one iteration of every cell, the
order rotated from round to round, so that load which comes and goes on a shared machine falls on all of them
alike and their ratios hold; the peak memory of each cell is then that of ``--iters`` steps it ran alone after its
warm-up. ``--interleave off`` (the default on GPUs, where large sweeps would not fit at once) runs one cell after the
other, each model freed before the next is built.

Modes: ``infer`` (``torch.inference_mode``, eval mode) and ``train`` (train mode; forward, cross-entropy on random
labels, backward, AdamW step, ``zero_grad(set_to_none=True)``). ``--amp bf16`` runs under
``torch.autocast(dtype=bfloat16)`` with fp32 weights; ``--compile`` wraps the model in ``torch.compile``.

Examples:
  python -m benchmarks.throughput --model vim_small_patch16_224 --batch-size 256 --mode infer train --amp bf16
  python -m benchmarks.throughput --model vim_small_dart --model-kwargs '{"num_tokens": 392}' --batch-size 128
  python -m benchmarks.throughput --model deit_small_patch16_224 vim_small_patch16_224 --tokens 196 784 --flops
  python benchmarks/throughput.py --model vim_tiny_patch16_224 --model-kwargs '{"depth": 2}' --device cpu \\
      --batch-size 2 --warmup 1 --repeats 3 --iters 1 --csv out.csv --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import cpu_allocator, timing_trunk_weights  # noqa: E402
from benchmarks.common import (device_name, environment, grid_for_tokens, markdown_table, parse_json_arg,  # noqa: E402
                               peak_rss_mib, reset_peak_rss, resolve_device, rss_mib, synchronize, write_csv,
                               write_json)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("infer", "train")

COLUMNS = [("model", "model", ""), ("kwargs", "kwargs", ""), ("tokens", "tokens", "d"), ("input", "input", ""),
           ("batch", "batch", "d"), ("mode", "mode", ""), ("amp", "amp", ""), ("compile", "compile", ""),
           ("img_per_s", "img/s", ",.1f"), ("latency_ms", "ms/batch", ",.2f"), ("peak_mem_mib", "peak MiB", ",.0f"),
           ("gflops", "GFLOPs", ".2f"), ("params_m", "params M", ".1f"), ("status", "status", "")]


def build_model(name: str, kwargs: dict | None = None, device: torch.device | str = "cpu"):
    """timm.create_model(name, **kwargs) with the dartmamba models registered; the frozen-trunk warning is muted
    (random weights are fine for timing)."""
    import timm

    import dartmamba.models  # noqa: F401  (registers the models)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, **(kwargs or {}))
    return model.to(device)


def tokens_kwargs(name: str, num_tokens: int, patch_size: int = 16) -> dict:
    """kwargs that give a registered model ``num_tokens`` image tokens: DART ``num_tokens``; fixed grid
    ``img_size = patch * grid_for_tokens(N)``."""
    if "dart" in name:
        return {"num_tokens": int(num_tokens)}
    rows, cols = grid_for_tokens(num_tokens)
    return {"img_size": patch_size * rows if rows == cols else (patch_size * rows, patch_size * cols)}


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prepare(model: torch.nn.Module, input_size: tuple[int, int, int], batch_size: int, mode: str, device,
             amp: str, compile: bool | str, warmup: int, seed: int):
    """The step function of one cell (one random batch on ``device``), run ``warmup`` times; -> (step, the first
    iteration's seconds: compilation, autotuning, allocations)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(batch_size, *input_size, generator=gen).to(device)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    labels = torch.randint(0, max(1, num_classes), (batch_size,), generator=gen).to(device)
    amp_dtype = AMP_DTYPES[amp]

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    runner = model
    if compile:
        runner = torch.compile(model) if compile is True or compile == "default" else torch.compile(model, mode=compile)

    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                runner(images)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, **fused)

        def step():
            with autocast():
                out = runner(images)
                loss = F.cross_entropy(out.float(), labels) if num_classes > 0 else out.float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_iter_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    synchronize(device)
    return step, first_iter_s


def _time_repeat(step, device: torch.device, iters: int) -> float:
    """Seconds per iteration over ``iters`` iterations, synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / iters


class _PeakMemory:
    """The peak memory of what runs between start() and stop() (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind, self.rss_before = "cuda max_memory_allocated", None
        else:
            self.kind = "cpu peak RSS growth" if reset_peak_rss() else "cpu peak RSS (process)"
            self.rss_before = rss_mib()

    def stop(self) -> tuple[float | None, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, self.kind
        peak_total = peak_rss_mib()
        if peak_total is None:
            return None, "n/a"
        if self.kind == "cpu peak RSS growth" and self.rss_before is not None:
            return max(0.0, peak_total - self.rss_before), self.kind
        return peak_total, self.kind


def _result(batch_size: int, times: list[float], peak, mem_kind: str, first_iter_s: float, repeats: int,
            iters: int, warmup: int) -> dict:
    latency = statistics.median(times)
    return {"img_per_s": batch_size / latency, "latency_ms": latency * 1e3, "latency_ms_min": min(times) * 1e3,
            "latency_ms_max": max(times) * 1e3, "peak_mem_mib": peak, "mem_kind": mem_kind,
            "first_iter_s": first_iter_s, "repeats": repeats, "iters": iters, "warmup": warmup}


def measure(model: torch.nn.Module, input_size: tuple[int, int, int], batch_size: int, mode: str = "infer",
            device: torch.device | str = "cpu", amp: str = "none", compile: bool | str = False, warmup: int = 3,
            repeats: int = 5, iters: int = 5, seed: int = 0) -> dict:
    """Time ``model`` (already on ``device``) on one random batch; returns the measured fields (see module doc).

    ``compile``: False, True (default mode) or a torch.compile mode name ("reduce-overhead", "max-autotune", ...).
    """
    device = torch.device(device)
    step, first_iter_s = _prepare(model, input_size, batch_size, mode, device, amp, compile, warmup, seed)
    memory = _PeakMemory(device)
    memory.start()
    times = [_time_repeat(step, device, iters) for _ in range(repeats)]
    peak, mem_kind = memory.stop()
    return _result(batch_size, times, peak, mem_kind, first_iter_s, repeats, iters, warmup)


def _new_row(model_name: str, model_kwargs: dict, batch_size: int, mode: str, device: torch.device, amp: str,
             compile: bool | str) -> dict:
    return {"model": model_name, "kwargs": json.dumps(model_kwargs, sort_keys=True), "batch": batch_size,
            "mode": mode, "amp": amp, "compile": str(compile) if compile else "no", "device": device_name(device)}


def _build_cell(row: dict, model_kwargs: dict, device: torch.device, input_size, with_flops: bool):
    """The cell's model on ``device`` and its input size; fills in the row's tokens, input, params (and GFLOPs)."""
    from dartmamba.flops import count_model_flops, model_input_size, model_num_tokens

    model = build_model(row["model"], model_kwargs, device)
    size = tuple(input_size) if input_size is not None else model_input_size(model)
    row.update(tokens=model_num_tokens(model), input="x".join(map(str, size[1:])),
               params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    if with_flops:
        row["gflops"] = count_model_flops(row["model"], input_size=size, **model_kwargs).gflops
    return model, size


def _failure(exc: BaseException) -> str:
    return "oom" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def run_one(model_name: str, model_kwargs: dict | None = None, batch_size: int = 32, mode: str = "infer",
            device: torch.device | str = "auto", amp: str = "none", compile: bool | str = False, warmup: int = 3,
            repeats: int = 5, iters: int = 5, input_size: tuple[int, int, int] | None = None,
            with_flops: bool = False) -> dict:
    """Build ``model_name`` on ``device``, measure it, and return one result row (an OOM or an error becomes
    ``status`` instead of an exception)."""
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    model_kwargs = dict(model_kwargs or {})
    row = _new_row(model_name, model_kwargs, batch_size, mode, device, amp, compile)
    model = None
    try:
        model, size = _build_cell(row, model_kwargs, device, input_size, with_flops)
        row.update(measure(model, size, batch_size, mode, device, amp, compile, warmup, repeats, iters))
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001  (a failed cell is a result, not the end of the sweep)
        row["status"] = _failure(exc)
    finally:
        del model
        _free(device)
    return row


def run_interleaved(cells: list[tuple[str, dict, int, str]], device: torch.device | str = "auto", amp: str = "none",
                    compile: bool | str = False, warmup: int = 3, repeats: int = 5, iters: int = 5,
                    input_size: tuple[int, int, int] | None = None, with_flops: bool = False) -> list[dict]:
    """Measure cells ``(model_name, model_kwargs, batch_size, mode)`` side by side; one row each, as run_one.

    Every model is built and warmed up first, its peak memory is that of ``iters`` more steps run alone; then each
    of ``repeats`` repeats is ``iters`` rounds, and each round times one iteration of every cell, the order rotated
    by one from round to round: load that comes and goes on a shared machine falls on every cell alike, so their
    ratios hold where one-after-the-other timings drift apart. A repeat's time is the mean of the cell's ``iters``
    iterations in it, as in :func:`measure`. All the models are held at once (mind the memory of large sweeps).
    """
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    rows, live = [], []
    for model_name, model_kwargs, batch_size, mode in cells:
        model_kwargs = dict(model_kwargs or {})
        row = _new_row(model_name, model_kwargs, batch_size, mode, device, amp, compile)
        row["timing"] = "interleaved"
        rows.append(row)
        try:
            model, size = _build_cell(row, model_kwargs, device, input_size, with_flops)
            step, first_iter_s = _prepare(model, size, batch_size, mode, device, amp, compile, warmup, 0)
            memory = _PeakMemory(device)
            memory.start()
            for _ in range(iters):
                step()
            synchronize(device)
            live.append({"row": row, "model": model, "step": step, "first": first_iter_s,
                         "memory": memory.stop(), "times": []})
        except Exception as exc:  # noqa: BLE001
            row["status"] = _failure(exc)
    for repeat in range(repeats):
        spent = [0.0] * len(live)
        for i in range(iters):
            for k in range(len(live)):
                j = (k + repeat * iters + i) % len(live)
                if "status" in live[j]["row"]:
                    continue
                try:
                    spent[j] += _time_repeat(live[j]["step"], device, 1)
                except Exception as exc:  # noqa: BLE001
                    live[j]["row"]["status"] = _failure(exc)
        for cell, seconds in zip(live, spent):
            cell["times"].append(seconds / iters)
    for cell in live:
        if "status" not in cell["row"]:
            peak, kind = cell["memory"]
            cell["row"].update(_result(cell["row"]["batch"], cell["times"], peak, kind, cell["first"], repeats,
                                       iters, warmup), status="ok")
    live.clear()
    _free(device)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="registered timm model name(s)")
    parser.add_argument("--model-kwargs", default=None, help="JSON object passed to timm.create_model")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="token counts: DART models get num_tokens=N, fixed grids img_size=16*grid(N)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument("--mode", nargs="+", default=["infer"], choices=MODES)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", default="none", choices=sorted(AMP_DTYPES), help="autocast dtype (fp32 weights)")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        help="torch.compile the model (optionally a mode: reduce-overhead, max-autotune, ...)")
    parser.add_argument("--img-size", type=int, nargs="+", default=None, help="override the input H [W]")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5, help="iterations per timed repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="CPU: keep glibc malloc's default thresholds (by default they are raised, as dartmamba's "
                             "CPU entry points do: dartmamba.runtime.tune_cpu_allocator)")
    parser.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                        help="time the cells side by side, in rounds of one repeat each (auto: on for several cells "
                             "on the CPU, where the machine is often shared; off: one cell after the other, each "
                             "model freed before the next is built)")
    parser.add_argument("--flops", action="store_true", help="also count GFLOPs (fake tensors, on the CPU)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    timing_trunk_weights()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu":
        cpu_allocator(default=args.default_allocator)
    base_kwargs = parse_json_arg(args.model_kwargs)
    input_size = None
    if args.img_size:
        h = args.img_size[0]
        w = args.img_size[1] if len(args.img_size) > 1 else h
        input_size = (3, h, w)
    env = environment(device)
    print(f"device: {env['device']}; torch {env['torch']}"
          + (f"; {env['allocator']}" if "allocator" in env else ""), flush=True)
    cells = []
    for name in args.model:
        for tokens in (args.tokens or [None]):
            kwargs = dict(base_kwargs)
            if tokens is not None:
                kwargs.update(tokens_kwargs(name, tokens, int(base_kwargs.get("patch_size", 16))))
            cells += [(name, kwargs, batch, mode) for batch in args.batch_size for mode in args.mode]
    interleave = args.interleave == "on" or (args.interleave == "auto" and device.type == "cpu" and len(cells) > 1)

    def report(row):
        print(f"{row['model']} {row['kwargs']} batch {row['batch']} {row['mode']}: "
              + (f"{row['img_per_s']:,.1f} img/s, {row['latency_ms']:.2f} ms/batch"
                 if row["status"] == "ok" else row["status"]), flush=True)

    if interleave:
        rows = run_interleaved(cells, device, args.amp, args.compile or False, args.warmup, args.repeats, args.iters,
                               input_size, args.flops)
        for row in rows:
            report(row)
    else:
        rows = []
        for cell in cells:
            rows.append(run_one(*cell, device, args.amp, args.compile or False, args.warmup, args.repeats,
                                args.iters, input_size, args.flops))
            report(rows[-1])
    if args.csv:
        write_csv(args.csv, [{**r, **{"device": env["device"]}} for r in rows])
    if args.json:
        write_json(args.json, {"environment": env, "rows": rows})
    print()
    timing = ("the cells interleaved: each round times one iteration of every cell" if interleave
              else "one cell after the other")
    print(f"### Throughput on {env['device']} (torch {env['torch']}; median of {args.repeats} repeats x "
          f"{args.iters} iterations after {args.warmup} warm-up; {timing})")
    print()
    columns = [c for c in COLUMNS if c[0] != "gflops" or args.flops]
    print(markdown_table(rows, columns))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
