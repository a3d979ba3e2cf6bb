"""dartmamba's Triton scan and conv against mamba-ssm's / causal-conv1d's CUDA kernels, and a whole Vim-S training
step each way (the GPU check's Triton rows; benchmarks/gpu_check.sh runs it).

    python benchmarks/bench_triton_ops.py [--batch 256 --length 197 --d-inner 768 --dstate 16 --dtype bf16]
                                          [--repeats 20] [--json PATH] [--markdown PATH] [--no-model]
    TRITON_INTERPRET=1 python benchmarks/bench_triton_ops.py --smoke     # the flow on a CPU (tiny; "torch" as baseline)

Rows: the scan at Vim-S's one-pass call shape (both directions in one call: 2 * d_inner channels, B/C grouped by
direction), forward and forward+backward; the same for the causal conv (width 4, SiLU); the Vim-S training step
(forward + backward, bf16 autocast) with the scan and the conv forced to each backend. The target: Triton's
forward+backward at >= 0.8x the CUDA kernel's speed. Each op row also prints what bounds it: the least HBM traffic
of the call (inputs read once, outputs written once) at the card's measured copy bandwidth, and the kernel's share
of that bandwidth. Without a CUDA device (and without --smoke) it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, median_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET = 0.8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--d-inner", type=int, default=768, help="channels per direction")
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-model", action="store_true", help="skip the whole Vim-S training step")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def bound_row(row: dict, nbytes: int, copy_gbps: float | None) -> dict:
    """Adds the memory bound of a row: the least traffic ``nbytes`` at the measured copy bandwidth, and the share of
    that bandwidth each backend reaches (a share near 1: bandwidth-bound; far below: latency or compute)."""
    row["min_traffic_mb"] = nbytes / 1e6
    if copy_gbps:
        row["bound_ms"] = nbytes / (copy_gbps * 1e9) * 1e3
        for key in ("baseline", "triton"):
            ms = row.get(f"{key}_ms")
            if ms:
                row[f"{key}_bw_share"] = row["bound_ms"] / ms
    return row


def verdict(row: dict) -> str:
    share = row.get("triton_bw_share")
    if share is None:
        return "-"
    if share >= 0.6:
        return f"memory-bound ({share:.0%} of copy bandwidth)"
    return f"not memory-bound: {share:.0%} of copy bandwidth (latency / exp throughput / occupancy)"


def copy_bandwidth(device: torch.device) -> float | None:
    """GB/s of a 1 GiB device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats=10, warmup=2, cuda=True)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def scan_inputs(batch, dim, length, dstate, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(device, dt).requires_grad_(grad)

    u, z = r(batch, dim, length), r(batch, dim, length)
    delta = r(batch, dim, length, scale=0.5)
    A = (-torch.exp(torch.randn(dim, dstate, generator=g))).to(device).requires_grad_(grad)
    B, C = r(batch, 2, dstate, length), r(batch, 2, dstate, length)
    D, bias = r(dim, dt=torch.float32), r(dim, scale=0.3, dt=torch.float32)
    return u, delta, A, B, C, D, z, bias


def op_rows(args, device, dtype, baseline: str, offers) -> list[dict]:
    from dartmamba import backends
    from dartmamba.ops import causal_conv1d, selective_scan

    batch, length, dim, dstate = args.batch, args.length, 2 * args.d_inner, args.dstate
    cuda = device.type == "cuda"
    item = torch.tensor([], dtype=dtype).element_size()
    copy_gbps = copy_bandwidth(device)
    rows = []
    seq = batch * dim * length
    # least traffic: scan fwd reads u, delta, z, B, C, writes out; fwd+bwd also reads them again with dout and
    # writes du, ddelta, dz, dB, dC (B, C gradients float32 before the cast)
    bc = 2 * batch * 2 * dstate * length
    traffic = {("scan", "fwd"): (4 * seq + bc) * item,
               ("scan", "fwd+bwd"): (4 * seq + bc) * item + (4 * seq + bc) * item + 3 * seq * item + bc * 4,
               ("conv1d", "fwd"): 2 * seq * item, ("conv1d", "fwd+bwd"): 2 * seq * item + 3 * seq * item}
    for op in ("scan", "conv1d"):
        for mode in ("fwd", "fwd+bwd"):
            row = {"op": op, "mode": mode, "shape": f"B{batch} D{dim} L{length}" + (f" N{dstate} G2" if op == "scan"
                                                                                       else " K4")}
            for key, name in (("baseline", baseline), ("triton", "triton")):
                grad = mode == "fwd+bwd"
                if op == "scan":
                    inputs = scan_inputs(batch, dim, length, dstate, dtype, device, grad)

                    def call(inputs=inputs, name=name):
                        return selective_scan(*inputs, delta_softplus=True, backend=name)
                else:
                    x = torch.randn(batch, dim, length, device=device, dtype=dtype).requires_grad_(grad)
                    w = torch.randn(dim, 4, device=device, dtype=dtype).requires_grad_(grad)
                    b = torch.randn(dim, device=device, dtype=dtype).requires_grad_(grad)

                    def call(x=x, w=w, b=b, name=name):
                        return causal_conv1d(x, w, b, backend=name)

                def run(call=call, grad=grad):
                    if grad:
                        out = call()
                        out.backward(torch.ones_like(out))
                    else:
                        with torch.no_grad():
                            call()

                try:
                    with offers():
                        backends.resolve(op, device, backend=name, check_inputs=False)
                        row[f"{key}_ms"] = median_ms(run, args.repeats, args.warmup, cuda=cuda)
                except backends.BackendUnavailableError as exc:
                    row[f"{key}_note"] = str(exc)
            row["baseline"] = baseline
            if row.get("baseline_ms") and row.get("triton_ms"):
                row["speed_vs_baseline"] = row["baseline_ms"] / row["triton_ms"]
            rows.append(bound_row(row, traffic[(op, mode)], copy_gbps))
    return rows


def model_rows(args, device, dtype, baseline: str, offers) -> list[dict]:
    import timm
    import torch.nn.functional as F

    import dartmamba.models  # noqa: F401
    from dartmamba import backends

    cuda = device.type == "cuda"
    if args.smoke:
        model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=8, depth=1,
                                  d_state=4, num_classes=3)
        size, batch = 32, 2
    else:
        model = timm.create_model("vim_small_patch16_224", num_classes=1000)
        size, batch = 224, args.batch
    model = model.to(device)
    row = {"op": "Vim-S train step" if not args.smoke else "tiny Vim train step", "mode": "fwd+bwd",
           "shape": f"B{batch} {size}px", "baseline": baseline}
    for key, name in (("baseline", baseline), ("triton", "triton")):
        while batch >= 1:
            images = torch.randn(batch, 3, size, size, device=device)
            labels = torch.randint(0, 3 if args.smoke else 1000, (batch,), device=device)

            def step():
                model.zero_grad(set_to_none=True)
                autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else \
                    contextlib.nullcontext()
                with autocast:
                    loss = F.cross_entropy(model(images).float(), labels)
                loss.backward()

            try:
                with offers(), backends.use_backend("scan", name), backends.use_backend("conv1d", name):
                    row[f"{key}_ms"] = median_ms(step, max(3, args.repeats // 4), args.warmup, cuda=cuda)
                break
            except torch.cuda.OutOfMemoryError:
                batch //= 2
                row["shape"] = f"B{batch} {size}px (halved on OOM)"
                torch.cuda.empty_cache()
            except backends.BackendUnavailableError as exc:
                row[f"{key}_note"] = str(exc)
                break
    if row.get("baseline_ms") and row.get("triton_ms"):
        row["speed_vs_baseline"] = row["baseline_ms"] / row["triton_ms"]
        row["img_per_s_triton"] = batch / row["triton_ms"] * 1e3
    return [row]


COLUMNS = [("op", "op", ""), ("mode", "mode", ""), ("shape", "shape", ""), ("baseline", "baseline", ""),
           ("baseline_ms", "baseline ms", ",.3f"), ("triton_ms", "Triton ms", ",.3f"),
           ("speed_vs_baseline", "Triton speed vs baseline", ".2f"), ("target", "target", ""),
           ("bound_ms", "HBM bound ms", ",.3f"), ("bound", "what bounds Triton", "")]


def main(argv=None) -> int:
    args = parse_args(argv)
    from dartmamba import backends
    from dartmamba.ops.scan import triton as scan_triton

    if torch.cuda.is_available() and not args.smoke:
        device, baseline = torch.device("cuda"), "cuda"

        def offers():
            return contextlib.nullcontext()
    elif args.smoke and os.environ.get("TRITON_INTERPRET") == "1" and scan_triton.interpreted():
        device, baseline = torch.device("cpu"), "torch"
        args.batch, args.length, args.d_inner, args.dstate, args.repeats, args.warmup = 2, 20, 8, 4, 1, 0

        @contextlib.contextmanager
        def offers():
            with backends.allow_device("scan", "triton", "cpu"), backends.allow_device("conv1d", "triton", "cpu"):
                yield
    else:
        print("bench_triton_ops: no CUDA device: skipped (run it on the GPU machine, or --smoke with "
              "TRITON_INTERPRET=1 for the flow on a CPU)")
        return 0
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    rows = op_rows(args, device, dtype, baseline, offers)
    if not args.no_model:
        rows += model_rows(args, device, dtype, baseline, offers)
    for row in rows:
        ratio = row.get("speed_vs_baseline")
        if row["mode"] == "fwd+bwd" and ratio is not None:
            row["target"] = f">= {TARGET}x: {'ok' if ratio >= TARGET else 'MISS'}"
        row["bound"] = verdict(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter smoke run)"
    text = (f"### Triton vs {'mamba-ssm / causal-conv1d' if baseline == 'cuda' else baseline} on {name}, "
            f"{args.dtype if device.type == 'cuda' else 'fp32'}\n\n" + markdown_table(rows, COLUMNS))
    notes = [f"{r['op']} {r['mode']}: {r[k]}" for r in rows for k in ("baseline_note", "triton_note") if k in r]
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
