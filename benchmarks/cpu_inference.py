"""The CPU inference table: img/s of Vim-Ti/S and DeiT-Ti/S, fixed grid and DART, at 196, 784 and 1568 tokens,
batch 1 and 32, fp32 and bfloat16 autocast, eager and torch.compile'd, on a few threads.

196 tokens is the "224" column (fixed grids: a 224 image; DART: 448 input, ``num_tokens=196``, the paper's setting),
784 tokens the "448" one (a 448 image; DART ``num_tokens=784``), 1568 tokens a 512 x 784 image (DART
``num_tokens=1568``), as in benchmarks/model_table.py. ``--amp bf16`` runs the cell under
``torch.autocast("cpu", torch.bfloat16)`` with fp32 weights (the GEMMs in bfloat16; dartmamba's C++ scan, conv and
norm read and write bfloat16 and compute in fp32). Every cell is ``benchmarks.throughput.run_one`` (median over
repeats; compiled cells report their compile time as ``first_iter_s``); with ``--interleaved`` the cells of one
(tokens, batch, amp, compiled) group are timed side by side instead (``benchmarks.throughput.run_interleaved``:
load that comes and goes falls on every model alike), which is how ratios between models are measured. Below the
table: each model's img/s over the DeiT of its size in the same group, and each bf16 row's gain over its fp32 row
(with --interleaved, the gain ratio Vim / DeiT is the bf16 ratio over the fp32 one, both taken side by side). Rows
are written after each cell (a stopped run keeps what it measured); the load average before and after each cell
goes with it, since CPU machines are often shared.

    python -m benchmarks.cpu_inference --threads 2 --out benchmarks/results/cpu-2core
    python -m benchmarks.cpu_inference --threads 2 --sizes ti --families vim --batch-size 8 --no-compile
    # the issue-30 targets: Vim-Ti / DeiT-Ti, interleaved, fp32 and bf16 at 224 batch 8; fp32 at 784 / 1568 batch 4
    python -m benchmarks.cpu_inference --threads 2 --sizes ti --tokenizers fixed --no-compile --interleaved \
        --tokens 196 --batch-size 8 --amp none bf16
    python -m benchmarks.cpu_inference --threads 2 --sizes ti --tokenizers fixed --no-compile --interleaved \
        --tokens 784 1568 --batch-size 4 --amp none
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import cpu_allocator, timing_trunk_weights  # noqa: E402
from benchmarks.common import (atomic_write_text, cell_model, environment, markdown_table, write_csv,  # noqa: E402
                               write_json)

LABELS = {("vim", "tiny"): "Vim-Ti", ("vim", "small"): "Vim-S", ("deit", "tiny"): "DeiT-Ti",
          ("deit", "small"): "DeiT-S"}
COLUMNS = [("label", "model", ""), ("tokens", "tokens", "d"), ("input", "input", ""), ("batch", "batch", "d"),
           ("amp", "amp", ""), ("compile", "compiled", ""), ("img_per_s", "img/s", ",.1f"), ("latency_ms", "ms/batch", ",.1f"),
           ("first_iter_s", "first call s", ".1f"), ("load", "load avg before/after", ""), ("status", "status", "")]


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _size_name(size: str) -> str:
    """"ti" -> "tiny", "s" -> "small" (the abbreviations cell_model takes), full names as they are."""
    from benchmarks import common

    return common.SIZE_ALIASES.get(size.lower(), size.lower())


def plan(families, sizes, tokenizers, tokens, batches, compiled, dart_families=("vim",), amps=("none",)) -> list[dict]:
    cells = []
    for family in families:
        for size in sizes:
            for tokenizer in tokenizers:
                if tokenizer == "dart" and family not in dart_families:
                    continue
                for n in tokens:
                    name, kwargs = cell_model(family, size, tokenizer, n)
                    label = LABELS[(family, _size_name(size))] + ("-DART" if tokenizer == "dart" else "")
                    for batch in batches:
                        for amp in amps:
                            for comp in compiled:
                                cells.append(dict(label=label, model=name, kwargs=kwargs, tokens=n, batch=batch,
                                                  amp=amp, compile=comp))
    return cells


def _group_key(cell: dict) -> tuple:
    return cell["tokens"], cell["batch"], cell.get("amp", "none"), bool(cell["compile"])


def _finish_row(row: dict, cell: dict, before: str, log) -> dict:
    row.update(label=cell["label"], tokens=cell["tokens"], amp=cell.get("amp", "none"),
               compile="yes" if cell["compile"] else "no", load=f"{before} / {load_average()}")
    log(f"{row['label']:12s} {cell['tokens']:4d} tok batch {cell['batch']:3d} {row['amp']:4s} "
        f"{'compiled' if cell['compile'] else 'eager   '}: "
        + (f"{row['img_per_s']:,.1f} img/s" if row["status"] == "ok" else row["status"]))
    return row


def run_table(cells: list[dict], warmup: int, repeats: int, on_row=None, log=print,
              interleaved: bool = False) -> list[dict]:
    """One row per cell; ``interleaved``: the cells of each (tokens, batch, amp, compiled) group side by side."""
    from benchmarks.throughput import run_interleaved, run_one

    rows = []
    if interleaved:
        groups: dict[tuple, list[dict]] = {}
        for cell in cells:
            groups.setdefault(_group_key(cell), []).append(cell)
        for (tokens, batch, amp, comp), group in groups.items():
            before = load_average()
            iters = 5 if batch == 1 else 1
            measured = run_interleaved([(c["model"], c["kwargs"], batch, "infer") for c in group], "cpu", amp,
                                       "default" if comp else False, warmup, repeats, iters)
            for cell, row in zip(group, measured):
                rows.append(_finish_row(row, cell, before, log))
            if on_row is not None:
                on_row(rows)
        return rows
    for cell in cells:
        before = load_average()
        iters = 5 if cell["batch"] == 1 else 1
        row = run_one(cell["model"], cell["kwargs"], cell["batch"], "infer", "cpu", cell.get("amp", "none"),
                      "default" if cell["compile"] else False, warmup, repeats, iters)
        rows.append(_finish_row(row, cell, before, log))
        if on_row is not None:
            on_row(rows)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each model's img/s over the DeiT of its size in the same (tokens, batch, amp, compiled) group
    (``vs_deit``), and each bf16 row's img/s over the same model's fp32 row (``bf16_gain``)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    index = {(r["label"], r["tokens"], r["batch"], r["amp"], r["compile"]): r for r in ok}
    out = []
    for r in ok:
        size = r["label"].split("-")[1] if "-" in r["label"] else ""
        deit = index.get((f"DeiT-{size}", r["tokens"], r["batch"], r["amp"], r["compile"]))
        fp32 = index.get((r["label"], r["tokens"], r["batch"], "none", r["compile"]))
        out.append(dict(label=r["label"], tokens=r["tokens"], batch=r["batch"], amp=r["amp"], compile=r["compile"],
                        vs_deit=r["img_per_s"] / deit["img_per_s"] if deit is not None else None,
                        bf16_gain=r["img_per_s"] / fp32["img_per_s"] if fp32 is not None and r["amp"] != "none"
                        else None))
    return out


RATIO_COLUMNS = [("label", "model", ""), ("tokens", "tokens", "d"), ("batch", "batch", "d"), ("amp", "amp", ""),
                 ("compile", "compiled", ""), ("vs_deit", "img/s over DeiT's (same group)", ".3f"),
                 ("bf16_gain", "bf16 / fp32 img/s", ".3f")]


def render(rows: list[dict], env: dict, threads: int) -> str:
    backends = env.get("backends", {})
    head = (f"### CPU inference on {env['host_cpu']} ({threads} threads; torch {env['torch']}; "
            f"{env.get('allocator', 'glibc defaults')})\n\n"
            f"Backends: " + ", ".join(f"{k}={v}" for k, v in backends.items()) + ". fp32 and bf16 autocast, eager "
            "and torch.compile (inductor); 196 tokens: 224 px fixed grid / 448 px DART input; 784 tokens: 448 px; "
            "1568 tokens: 512 x 784 px.\n\n")
    return (head + markdown_table(rows, COLUMNS) + "\n\nRatios:\n\n" + markdown_table(ratios(rows), RATIO_COLUMNS)
            + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["vim", "deit"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokenizers", nargs="+", default=["fixed", "dart"])
    parser.add_argument("--dart-families", nargs="+", default=["vim"], help="families that get DART rows")
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 784, 1568])
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16", "fp16"],
                        help="autocast dtypes (fp32 weights); none: fp32")
    parser.add_argument("--interleaved", action="store_true",
                        help="time the models of each (tokens, batch, amp, compiled) group side by side")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for cpu_inference.{md,json,csv}")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc malloc's default thresholds (by default they are raised, as dartmamba's CPU "
                             "entry points do: dartmamba.runtime.tune_cpu_allocator)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    timing_trunk_weights()
    torch.set_num_threads(args.threads)
    cpu_allocator(default=args.default_allocator)
    env = environment(torch.device("cpu"))
    cells = plan(args.families, args.sizes, args.tokenizers, args.tokens, args.batch_size,
                 [False] if args.no_compile else [False, True], args.dart_families, args.amp)
    out = Path(args.out) if args.out else None

    def save(rows):
        if out is None:
            return
        write_json(out / "cpu_inference.json", {"environment": env, "args": vars(args), "rows": rows})
        write_csv(out / "cpu_inference.csv", rows)
        atomic_write_text(out / "cpu_inference.md", render(rows, env, args.threads))

    rows = run_table(cells, args.warmup, args.repeats, on_row=save, interleaved=args.interleaved)
    save(rows)
    print()
    print(render(rows, env, args.threads))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
