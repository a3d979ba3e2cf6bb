"""Benchmark every selective-scan backend that runs on CPU tensors against the autograd baselines, side by side.

Runs the Vim mixer's call (D, z gate, delta_bias, softplus) and prints a table of forward and forward+backward
times and the speedup of each backend over two baselines under plain autograd: the sequential reference
(``selective_scan_reference``, a lean per-step loop) and a "naive" materialise-and-index formulation (the one
docs' platform notes time). The backends are timed in interleaved rounds (every backend once
per round, best of ``--repeats`` rounds), so that other work on a shared machine slows them alike; the load average
before and after is printed with the table. Also prints the largest relative difference of the output and of every
gradient against the reference, and the time the C++ kernel took to build or load.

    python benchmarks/bench_scan_cpu.py --threads 2             # batch 8, dim 384, L 197, N 16, float32
    python benchmarks/bench_scan_cpu.py --length 1024 --batch 2 --threads 2 --groups 2
    python benchmarks/bench_scan_cpu.py --threads 2 --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import cpu_allocator, cpu_model_name  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch: int, dim: int, length: int, dstate: int, dtype: torch.dtype, seed: int,
                groups: int | None = None) -> list[torch.Tensor]:
    """Vim-like inputs: A = -(1..N), dt bias = softplus^-1 of dt in [1e-3, 1e-1]; ``groups``: B, C grouped."""
    g = torch.Generator().manual_seed(seed)
    bc = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    u = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    delta = 0.1 * torch.randn(batch, dim, length, generator=g, dtype=dtype)
    A = -torch.arange(1, dstate + 1, dtype=dtype).repeat(dim, 1)
    B = torch.randn(*bc, generator=g, dtype=dtype)
    C = torch.randn(*bc, generator=g, dtype=dtype)
    D = torch.ones(dim, dtype=dtype)
    z = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    dt = torch.exp(torch.rand(dim, generator=g, dtype=dtype) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    return [u, delta, A, B, C, D, z, delta_bias]


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The textbook formulation of the platform notes' baseline: materialise exp(delta*A) and
    delta*B*u as (batch, dim, L, N), then index one time step per loop iteration (whose backward scatters into a
    full-size zero tensor every step). Same result as the reference; benchmark baseline only; ungrouped B, C."""
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(delta[..., None] * A[None, :, None, :])                  # (batch, dim, L, N)
    drive = (delta * u)[..., None] * B.transpose(1, 2)[:, None]                # (batch, dim, L, N)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def run(fn, inputs, grad_out, backward: bool):
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    out = fn(*leaves, delta_softplus=True)
    if backward:
        out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves] if backward else None


