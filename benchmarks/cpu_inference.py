"""The CPU inference table: img/s of Vim-Ti/S and DeiT-Ti/S, fixed grid and DART, at 196 and 784 tokens, batch 1
and 32, eager and torch.compile'd, on a few threads.

196 tokens is the "224" column (fixed grids: a 224 image; DART: 448 input, ``num_tokens=196``, the paper's setting),
784 tokens the "448" one (a 448 image; DART ``num_tokens=784``), as in benchmarks/model_table.py. Every cell is
``benchmarks.throughput.run_one`` (median over repeats; compiled cells report their compile time as
``first_iter_s``). Rows are written after each cell (a stopped run keeps what it measured); the load average before
and after each cell goes with it, since CPU machines are often shared.

    python -m benchmarks.cpu_inference --threads 2 --out benchmarks/results/cpu-2core
    python -m benchmarks.cpu_inference --threads 2 --sizes ti --families vim --batch-size 8 --no-compile
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
           ("compile", "compiled", ""), ("img_per_s", "img/s", ",.1f"), ("latency_ms", "ms/batch", ",.1f"),
           ("first_iter_s", "first call s", ".1f"), ("load", "load avg before/after", ""), ("status", "status", "")]


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def plan(families, sizes, tokenizers, tokens, batches, compiled, dart_families=("vim",)) -> list[dict]:
    cells = []
    for family in families:
        for size in sizes:
            for tokenizer in tokenizers:
                if tokenizer == "dart" and family not in dart_families:
                    continue
                for n in tokens:
                    name, kwargs = cell_model(family, size, tokenizer, n)
                    label = LABELS[(family, size)] + ("-DART" if tokenizer == "dart" else "")
                    for batch in batches:
                        for comp in compiled:
                            cells.append(dict(label=label, model=name, kwargs=kwargs, tokens=n, batch=batch,
                                              compile=comp))
    return cells


def run_table(cells: list[dict], warmup: int, repeats: int, on_row=None, log=print) -> list[dict]:
    from benchmarks.throughput import run_one

    rows = []
    for cell in cells:
        before = load_average()
        iters = 5 if cell["batch"] == 1 else 1
        row = run_one(cell["model"], cell["kwargs"], cell["batch"], "infer", "cpu", "none",
                      "default" if cell["compile"] else False, warmup, repeats, iters)
        row.update(label=cell["label"], tokens=cell["tokens"], compile="yes" if cell["compile"] else "no",
                   load=f"{before} / {load_average()}")
        rows.append(row)
        log(f"{row['label']:12s} {cell['tokens']:4d} tok batch {cell['batch']:3d} "
            f"{'compiled' if cell['compile'] else 'eager   '}: "
            + (f"{row['img_per_s']:,.1f} img/s" if row["status"] == "ok" else row["status"]))
        if on_row is not None:
            on_row(rows)
    return rows


def render(rows: list[dict], env: dict, threads: int) -> str:
    backends = env.get("backends", {})
    head = (f"### CPU inference on {env['host_cpu']} ({threads} threads; torch {env['torch']}; "
            f"{env.get('allocator', 'glibc defaults')})\n\n"
            f"Backends: " + ", ".join(f"{k}={v}" for k, v in backends.items()) + ". fp32, eager and "
            "torch.compile (inductor); 196 tokens: 224 px fixed grid / 448 px DART input; 784 tokens: 448 px.\n\n")
    return head + markdown_table(rows, COLUMNS) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["vim", "deit"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokenizers", nargs="+", default=["fixed", "dart"])
    parser.add_argument("--dart-families", nargs="+", default=["vim"], help="families that get DART rows")
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 784])
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
                 [False] if args.no_compile else [False, True], args.dart_families)
    out = Path(args.out) if args.out else None

    def save(rows):
        if out is None:
            return
        write_json(out / "cpu_inference.json", {"environment": env, "args": vars(args), "rows": rows})
        write_csv(out / "cpu_inference.csv", rows)
        atomic_write_text(out / "cpu_inference.md", render(rows, env, args.threads))

    rows = run_table(cells, args.warmup, args.repeats, on_row=save)
    save(rows)
    print()
    print(render(rows, env, args.threads))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
