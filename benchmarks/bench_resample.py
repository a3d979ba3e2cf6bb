"""Benchmark DART patch resampling: the official algorithm vs the torch gather path vs the Triton kernel.

Implementations, timed in one run on the same inputs:
  (a) reference  ``resample_reference``: literal official algorithm (per-band grid_sample loop + strip grid_sample)
  (b) torch      ``resample_torch``: vectorised gathers
  (c) triton     ``dartmamba_kernels.resample.resample_triton`` (atomic backward)
  (c') triton-det the same kernel with ``deterministic=True`` (fixed-point atomics in the backward)

Forward = patches only (no autograd graph). Forward+backward = patches, then gradients w.r.t. the band bounds and
token edges (what trains the DART scorer; the images are data) and, with ``--image-grad``, w.r.t. the images too.
Timing: CUDA events, warm-up, median of ``--repeats``. Forward bandwidth counts the honest minimum traffic: the
output written once plus the whole image read once (the bilinear taps re-read pixels, the caches absorb that),
against a device-to-device copy measured in the same run.

Targets (paper shapes on an H200): kernel forward >= 10x and forward+backward >= 5x faster than (a), and the
kernel forward at >= 60% of copy bandwidth. The markdown table is printed last.

Examples:
  python benchmarks/bench_resample.py                    # paper shapes: 448, p=16, G=14, N=196/392, B=256
  python benchmarks/bench_resample.py --tokens 196 --dtypes bf16 --image-grad
  python benchmarks/bench_resample.py --smoke            # tiny shapes; on CPU through TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if __package__ in (None, ""):      # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DTYPES, median_ms  # noqa: E402

TARGET_FWD, TARGET_FWD_BWD, TARGET_BW = 10.0, 5.0, 0.60


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--grid-size", type=int, default=14)
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 392])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--sampling", default="paper", choices=["paper", "center"])
    parser.add_argument("--skew", type=float, default=2.0,
                        help="scores = exp(skew * U(0,1)): 0 gives the uniform partition (default 2)")
    parser.add_argument("--image-grad", action="store_true", help="also differentiate w.r.t. the images")
    parser.add_argument("--impls", nargs="+", default=["reference", "torch", "triton", "triton-det"],
                        choices=["reference", "torch", "triton", "triton-det"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the device copy for the bandwidth")
    parser.add_argument("--embed-dim", type=int, default=384,
                        help="width D of the patch-embedding GEMM timed for the fusion bound (384: DeiT-S / Vim-S)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, 1 repeat; runs on CPU through the Triton interpreter (timings meaningless)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_resample: no CUDA device. This benchmark times GPU kernels; use --smoke for a tiny CPU run "
              "through the Triton interpreter (checks that the script works, timings meaningless).", file=sys.stderr)
        return 2
    if cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not args.smoke:
        print("bench_resample: TRITON_INTERPRET is set, the kernel would run in the interpreter; unset it.",
              file=sys.stderr)
        return 2
    if args.smoke:
        args.batch, args.img_size, args.patch_size, args.grid_size = 2, 64, 8, 4
        args.tokens, args.warmup, args.repeats, args.copy_mib = [16, 24], 1, 1, 16
        if not cuda:
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
    device = torch.device("cuda" if cuda else "cpu")

    from dartmamba.tokenizer import DartGeometry, partition, resample_reference, resample_torch
    from dartmamba_kernels.resample import resample_triton

    impls = {
        "reference": lambda im, geo, p, s: resample_reference(im, geo, p, s),
        "torch": lambda im, geo, p, s: resample_torch(im, geo, p, s),
        "triton": lambda im, geo, p, s: resample_triton(im, geo, p, s),
        "triton-det": lambda im, geo, p, s: resample_triton(im, geo, p, s, deterministic=True),
    }
    labels = {"reference": "(a) official (grid_sample loop)", "torch": "(b) torch gathers",
              "triton": "(c) triton kernel", "triton-det": "(c') triton, deterministic bwd"}

    def timed(fn) -> float:
        """Median milliseconds of fn() over the repeats, after warm-up."""
        return median_ms(fn, args.repeats, args.warmup, cuda)

    # device-to-device copy bandwidth (read + write)
    numel = args.copy_mib * 2**20 // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9
    del src, dst
    name = torch.cuda.get_device_name(device) if cuda else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; device copy {copy_gbs:,.0f} GB/s ({args.copy_mib} MiB)")

    gen = torch.Generator().manual_seed(args.seed)                      # small CPU tensors (scores)
    dev_gen = torch.Generator(device=device).manual_seed(args.seed)     # big tensors, made on the device
    size, p = args.img_size, args.patch_size
    rows, fusion = [], []
    for num_tokens in args.tokens:
        scores = torch.exp(args.skew * torch.rand(args.batch, args.grid_size, args.grid_size, generator=gen))
        geometry = partition(scores.to(device), num_tokens, img_size=size, validate=False)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            images = torch.randn(args.batch, 3, size, size, generator=dev_gen, device=device).to(dtype)
            bounds = geometry.band_bounds.detach().clone().requires_grad_()
            edges = geometry.token_edges.detach().clone().requires_grad_()
            geo_grad = DartGeometry(bounds, edges, geometry.grid_size, geometry.img_size)
            images_grad = images.detach().clone().requires_grad_(args.image_grad)
            wrt = (bounds, edges) + ((images_grad,) if args.image_grad else ())
            out_bytes = args.batch * num_tokens * 3 * p * p * images.element_size()
            fwd_bytes = out_bytes + images.numel() * images.element_size()

            # correctness sanity against the torch path (one forward)
            with torch.no_grad():
                err = (resample_triton(images, geometry, p, args.sampling).float()
                       - resample_torch(images, geometry, p, args.sampling).float()).abs().max().item()
            grad_out = torch.randn(args.batch, num_tokens, 3, p, p, generator=dev_gen, device=device).to(dtype)
            results = {}
            for impl in args.impls:
                fn = impls[impl]

                def forward(fn=fn):
                    with torch.no_grad():
                        fn(images, geometry, p, args.sampling)

                def forward_backward(fn=fn):
                    out = fn(images_grad, geo_grad, p, args.sampling)
                    torch.autograd.grad(out, wrt, grad_out)

                fwd_ms = timed(forward) if impl != "triton-det" else float("nan")  # same forward as "triton"
                results[impl] = (fwd_ms, timed(forward_backward))
            base_fwd, base_fb = results.get("reference", (float("nan"), float("nan")))
            for impl, (fwd_ms, fb_ms) in results.items():
                gbs = fwd_bytes / (fwd_ms * 1e-3) / 1e9
                row = dict(tokens=num_tokens, dtype=dtype_name, impl=impl, label=labels[impl], fwd_ms=fwd_ms,
                           fwd_bwd_ms=fb_ms, fwd_speedup=base_fwd / fwd_ms, fwd_bwd_speedup=base_fb / fb_ms,
                           fwd_gbs=gbs, fwd_bw_frac=gbs / copy_gbs, max_abs_err_vs_torch=err)
                rows.append(row)
                print(f"N={num_tokens} {dtype_name} {labels[impl]:32s} fwd {fwd_ms:8.3f} ms  fwd+bwd {fb_ms:8.3f} ms"
                      f"  fwd {gbs:8.1f} GB/s ({100 * gbs / copy_gbs:5.1f}% of copy)")
            if "triton" in results:
                fusion.append(fusion_bound(args, images, geometry, num_tokens, dtype_name, results["triton"][0],
                                           timed))
            del images, images_grad, grad_out

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=name, torch=torch.__version__, copy_gbs=copy_gbs, args=vars(args), rows=rows,
                           embed_fusion_bound=fusion), fh, indent=2)

    def fmt(x, spec):
        return "-" if x != x else format(x, spec)

    grads = "bounds, edges" + (", images" if args.image_grad else "")
    print()
    if args.smoke:
        print("(smoke run: tiny shapes, timings meaningless)")
    print(f"### DART resampling, {name}: B={args.batch}, {size}x{size}, p={p}, G={args.grid_size}, "
          f"{args.sampling} mode, skew {args.skew}; backward w.r.t. {grads}; device copy {copy_gbs:,.0f} GB/s")
    print()
    print("| N | dtype | implementation | fwd ms | fwd+bwd ms | fwd speedup vs (a) | fwd+bwd speedup vs (a) "
          "| fwd GB/s | % of copy BW | targets |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = ""
        if r["impl"] == "triton" and "reference" in args.impls and not args.smoke:
            ok = (r["fwd_speedup"] >= TARGET_FWD, r["fwd_bwd_speedup"] >= TARGET_FWD_BWD, r["fwd_bw_frac"] >= TARGET_BW)
            target = " ".join(f"{lbl}{'ok' if good else 'MISS'}" for lbl, good in
                              zip((f"fwd>={TARGET_FWD:g}x:", f"fwd+bwd>={TARGET_FWD_BWD:g}x:",
                                   f"BW>={TARGET_BW:.0%}:"), ok))
        print(f"| {r['tokens']} | {r['dtype']} | {r['label']} | {fmt(r['fwd_ms'], '.3f')} | {r['fwd_bwd_ms']:.3f} "
              f"| {fmt(r['fwd_speedup'], '.1f')} | {fmt(r['fwd_bwd_speedup'], '.1f')} | {fmt(r['fwd_gbs'], ',.0f')} "
              f"| {fmt(100 * r['fwd_bw_frac'], '.0f')} | {target} |")
    if fusion:
        print()
        print(f"**Fusing the patch embedding (D={args.embed_dim}) into the kernel: the most it can save** is the "
              "patches' round trip (written by the kernel, read by the GEMM), timed here as a copy of that tensor.")
        print()
        print("| N | dtype | resample fwd ms | embed GEMM ms | patches round trip ms | max saving, % of resample + GEMM |")
        print("|---|---|---|---|---|---|")
        for r in fusion:
            print(f"| {r['tokens']} | {r['dtype']} | {r['resample_ms']:.3f} | {r['gemm_ms']:.3f} "
                  f"| {r['round_trip_ms']:.3f} | {r['max_saving_pct']:.1f} |")
    return 0


def fusion_bound(args, images, geometry, num_tokens, dtype_name, resample_ms, timed) -> dict:
    """What fusing the patch-embedding GEMM into the resample kernel could save at most: the (B, N, C p^2)
    patches are then neither written nor read back, and nothing else changes (the gathers and the GEMM's FLOPs
    stay). That round trip is timed as a device copy of the patches tensor (one read + one write of it)."""
    from dartmamba_kernels.resample import resample_triton

    p = args.patch_size
    with torch.no_grad():
        patches = resample_triton(images, geometry, p, args.sampling).flatten(2)      # (B, N, C p^2)
        weight = torch.randn(args.embed_dim, patches.shape[-1], device=images.device, dtype=images.dtype) * 0.02
        bias = torch.zeros(args.embed_dim, device=images.device, dtype=images.dtype)
        copy = torch.empty_like(patches)
        gemm_ms = timed(lambda: torch.nn.functional.linear(patches, weight, bias))
        round_trip_ms = timed(lambda: copy.copy_(patches))
    return dict(tokens=num_tokens, dtype=dtype_name, embed_dim=args.embed_dim, resample_ms=resample_ms,
                gemm_ms=gemm_ms, round_trip_ms=round_trip_ms,
                max_saving_pct=100 * round_trip_ms / (resample_ms + gemm_ms))


if __name__ == "__main__":
    sys.exit(main())
