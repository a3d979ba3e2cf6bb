"""Benchmark the selective-scan backends on CPU: the autograd baselines vs the chunked scan.

Runs the Vim mixer's call (D, z gate, delta_bias, softplus) and prints a table of forward and forward+backward
times (best of --repeats) and the speedup of the chunked scan over two baselines under plain autograd: the
sequential reference (``selective_scan_reference``, a lean per-step loop) and a "naive" materialise-and-index
formulation (the one behind the 7.9 s figure in docs' platform notes). Also prints the largest relative difference
of the output and of every gradient against the reference.

    python benchmarks/bench_scan_cpu.py                       # batch 8, dim 384, L 197, N 16, float32
    python benchmarks/bench_scan_cpu.py --length 1024 --batch 2 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from dartmamba.ops.scan import selective_scan_cpu, selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch: int, dim: int, length: int, dstate: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Vim-like inputs: A = -(1..N), dt bias = softplus^-1 of dt in [1e-3, 1e-1]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    delta = 0.1 * torch.randn(batch, dim, length, generator=g, dtype=dtype)
    A = -torch.arange(1, dstate + 1, dtype=dtype).repeat(dim, 1)
    B = torch.randn(batch, dstate, length, generator=g, dtype=dtype)
    C = torch.randn(batch, dstate, length, generator=g, dtype=dtype)
    D = torch.ones(dim, dtype=dtype)
    z = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    dt = torch.exp(torch.rand(dim, generator=g, dtype=dtype) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    return [u, delta, A, B, C, D, z, delta_bias]


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The textbook formulation behind the platform notes' 7.9 s baseline: materialise exp(delta*A) and
    delta*B*u as (batch, dim, L, N), then index one time step per loop iteration (whose backward scatters into a
    full-size zero tensor every step). Same result as the reference; benchmark baseline only."""
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


def best_time(fn, inputs, grad_out, backward: bool, repeats: int) -> float:
    run(fn, inputs, grad_out, backward)  # warm-up (allocator, first-call overheads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(fn, inputs, grad_out, backward)
        times.append(time.perf_counter() - start)
    return min(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384, help="channels (Vim-S d_inner is 768, its width 384)")
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast scan (best is reported)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="timed runs of the slow reference")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-reference", action="store_true", help="time the fast scan only")
    parser.add_argument("--skip-naive", action="store_true",
                        help="skip the materialise-and-index baseline (about 8 s per forward+backward at the defaults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.batch, args.dim, args.length, args.dstate, dtype, args.seed)
    grad_out = torch.randn(args.batch, args.dim, args.length, dtype=dtype,
                           generator=torch.Generator().manual_seed(args.seed + 1))
    shape = f"batch={args.batch} dim={args.dim} L={args.length} N={args.dstate} {args.dtype}"
    print(f"selective scan on CPU: {shape}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")

    backends = {}
    if not args.skip_reference:
        backends["reference"] = (selective_scan_reference, args.reference_repeats)
    if not args.skip_naive:
        backends["naive"] = (naive_scan, args.reference_repeats)
    backends["cpu (chunked)"] = (selective_scan_cpu, args.repeats)
    rows = {}
    for name, (fn, repeats) in backends.items():
        rows[name] = {"fwd_s": best_time(fn, inputs, grad_out, False, repeats),
                      "fwd_bwd_s": best_time(fn, inputs, grad_out, True, repeats)}

    baselines = [b for b in ("reference", "naive") if b in rows]
    tag = " / ".join(baselines)
    header = f"{'backend':<15}{'fwd (ms)':>10}{'fwd+bwd (ms)':>14}"
    if baselines:
        header += f"   {'fwd speedup vs ' + tag:<36}{'fwd+bwd speedup vs ' + tag:<36}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        line = f"{name:<15}{row['fwd_s'] * 1e3:>10.1f}{row['fwd_bwd_s'] * 1e3:>14.1f}"
        fwd, both = [], []
        for b in baselines:
            sf, sb = rows[b]["fwd_s"] / row["fwd_s"], rows[b]["fwd_bwd_s"] / row["fwd_bwd_s"]
            row[f"fwd_speedup_vs_{b}"], row[f"fwd_bwd_speedup_vs_{b}"] = sf, sb
            fwd.append(f"{sf:.1f}x")
            both.append(f"{sb:.1f}x")
        if baselines:
            line += f"   {' / '.join(fwd):<36}{' / '.join(both):<36}"
        print(line)

    result = {"shape": shape, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if "reference" in rows:
        out_r, grads_r = run(selective_scan_reference, inputs, grad_out, True)
        out_f, grads_f = run(selective_scan_cpu, inputs, grad_out, True)
        errors = {"out": rel_err(out_f.float(), out_r.float())}
        errors.update({n: rel_err(a.float(), b.float()) for n, a, b in zip(NAMES, grads_f, grads_r)})
        result["max_rel_error_vs_reference"] = errors
        print("max relative difference vs reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
