"""The Vim issue's throughput table: fixed-grid Vim-S and Vim-S-DART next to timm DeiT-S, in one run.

Rows: DeiT-S, Vim-S (fixed grid) and Vim-S-DART (448 input) at 196 tokens ("224") and 784 tokens ("448"; fixed
grids through a 448 image, DART through ``num_tokens=784``); inference and training img/s, ms/batch and peak
memory; bf16 autocast by default. Vim-S at 196 tokens runs twice, with the one-pass bidirectional mixer
(``bimamba_impl="fused"``) and the two-pass one (``"two_pass"``), side by side; the other Vim rows use the default
(``"auto"``: one-pass on CUDA). A batch that does not fit is halved until it does (the batch used is printed).
``--compile`` adds torch.compile'd rows for Vim-S and Vim-S-DART at 196 tokens. The target (H200, bf16, batch
256, 224): fixed-grid Vim-S >= 4,500 img/s inference and >= 1,300 img/s training; other cards are compared against
it as they are, with the card named.

Examples:
  python -m benchmarks.model_table                        # batch 256, bf16, eager
  python -m benchmarks.model_table --compile --out benchmarks/results/<card>/
  python -m benchmarks.model_table --quick                # fewer repeats, batch 128
  python -m benchmarks.model_table --device cpu --batch-size 2 --tiny    # CPU smoke run of the script itself
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import timing_trunk_weights  # noqa: E402
from benchmarks.common import (environment, markdown_table, resolve_device, slug, write_csv,  # noqa: E402
                               write_json, atomic_write_text)

TARGETS = {("vim_small_patch16_224", 196, "infer"): 4500.0, ("vim_small_patch16_224", 196, "train"): 1300.0}
TARGET_NOTE = "target (H200, bf16, batch 256, 224): Vim-S >= 4,500 img/s inference, >= 1,300 img/s training"

# (label, model, kwargs, tokens)
ROWS = [
    ("DeiT-S", "deit_small_patch16_224", {}, 196),
    ("Vim-S one-pass", "vim_small_patch16_224", {"bimamba_impl": "fused"}, 196),
    ("Vim-S two-pass", "vim_small_patch16_224", {"bimamba_impl": "two_pass"}, 196),
    ("Vim-S-DART", "vim_small_dart", {"num_tokens": 196}, 196),
    ("DeiT-S", "deit_small_patch16_224", {"img_size": 448}, 784),
    ("Vim-S", "vim_small_patch16_224", {"img_size": 448}, 784),
    ("Vim-S-DART", "vim_small_dart", {"num_tokens": 784}, 784),
]
COMPILE_ROWS = [("Vim-S", "vim_small_patch16_224", {}, 196), ("Vim-S-DART", "vim_small_dart", {"num_tokens": 196}, 196)]
TINY = {"depth": 2, "embed_dim": 64}     # --tiny: a smoke run of the script on CPU (the DeiT needs heads | dim)


def run_table(device="auto", batch_size: int = 256, amp: str = "bf16", modes=("infer", "train"),
              compile_rows: bool = False, warmup: int = 3, repeats: int = 5, iters: int = 5, min_batch: int = 8,
              tiny: bool = False, time_budget: float | None = None, on_row=None, log=print) -> list[dict]:
    """Measure every row (OOM: halve the batch down to ``min_batch``); returns result rows with ``label``,
    ``vs_deit`` (img/s relative to DeiT-S at the same token count and mode) and ``target``.

    ``time_budget`` (seconds): rows not started in time are listed with status "skipped (time budget)".
    ``on_row(rows)``: called after every row with the rows so far (to save partial results)."""
    import time

    from benchmarks.throughput import run_one

    device = resolve_device(device) if isinstance(device, str) else device
    plan = [(label, name, kwargs, tokens, False) for label, name, kwargs, tokens in ROWS]
    if compile_rows:
        plan += [(label, name, kwargs, tokens, True) for label, name, kwargs, tokens in COMPILE_ROWS]
    results = []
    start = time.perf_counter()
    for label, name, kwargs, tokens, compiled in plan:
        kwargs = dict(kwargs)
        if tiny:
            kwargs.update(TINY)
            if "deit" in name:
                kwargs["num_heads"] = 2
        for mode in modes:
            if time_budget is not None and time.perf_counter() - start > time_budget:
                results.append({"label": label + (" (compiled)" if compiled else ""), "model": name,
                                "tokens": tokens, "mode": mode, "batch": batch_size,
                                "status": "skipped (time budget)"})
                continue
            batch = batch_size
            while True:
                row = run_one(name, kwargs, batch, mode, device, amp, "default" if compiled else False, warmup,
                              repeats, iters)
                if row["status"] != "oom" or batch // 2 < min_batch:
                    break
                log(f"  {label} {tokens} {mode}: OOM at batch {batch}, retrying with {batch // 2}")
                batch //= 2
            row.update(label=label + (" (compiled)" if compiled else ""), tokens=row.get("tokens") or tokens)
            results.append(row)
            log(f"{row['label']:22s} {tokens:5d} tok {mode:5s} batch {batch:4d}: "
                + (f"{row['img_per_s']:,.1f} img/s" if row["status"] == "ok" else row["status"]))
            _compare(results, tiny)
            if on_row is not None:
                on_row(results)
    return results


def _compare(results: list[dict], tiny: bool) -> None:
    """Fill ``vs_deit`` and ``target`` in place."""
    base = {(r["tokens"], r["mode"]): r["img_per_s"] for r in results
            if r["label"] == "DeiT-S" and r["status"] == "ok"}
    for r in results:
        ref = base.get((r["tokens"], r["mode"]))
        r["vs_deit"] = r["img_per_s"] / ref if ref and r["status"] == "ok" else None
        goal = TARGETS.get((r["model"], r["tokens"], r["mode"])) if not tiny else None
        if goal is not None and r["status"] == "ok":
            r["target"] = f">= {goal:,.0f}: {'ok' if r['img_per_s'] >= goal else 'MISS'}"


COLUMNS = [("label", "model", ""), ("tokens", "tokens", "d"), ("input", "input", ""), ("mode", "mode", ""),
           ("batch", "batch", "d"), ("img_per_s", "img/s", ",.0f"), ("latency_ms", "ms/batch", ",.1f"),
           ("peak_mem_mib", "peak MiB", ",.0f"), ("vs_deit", "vs DeiT-S", ".2f"), ("target", "target", ""),
           ("status", "status", "")]


def render(results: list[dict], env: dict, amp: str) -> str:
    backends = env.get("backends", {})
    lines = [f"### Vim-S / Vim-S-DART vs DeiT-S on {env['device']} ({amp} autocast; torch {env['torch']})", "",
             "Backends: " + ", ".join(f"{k}={v}" for k, v in backends.items()) + f". {TARGET_NOTE}.", "",
             markdown_table(results, COLUMNS)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd Vim-S / Vim-S-DART rows")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="batch 128, 3 repeats x 3 iterations")
    parser.add_argument("--tiny", action="store_true", help="2-layer, width-64 models (a CPU smoke run)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; rows not started by then are listed as skipped")
    parser.add_argument("--out", default=None, help="directory for model_table.{md,json,csv} "
                                                    "(default benchmarks/results/<card>/)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    timing_trunk_weights()
    if args.quick:
        args.batch_size, args.repeats, args.iters, args.warmup = min(args.batch_size, 128), 3, 3, 2
    device = resolve_device(args.device)
    env = environment(device)
    print(f"device: {env['device']}; torch {env['torch']}; backends {env.get('backends')}", flush=True)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / slug(env["device"])

    def save(rows):                       # after every row: a run stopped by a time limit keeps what it measured
        write_json(out / "model_table.json", {"environment": env, "args": vars(args), "rows": rows})
        write_csv(out / "model_table.csv", rows)
        atomic_write_text(out / "model_table.md", render(rows, env, args.amp))

    results = run_table(device, args.batch_size, args.amp, args.modes, args.compile, args.warmup, args.repeats,
                        args.iters, tiny=args.tiny, time_budget=args.time_budget, on_row=save)
    save(results)
    text = render(results, env, args.amp)
    print()
    print(text)
    return 0 if all(r["status"] in ("ok", "skipped (time budget)") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