def timed(fn, inputs, grad_out, backward: bool) -> float:
    start = time.perf_counter()
    run(fn, inputs, grad_out, backward)
    return time.perf_counter() - start


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def cpu_backends(skip_reference: bool = False) -> dict:
    """name -> callable for every registered scan backend that can run on CPU tensors here (the C++ kernel is
    built or loaded here: its time is returned under ``"_cpp_load_s"``)."""
    from dartmamba import backends
    from dartmamba.ops import scan  # noqa: F401  (registers the scan backends)

    found, load_s = {}, None
    for impl in backends.implementations("scan"):
        if "cpu" not in impl.devices or (skip_reference and impl.name == "reference"):
            continue
        start = time.perf_counter()
        reason = impl.available()
        if impl.name == "cpp":
            load_s = time.perf_counter() - start
        if reason is None:
            found[impl.name] = impl.fn
        else:
            print(f"  (scan backend {impl.name!r} skipped: {reason})")
    return {**found, "_cpp_load_s": load_s}


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384, help="channels (Vim-S d_inner is 768, its width 384)")
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--groups", type=int, default=None, help="B, C as (batch, G, N, L) (the one-pass mixer: 2)")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-reference", action="store_true", help="time the fast scans only")
    parser.add_argument("--skip-naive", action="store_true",
                        help="skip the materialise-and-index baseline (the slowest by far)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc malloc's default thresholds (by default they are raised, as dartmamba's CPU "
                             "entry points do: dartmamba.runtime.tune_cpu_allocator)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = cpu_allocator(default=args.default_allocator)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.batch, args.dim, args.length, args.dstate, dtype, args.seed, args.groups)
    grad_out = torch.randn(args.batch, args.dim, args.length, dtype=dtype,
                           generator=torch.Generator().manual_seed(args.seed + 1))
    shape = (f"batch={args.batch} dim={args.dim} L={args.length} N={args.dstate}"
             f"{f' groups={args.groups}' if args.groups else ''} {args.dtype}")
    machine = f"{cpu_model_name()}, {os.cpu_count()} cores"
    header_line = (f"selective scan on CPU: {shape}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"{machine}")
    print(header_line)

    found = cpu_backends(args.skip_reference)
    load_s = found.pop("_cpp_load_s")
    fns = {}
    if "reference" in found:
        fns["reference"] = found.pop("reference")
    if not args.skip_naive and args.groups is None:
        fns["naive"] = naive_scan
    labels = {"torch": "torch (chunked)", "cpp": "cpp (C++)"}
    fns.update({labels.get(k, k): v for k, v in found.items()})
    for fn in fns.values():                                  # warm-up (allocator, first-call overheads)
        run(fn, inputs, grad_out, False)
        run(fn, inputs, grad_out, True)
    load_before = load_average()
    times = {name: {"fwd": [], "fwd_bwd": []} for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name]["fwd"].append(timed(fn, inputs, grad_out, False))
            times[name]["fwd_bwd"].append(timed(fn, inputs, grad_out, True))
    load_after = load_average()
    rows = {name: {"fwd_s": min(t["fwd"]), "fwd_bwd_s": min(t["fwd_bwd"]),
                   "fwd_median_s": statistics.median(t["fwd"]), "fwd_bwd_median_s": statistics.median(t["fwd_bwd"])}
            for name, t in times.items()}

    baselines = [b for b in ("reference", "naive") if b in rows]
    tag = " / ".join(baselines)
    lines = []
    header = f"| {'backend':<15} | {'fwd (ms)':>9} | {'fwd+bwd (ms)':>12} |"
    if baselines:
        header += f" {'fwd speedup vs ' + tag:<30} | {'fwd+bwd speedup vs ' + tag:<34} |"
    lines += [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for name, row in rows.items():
        line = f"| {name:<15} | {row['fwd_s'] * 1e3:>9.2f} | {row['fwd_bwd_s'] * 1e3:>12.2f} |"
        fwd, both = [], []
        for b in baselines:
            sf, sb = rows[b]["fwd_s"] / row["fwd_s"], rows[b]["fwd_bwd_s"] / row["fwd_bwd_s"]
            row[f"fwd_speedup_vs_{b}"], row[f"fwd_bwd_speedup_vs_{b}"] = sf, sb
            fwd.append(f"{sf:.1f}x")
            both.append(f"{sb:.1f}x")
        if baselines:
            line += f" {' / '.join(fwd):<30} | {' / '.join(both):<34} |"
        lines.append(line)
    notes = [f"best of {args.repeats} interleaved rounds; load average (1/5/15 min) {load_before} before, "
             f"{load_after} after", f"allocator: {allocator}"]
    if load_s is not None:
        notes.append(f"C++ kernel built or loaded in {load_s:.1f} s")
    result = {"shape": shape, "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine,
              "load_average_before": load_before, "load_average_after": load_after, "repeats": args.repeats,
              "cpp_load_s": load_s, "rows": rows}
    if "reference" in rows:
        errors = {}
        out_r, grads_r = run(fns["reference"], inputs, grad_out, True)
        for name, fn in fns.items():
            if name in ("reference", "naive"):
                continue
            out_f, grads_f = run(fn, inputs, grad_out, True)
            errs = {"out": rel_err(out_f.float(), out_r.float())}
            errs.update({n: rel_err(a.float(), b.float()) for n, a, b in zip(NAMES, grads_f, grads_r)})
            errors[name] = errs
            notes.append(f"{name}: max relative difference vs reference: "
                         + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        result["max_rel_error_vs_reference"] = errors
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"### {header_line}\n\n{text}")
    return result


if __name__ == "__main__":
    main()
