"""onnxruntime (CPU provider) against PyTorch eager on the CPU, img/s: Vim-Ti, Vim-Ti-DART and DeiT-Ti-DART.

Every model is built (random weights; DART: a randomly initialised scorer trunk, 448 input, ``num_tokens``), exported
with :func:`dartmamba.export.export_onnx` (dynamic batch) and checked against eager with
:func:`dartmamba.export.check_parity`; then both runners are warmed up and timed in the same process, interleaved:
each round times one batch of every (model, runner) cell, the order rotated from round to round, so load that comes
and goes on a shared machine falls on all of them alike. Eager runs in ``torch.inference_mode`` with dartmamba's
default backends (the C++ CPU kernels where they build); onnxruntime with ``intra_op_num_threads = --threads``, torch
with ``torch.set_num_threads(--threads)``. Printed: a markdown table (median img/s over rounds, onnxruntime / eager,
export seconds, file size, node count, parity), the CPU model and the thread count. Like the other CPU
benchmarks it raises glibc malloc's thresholds first (``--default-allocator`` keeps the defaults).

    python -m benchmarks.onnx_speed --threads 2 --batch-size 1 --rounds 10
    python -m benchmarks.onnx_speed --models vim_tiny_patch16_224 --depth 2 --scan-forms scan unrolled
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import cpu_allocator, cpu_model_name, markdown_table, timing_trunk_weights  # noqa: E402

MODELS = {"vim_tiny_patch16_224": ("Vim-Ti", {}),
          "vim_tiny_dart": ("Vim-Ti-DART", {"img_size": 448}),
          "deit_tiny_dart": ("DeiT-Ti-DART", {"img_size": 448})}
COLUMNS = [("label", "model", ""), ("scan", "ONNX scan", ""), ("input", "input", ""), ("eager", "eager img/s", ",.2f"),
           ("ort", "onnxruntime img/s", ",.2f"), ("ratio", "ort / eager", ".2f"), ("export_s", "export s", ".0f"),
           ("mib", "file MiB", ".1f"), ("nodes", "nodes", "d"), ("max_rel", "parity max rel", ".1e"),
           ("status", "status", "")]


def build(name: str, num_tokens: int, depth: int | None):
    import timm

    import dartmamba.models  # noqa: F401

    label, kwargs = MODELS.get(name, (name, {}))
    kwargs = dict(kwargs)
    if "dart" in name:
        kwargs["num_tokens"] = num_tokens
    if depth is not None:
        kwargs["depth"] = depth
    return label, timm.create_model(name, **kwargs).eval()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each times one batch of every cell)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-tokens", type=int, default=196, help="DART token count (448 input)")
    parser.add_argument("--depth", type=int, default=None, help="override the depth (e.g. for the unrolled scan)")
    parser.add_argument("--scan-forms", nargs="+", default=["scan"], choices=["scan", "unrolled"])
    parser.add_argument("--default-allocator", action="store_true", help="keep glibc malloc's defaults")
    parser.add_argument("--keep", default=None, help="folder to keep the .onnx files in (default: a temp folder)")
    args = parser.parse_args(argv)
    for flag in ("threads", "batch_size", "rounds", "num_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    timing_trunk_weights()
    allocator = cpu_allocator(default=args.default_allocator)
    from dartmamba.export import check_parity, example_input, export_onnx, session

    torch.set_num_threads(args.threads)
    folder = args.keep or tempfile.mkdtemp(prefix="onnx_speed_")
    os.makedirs(folder, exist_ok=True)
    rows, cells = [], []
    for name in args.models:
        label, model = build(name, args.num_tokens, args.depth)
        images = example_input(model, args.batch_size, seed=3)
        eager_cell = {"run": lambda m=model, x=images: m(x), "times": []}
        cells.append(eager_cell)
        for form in args.scan_forms:
            if form != "scan" and not name.startswith(("vim", "videomamba")):
                continue
            row = {"label": label, "scan": form, "input": "x".join(map(str, images.shape[1:])), "eager_cell": eager_cell}
            rows.append(row)
            path = os.path.join(folder, f"{name}-{form}.onnx")
            try:
                report = export_onnx(model, path, batch_size=args.batch_size + 1, scan=form, name=name)
                parity = check_parity(path, model, batch_size=args.batch_size, example=images)
                runner = session(path, threads=args.threads)
                feed = {runner.get_inputs()[0].name: images.numpy()}
                row.update(export_s=report.seconds, mib=report.file_bytes / 2**20, nodes=report.num_nodes,
                           max_rel=parity.max_rel, ort_cell={"run": lambda r=runner, f=feed: r.run(None, f),
                                                             "times": []})
            except Exception as exc:  # noqa: BLE001  (the row says what failed; the others still run)
                row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                continue
            cells.append(row["ort_cell"])
    for cell in cells:
        for _ in range(args.warmup):
            with torch.inference_mode():
                cell["run"]()
    for round_ in range(args.rounds):
        for k in range(len(cells)):
            cell = cells[(k + round_) % len(cells)]
            with torch.inference_mode():
                start = time.perf_counter()
                cell["run"]()
                cell["times"].append(time.perf_counter() - start)
    for row in rows:
        eager = row.pop("eager_cell")
        ort = row.pop("ort_cell", None)
        row["eager"] = args.batch_size / statistics.median(eager["times"])
        if ort is not None:
            row["ort"] = args.batch_size / statistics.median(ort["times"])
            row["ratio"] = row["ort"] / row["eager"]
            row.setdefault("status", "ok")
    print(f"CPU: {cpu_model_name()}; threads: torch {args.threads}, onnxruntime intra-op {args.threads}; batch "
          f"{args.batch_size}; median of {args.rounds} interleaved rounds; torch {torch.__version__}, onnxruntime "
          f"{__import__('onnxruntime').__version__}; allocator: {allocator}; load average {os.getloadavg()[0]:.2f}")
    print(markdown_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
