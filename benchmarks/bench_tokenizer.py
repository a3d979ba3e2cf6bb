"""Benchmark the whole DART tokenizer and the models around it, in one run on a GPU.

Prints, for inference at bf16 autocast (default batch 256, 448 input, N = 196):

  1. parts     each tokenizer part of the DeiT-S-DART tokenizer: scorer (trunk + head), geometry (torch vs the fused
               Triton partition), resampling (official-style grid_sample loop vs torch gathers vs Triton), patch
               embedding, positional embeddings (torch vs Triton);
  2. tokenizer the whole tokenizer: eager with the torch paths, eager with the fused kernels, torch.compile-d, and
               replayed from one CUDA graph (eager and compiled forward);
  3. models    steps and img/s of DeiT-S-DART (eager, tokenizer captured, whole model captured, compiled), timm
               DeiT-S and DeiT-B at 224 (eager, captured, compiled), Vim-S-DART (needs mamba-ssm's CUDA scan; the
               row says why when it is skipped); the tokenizer's share of each DART step, in the same mode;
  4. scorers   scorer variants: MobileNetV3-small/large trunks (v2 head; and the v1 cuts) at scorer input
               448/224/112, NCHW vs channels-last, eager vs CUDA graph vs compiled, and the tiny_cnn trunk;
  5. targets   tokenizer <= 10% of the DeiT-S-DART step, <= 5% of the Vim-S-DART step, DeiT-S-DART >= 2.0x DeiT-B
               img/s, each met or missed, and for a miss the part that bounds it, with numbers.

Timing: CUDA events around each call, ``--warmup`` calls first, median of ``--repeats``; the device name is printed.
Inputs of captured graphs are written into their static buffers once (no per-call copy is timed; the copy a loader
would need is reported on its own line). Markdown tables are printed last; ``--json`` / ``--markdown`` save them.
Sections run in priority order under a time budget (``--budget-s``): what does not fit is reported as skipped.

Accuracy of the scorer variants (the cluttered canvas benchmark) is not measured here: it needs the training code
(``train/``); the table's accuracy column says so.

Examples:
  python benchmarks/bench_tokenizer.py                          # everything, H100/H200 (~6-8 min incl. compiles)
  python benchmarks/bench_tokenizer.py --no-compile             # no torch.compile rows (~2 min)
  python benchmarks/bench_tokenizer.py --json out.json --markdown out.md
  python benchmarks/bench_tokenizer.py --smoke                  # tiny shapes on CPU (Triton interpreter), sanity only
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings

import torch

if __package__ in (None, ""):      # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import DTYPES, median_ms  # noqa: E402

TARGET_DEIT_SHARE, TARGET_VIM_SHARE, TARGET_SPEEDUP = 0.10, 0.05, 2.0
SECTIONS = ("parts", "tokenizer", "models", "scorers", "compile")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype (default bf16)")
    parser.add_argument("--image-dtype", default="fp32", choices=sorted(DTYPES),
                        help="dtype of the input images (default fp32, as a loader gives them)")
    parser.add_argument("--scorer-input", type=int, default=224,
                        help="scorer input size of the DART models (official newer code: 224; 0 = full image)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile row")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode for the compiled rows (default 'default'; CUDA graphs are "
                             "measured separately)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget: sections that would start after it are skipped (default 480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--markdown", default=None, help="also write the markdown tables to this file")
    parser.add_argument("--quick", action="store_true",
                        help="no torch.compile rows, 10 repeats, scorer variants at 224/112 channels-last only "
                             "(~1.5-2 min on an H100/H200)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, 1 repeat; runs on CPU (Triton kernels in the interpreter): checks that "
                             "the script works, timings meaningless")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Timing and bookkeeping
# ----------------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.skipped: list[tuple[str, str]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn) -> float:
        """Median milliseconds of fn() after warm-up (CUDA events on the GPU, perf_counter on CPU)."""
        return median_ms(fn, self.args.repeats, self.args.warmup, self.cuda)

    def record(self, section: str, name: str, ms: float | None = None, **extra) -> dict:
        row = dict(section=section, name=name, ms=ms, **extra)
        self.rows.append(row)
        text = "skipped" if ms is None else f"{ms:9.3f} ms"
        more = "  ".join(f"{k}={_fmt(v)}" for k, v in extra.items() if v is not None)
        print(f"[{section}] {name:58s} {text}  {more}", flush=True)
        return row

    def run(self, section: str, name: str, fn, **extra) -> dict:
        """Time ``fn`` and record it; an exception is recorded as a skipped row with its message."""
        try:
            ms = self.time_ms(fn)
        except Exception as exc:   # a broken variant must not end the run
            traceback.print_exc(limit=3)
            return self.record(section, name, None, note=f"failed: {type(exc).__name__}: {str(exc)[:160]}", **extra)
        return self.record(section, name, ms, **extra)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else (f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}")
    return str(value)


def cuda_graph(fn, warmup: int = 3):
    """Record fn() in a CUDA graph (after warm-up on a side stream); returns (replay, outputs of the recording).

    Call it under the grad mode / autocast state the graph should have; autocast's weight-cast cache is turned off
    while recording (cached casts die with the caller's autocast block; the graph would read freed memory)."""
    from dartmamba.tokenizer.capture import _uncached_autocast

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _uncached_autocast("cuda"):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with _uncached_autocast("cuda"), torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


@contextlib.contextmanager
def torch_paths():
    """The tokenizer's torch implementations everywhere (the unfused baseline)."""
    from dartmamba import backends

    with backends.use_backend("partition", "torch"), backends.use_backend("resample", "torch"), \
            backends.use_backend("posembed", "torch"):
        yield


# ----------------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------------
def shapes(args) -> dict:
    if args.smoke:
        return dict(batch=2, img=64, patch=8, grid=4, tokens=16, deit=dict(embed_dim=32, depth=1, num_heads=2),
                    vim=dict(embed_dim=32, depth=1), timm_img=32, scorer_inputs=(64, 32), scorer_input=32,
                    layouts=(False, True),
                    trunks=("mobilenetv3_small", "tiny_cnn"), compile_trunks=("tiny_cnn",))
    full = not args.quick
    return dict(batch=args.batch, img=args.img_size, patch=16, grid=args.img_size // 32, tokens=args.tokens,
                deit={}, vim={}, timm_img=224, scorer_inputs=(448, 224, 112) if full else (224, 112),
                layouts=(False, True) if full else (True,),
                scorer_input=args.scorer_input or None,
                trunks=("mobilenetv3_small", "mobilenetv3_large", "mobilenetv3_small_v1", "mobilenetv3_large_v1",
                        "tiny_cnn") if full else ("mobilenetv3_small", "mobilenetv3_large_v1", "tiny_cnn"),
                compile_trunks=("mobilenetv3_small", "mobilenetv3_large_v1"))


def dart_model(name: str, cfg: dict, device, **dart_cfg):
    import timm

    import dartmamba.models  # noqa: F401  (registers the models)

    size = cfg["deit"] if name.startswith("deit") else cfg["vim"]
    extra = dict(img_size=cfg["img"], patch_size=cfg["patch"], grid_size=cfg["grid"]) if cfg["deit"] else {}
    dart_cfg = {"scorer_input_size": cfg["scorer_input"], **dart_cfg}
    model = timm.create_model(name, num_tokens=cfg["tokens"], dart_cfg=dart_cfg, **size, **extra)
    return model.to(device).eval()


def env_info(bench: Bench) -> dict:
    import triton  # noqa: F401  (the kernels need it; its version goes in the report)

    import timm
    from dartmamba import backends

    info = dict(device=torch.cuda.get_device_name(bench.device) if bench.cuda else "CPU (Triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, timm=timm.__version__,
                python=platform.python_version(), cuda=torch.version.cuda,
                backends={op: backends.choose(op, bench.device) for op in ("partition", "resample", "posembed")})
    try:
        info["scan"] = backends.choose("scan", bench.device, "cuda")
    except Exception as exc:
        info["scan"] = f"unavailable: {exc}"
    return info


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------
def section_parts(bench: Bench, cfg: dict, model, images, amp):
    """Each part of the DeiT-S-DART tokenizer, on the same inputs."""
    from dartmamba.tokenizer import (embed_patches, partition, resample_patches, resample_pos_embed,
                                     resample_reference)

    tok = model.patch_embed
    pos = model.pos_embed[:, 1:].detach()
    with torch.no_grad(), amp():
        scores = tok.scores(images)
        geometry = partition(scores, tok.num_tokens, tok.num_rows, img_size=tok.img_size, validate=False)
        patches = resample_patches(images, geometry, tok.patch_size, tok.sampling)
    s = "parts"
    with torch.no_grad(), amp():
        bench.run(s, "scorer: trunk + head (eager)", lambda: tok.scores(images))
        if bench.cuda:
            try:
                replay, _ = cuda_graph(lambda: tok.scores(images))
                bench.run(s, "scorer: trunk + head (CUDA graph)", replay)
            except Exception as exc:
                bench.record(s, "scorer: trunk + head (CUDA graph)", None, note=f"failed: {exc}")
        for backend in ("torch", "triton"):
            bench.run(s, f"geometry: partition ({backend})",
                      lambda b=backend: partition(scores, tok.num_tokens, tok.num_rows, img_size=tok.img_size,
                                                  validate=False, backend=b))
        bench.run(s, "resample: official-style grid_sample loop",
                  lambda: resample_reference(images, geometry, tok.patch_size, tok.sampling))
        for backend in ("torch", "triton"):
            bench.run(s, f"resample ({backend})",
                      lambda b=backend: resample_patches(images, geometry, tok.patch_size, tok.sampling, b))
        bench.run(s, "patch embedding (GEMM)", lambda: embed_patches(patches, tok.proj.weight, tok.proj.bias))
        for backend in ("torch", "triton"):
            bench.run(s, f"positional embeddings ({backend})",
                      lambda b=backend: resample_pos_embed(pos, geometry, backend=b))
        bench.run(s, "image copy into a static buffer (what a graph input costs)",
                  lambda: images.clone())


def _compile_kwargs(args, fullgraph: bool) -> dict:
    kwargs = dict(fullgraph=fullgraph, dynamic=False, mode=args.compile_mode)
    if args.compile_backend:
        kwargs["backend"] = args.compile_backend
    return kwargs


def tokenizer_modes(bench: Bench, s: str, tok, images, pos, amp, label: str) -> dict:
    """Time one tokenizer eagerly (torch paths, fused kernels) and replayed from a CUDA graph; returns {mode: ms}."""
    out = {}
    with torch.no_grad(), amp():
        with torch_paths():
            out["eager (torch paths)"] = bench.run(s, f"{label}: eager, torch paths",
                                                   lambda: tok.forward_eager(images, pos))["ms"]
        out["eager"] = bench.run(s, f"{label}: eager, fused kernels", lambda: tok.forward_eager(images, pos))["ms"]
        if not bench.cuda:
            bench.record(s, f"{label}: CUDA graph (eager forward)", None, note="needs CUDA")
            return out
        try:
            runner = tok.capture(images.shape[0], image_dtype=images.dtype)
            runner.static_images.copy_(images)
            runner.static_pos.copy_(pos)
            out["graph"] = bench.run(s, f"{label}: CUDA graph (eager forward)",
                                     lambda: tok(runner.static_images, runner.static_pos))["ms"]
        except Exception as exc:
            traceback.print_exc(limit=3)
            bench.record(s, f"{label}: CUDA graph (eager forward)", None, note=f"failed: {exc}")
        finally:
            tok.release_capture()
    return out


def tokenizer_compiled_modes(bench: Bench, s: str, tok, images, pos, amp, label: str) -> dict:
    """torch.compile(fullgraph=True) of the tokenizer forward, alone and recorded in a CUDA graph."""
    out = {}
    try:
        fn = torch.compile(tok.forward_eager, **_compile_kwargs(bench.args, fullgraph=True))
        with torch.no_grad(), amp():
            out["compiled"] = bench.run(s, f"{label}: torch.compile (fullgraph)", lambda: fn(images, pos))["ms"]
    except Exception as exc:
        traceback.print_exc(limit=3)
        bench.record(s, f"{label}: torch.compile (fullgraph)", None, note=f"failed: {exc}")
    if bench.cuda and bench.args.compile_mode == "default":
        try:
            with torch.no_grad(), amp():
                runner = tok.capture(images.shape[0], image_dtype=images.dtype, compile=True)
                runner.static_images.copy_(images)
                runner.static_pos.copy_(pos)
                out["graph+compiled"] = bench.run(s, f"{label}: CUDA graph (compiled forward)",
                                                  lambda: tok(runner.static_images, runner.static_pos))["ms"]
        except Exception as exc:
            traceback.print_exc(limit=3)
            bench.record(s, f"{label}: CUDA graph (compiled forward)", None, note=f"failed: {exc}")
        finally:
            tok.release_capture()
    return out


def model_modes(bench: Bench, s: str, model, images, amp, label: str, tokenizer_ms: dict | None):
    """Step time in each mode; for DART models also the tokenizer's share (tokenizer timed in the same mode)."""
    batch = images.shape[0]
    is_dart = hasattr(model, "patch_embed") and hasattr(model.patch_embed, "capture")

    def add(mode, ms, tok_mode=None):
        if ms is None:
            return
        tok = (tokenizer_ms or {}).get(tok_mode or mode)
        share = tok / ms if (tok is not None and is_dart) else None
        bench.rows[-1].update(img_s=batch / ms * 1e3, tokenizer_ms=tok, share=share, model=label, mode=mode)
        if share is not None:
            print(f"    -> {batch / ms * 1e3:,.0f} img/s; tokenizer {tok:.3f} ms = {100 * share:.1f}% of the step")
        else:
            print(f"    -> {batch / ms * 1e3:,.0f} img/s")

    with torch.no_grad(), amp():
        if is_dart:
            with torch_paths():
                add("eager (torch paths)", bench.run(s, f"{label}: eager, torch tokenizer paths",
                                                     lambda: model(images))["ms"])
        add("eager", bench.run(s, f"{label}: eager" + (", fused kernels" if is_dart else ""),
                               lambda: model(images))["ms"])
        if bench.cuda:
            if is_dart:
                try:
                    runner = model.patch_embed.capture(batch, image_dtype=images.dtype)
                    runner.static_images.copy_(images)
                    add("graph", bench.run(s, f"{label}: tokenizer CUDA graph + eager backbone",
                                           lambda: model(runner.static_images))["ms"])
                except Exception as exc:
                    traceback.print_exc(limit=3)
                    bench.record(s, f"{label}: tokenizer CUDA graph + eager backbone", None, note=f"failed: {exc}")
                finally:
                    model.patch_embed.release_capture()
            try:
                static = images.clone()
                replay, _ = cuda_graph(lambda: model(static))
                add("graph", bench.run(s, f"{label}: whole model in one CUDA graph", replay)["ms"])
            except Exception as exc:
                traceback.print_exc(limit=3)
                bench.record(s, f"{label}: whole model in one CUDA graph", None, note=f"failed: {exc}")
        else:
            bench.record(s, f"{label}: whole model in one CUDA graph", None, note="needs CUDA", model=label)


def section_scorers(bench: Bench, cfg: dict, images, amp):
    from dartmamba.tokenizer import DartScorer

    s = "scorers"
    grid = (cfg["grid"], cfg["grid"])
    for trunk in cfg["trunks"]:
        head = "v1" if trunk.endswith("_v1") else "v2"
        for size in cfg["scorer_inputs"]:
            for channels_last in cfg["layouts"]:
                if bench.over_budget():
                    bench.skipped.append((s, f"{trunk} @ {size}"))
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")     # frozen trunks start random here: speed only
                    scorer = DartScorer(grid, trunk=trunk, head=head, input_size=size,
                                        channels_last=channels_last).to(bench.device).eval()
                layout = "channels_last" if channels_last else "NCHW"
                label = f"{trunk} (head {head}) @ {size}, {layout}"
                extra = dict(trunk=trunk, input=size, layout=layout, accuracy="canvas: docs/tokenizer_speed.md")
                with torch.no_grad(), amp():
                    row = bench.run(s, f"{label}: eager", lambda: scorer(images), mode="eager", **extra)
                    if bench.cuda and channels_last:
                        try:
                            replay, _ = cuda_graph(lambda: scorer(images))
                            bench.run(s, f"{label}: CUDA graph", replay, mode="graph", **extra)
                        except Exception as exc:
                            bench.record(s, f"{label}: CUDA graph", None, note=f"failed: {exc}", **extra)
                del row, scorer


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def best(rows, model: str, modes=None):
    cands = [r for r in rows if r.get("model") == model and r["ms"] is not None
             and (modes is None or r.get("mode") in modes)]
    return min(cands, key=lambda r: r["ms"]) if cands else None


def fast_parts(rows) -> list[tuple[str, float]]:
    """The parts of the fastest tokenizer path, largest first (scorer from its CUDA graph when measured)."""
    parts = {r["name"]: r["ms"] for r in rows if r["section"] == "parts" and r["ms"] is not None}
    picks = [("scorer (trunk + head)", parts.get("scorer: trunk + head (CUDA graph)",
                                                 parts.get("scorer: trunk + head (eager)"))),
             ("geometry (fused partition)", parts.get("geometry: partition (triton)")),
             ("resampling (Triton)", parts.get("resample (triton)")),
             ("patch embedding", parts.get("patch embedding (GEMM)")),
             ("positional embeddings (Triton)", parts.get("positional embeddings (triton)"))]
    return sorted(((n, ms) for n, ms in picks if ms is not None), key=lambda x: -x[1])


def targets(bench: Bench) -> list[dict]:
    rows = bench.rows
    out = []
    parts = fast_parts(rows)
    breakdown = ", ".join(f"{n} {ms:.3f} ms" for n, ms in parts)
    deit_small = best(rows, "DeiT-S")
    for model, goal, name in (("DeiT-S-DART", TARGET_DEIT_SHARE, "tokenizer share of the DeiT-S-DART step"),
                              ("Vim-S-DART", TARGET_VIM_SHARE, "tokenizer share of the Vim-S-DART step")):
        cands = [r for r in rows if r.get("model") == model and r.get("share") is not None]
        if not cands:
            reason = next((r.get("note") for r in rows if r.get("model") == model and r.get("note")), "not measured")
            out.append(dict(target=f"{name} <= {goal:.0%}", value=None, met=None, note=reason))
            continue
        r = min(cands, key=lambda r: r["ms"])     # the fastest step, with its tokenizer in the same mode
        note = f"best mode: {r['mode']}; tokenizer {r['tokenizer_ms']:.3f} ms of a {r['ms']:.3f} ms step"
        if model == "DeiT-S-DART" and deit_small:
            note += (f"; = {100 * r['tokenizer_ms'] / deit_small['ms']:.1f}% of the DeiT-S (224) step "
                     f"({deit_small['ms']:.3f} ms, {deit_small['mode']})")
        if r["share"] > goal and parts:
            note += f"; bounded by {parts[0][0]} (parts: {breakdown})"
        out.append(dict(target=f"{name} <= {goal:.0%}", value=r["share"], met=r["share"] <= goal, note=note))
    dart, base = best(rows, "DeiT-S-DART"), best(rows, "DeiT-B")
    if dart and base:
        ratio = dart["img_s"] / base["img_s"]
        note = (f"DeiT-S-DART {dart['img_s']:,.0f} img/s ({dart['mode']}) vs DeiT-B {base['img_s']:,.0f} img/s "
                f"({base['mode']})")
        if deit_small:
            note += (f"; DeiT-S {deit_small['img_s']:,.0f} img/s ({deit_small['mode']}): the backbone alone "
                     f"bounds DeiT-S-DART at {deit_small['img_s'] / base['img_s']:.2f}x DeiT-B")
        if ratio < TARGET_SPEEDUP and parts:
            note += f"; tokenizer parts: {breakdown}"
        out.append(dict(target=f"DeiT-S-DART >= {TARGET_SPEEDUP:g}x DeiT-B img/s", value=ratio,
                        met=ratio >= TARGET_SPEEDUP, note=note))
    else:
        out.append(dict(target=f"DeiT-S-DART >= {TARGET_SPEEDUP:g}x DeiT-B img/s", value=None, met=None,
                        note="not measured"))
    return out


def markdown(bench: Bench, info: dict, cfg: dict, goals: list[dict]) -> str:
    a = bench.args
    lines = []
    if a.smoke:
        lines += ["(smoke run: tiny shapes, timings meaningless)", ""]
    lines += [f"### DART tokenizer speed, {info['device']}",
              "",
              f"batch {cfg['batch']}, {cfg['img']}x{cfg['img']} input, N = {cfg['tokens']}, autocast {a.dtype}, "
              f"images {a.image_dtype}, inference; DART scorer input {cfg['scorer_input'] or 'full image'}; "
              f"torch {info['torch']}, triton {info['triton']}, timm {info['timm']}; median of {a.repeats} after "
              f"{a.warmup} warm-up calls; kernels: {info['backends']}; scan: {info['scan']}", ""]

    def table(title, header, rows):
        nonlocal lines
        lines += [f"#### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_fmt(c) if c is not None else "-" for c in row) + " |" for row in rows]
        lines.append("")

    def ms(r):
        return r["ms"] if r["ms"] is not None else r.get("note", "skipped")

    table("Tokenizer parts (DeiT-S-DART tokenizer)", ["part", "ms"],
          [[r["name"], ms(r)] for r in bench.rows if r["section"] == "parts"])
    table("Whole tokenizer", ["tokenizer, mode", "ms"],
          [[r["name"], ms(r)] for r in bench.rows if r["section"] == "tokenizer"])
    table("Models (inference steps)", ["model, mode", "step ms", "img/s", "tokenizer ms", "tokenizer share"],
          [[r["name"], ms(r), r.get("img_s"), r.get("tokenizer_ms"),
            None if r.get("share") is None else f"{100 * r['share']:.1f}%"]
           for r in bench.rows if r["section"] == "models"])
    table("Scorer variants (trunk + head, scorer input resized from the full image)",
          ["trunk", "input", "layout", "mode", "ms", "accuracy (cluttered canvas)"],
          [[r.get("trunk"), r.get("input"), r.get("layout"), r.get("mode"), ms(r), r.get("accuracy")]
           for r in bench.rows if r["section"] == "scorers"])
    table("Targets (H200, bf16, batch 256)", ["target", "value", "met", "note"],
          [[g["target"], None if g["value"] is None else (f"{100 * g['value']:.1f}%" if "share" in g["target"]
                                                           else f"{g['value']:.2f}x"),
            {True: "yes", False: "MISSED", None: "-"}[g["met"]], g["note"]] for g in goals])
    if bench.skipped:
        lines += ["Skipped (time budget) or interrupted: " + ", ".join(f"{s}/{n}" for s, n in bench.skipped), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_tokenizer: no CUDA device. This benchmark times the tokenizer on a GPU; use --smoke for a tiny "
              "CPU run (Triton kernels in the interpreter) that checks the script works, timings meaningless.",
              file=sys.stderr)
        return 2
    if cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_tokenizer: TRITON_INTERPRET is set, the kernels would run in the interpreter; unset it.",
              file=sys.stderr)
        return 2
    if args.quick:
        args.no_compile = True
        args.warmup, args.repeats = min(args.warmup, 3), min(args.repeats, 10)
    if args.smoke:
        args.warmup, args.repeats = 1, 1
        if not cuda:
            os.environ["TRITON_INTERPRET"] = "1"   # before any kernel module is imported
            if args.compile_backend is None:
                args.compile_backend = "aot_eager"   # inductor's C++ build takes minutes on a small CPU
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    from dartmamba import backends

    offers = contextlib.ExitStack()       # held open for the whole run
    if not cuda:   # the registry offers the Triton kernels to CUDA tensors only; the smoke run uses the interpreter
        for op in ("partition", "resample", "posembed"):
            offers.enter_context(backends.allow_device(op, "triton", "cpu", prefer=True))

    bench = Bench(args, device)
    cfg = shapes(args)
    info = env_info(bench)
    print(f"device: {info['device']}; torch {info['torch']}; triton {info['triton']}; timm {info['timm']}; "
          f"kernels {info['backends']}; scan {info['scan']}", flush=True)
    compiled = not args.no_compile and "compile" in args.sections
    amp_dtype = DTYPES[args.dtype]

    def amp():
        if amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def sections():
        batch, size = cfg["batch"], cfg["img"]
        images = torch.randn(batch, 3, size, size, device=device).to(DTYPES[args.image_dtype])
        small_img = images[:, :, ::size // cfg["timm_img"], ::size // cfg["timm_img"]].contiguous()
        want_models = "models" in args.sections
        deit_dart = dart_model("deit_small_dart", cfg, device)
        deit_pos = deit_dart.pos_embed[:, 1:].detach()
        tokenizer_ms: dict[str, dict] = {}

        # 1. parts, 2. whole tokenizer (eager, CUDA graph)
        if "parts" in args.sections:
            section_parts(bench, cfg, deit_dart, images, amp)
        if "tokenizer" in args.sections or want_models:
            tokenizer_ms["DeiT-S-DART"] = tokenizer_modes(bench, "tokenizer", deit_dart.patch_embed, images,
                                                          deit_pos, amp, "DeiT-S-DART tokenizer")
        vim, vim_pos, vim_reason = None, None, None
        if cuda and info["scan"] != "cuda":
            vim_reason = f"skipped: mamba-ssm's CUDA scan is unavailable ({info['scan']})"
        elif want_models or "tokenizer" in args.sections:
            try:
                vim = dart_model("vim_small_dart", cfg, device)
                pos = vim.pos_embed.detach()
                vim_pos = torch.cat([pos[:, :vim.cls_pos_index], pos[:, vim.cls_pos_index + 1:]], dim=1)
                tokenizer_ms["Vim-S-DART"] = tokenizer_modes(bench, "tokenizer", vim.patch_embed, images, vim_pos,
                                                             amp, "Vim-S-DART tokenizer")
            except Exception as exc:
                traceback.print_exc(limit=3)
                vim, vim_reason = None, f"failed to build: {type(exc).__name__}: {exc}"

        # 3. models (eager, CUDA graphs)
        timm_models = {}
        if want_models:
            import timm

            s = "models"
            model_modes(bench, s, deit_dart, images, amp, "DeiT-S-DART", tokenizer_ms.get("DeiT-S-DART"))
            for label, name in (("DeiT-S", "deit_small_patch16_224"), ("DeiT-B", "deit_base_patch16_224")):
                kwargs = (dict(img_size=cfg["timm_img"], patch_size=cfg["patch"], **cfg["deit"]) if args.smoke
                          else {})
                timm_models[label] = timm.create_model(name, **kwargs).to(device).eval()
                model_modes(bench, s, timm_models[label], small_img, amp, label, None)
            if vim is not None:
                model_modes(bench, s, vim, images, amp, "Vim-S-DART", tokenizer_ms.get("Vim-S-DART"))
            else:
                bench.record(s, "Vim-S-DART", None, note=vim_reason or "not built", model="Vim-S-DART")

        # 4. scorer variants (eager, CUDA graph)
        if "scorers" in args.sections:
            section_scorers(bench, cfg, images, amp)

        # 5. the torch.compile rows last: they take most of the time
        if compiled:
            plan = [("tokenizer", "DeiT-S-DART", lambda: tokenizer_ms.setdefault("DeiT-S-DART", {}).update(
                        tokenizer_compiled_modes(bench, "tokenizer", deit_dart.patch_embed, images, deit_pos, amp,
                                                 "DeiT-S-DART tokenizer")))]
            if want_models:
                plan.append(("models", "DeiT-S-DART", lambda: model_modes_compiled(
                    bench, "models", deit_dart, images, amp, "DeiT-S-DART", tokenizer_ms.get("DeiT-S-DART"))))
                for label in ("DeiT-B", "DeiT-S"):
                    plan.append(("models", label, lambda label=label: model_modes_compiled(
                        bench, "models", timm_models[label], small_img, amp, label, None)))
                if vim is not None:
                    plan.append(("tokenizer", "Vim-S-DART", lambda: tokenizer_ms.setdefault("Vim-S-DART", {}).update(
                        tokenizer_compiled_modes(bench, "tokenizer", vim.patch_embed, images, vim_pos, amp,
                                                 "Vim-S-DART tokenizer"))))
                    plan.append(("models", "Vim-S-DART", lambda: model_modes_compiled(
                        bench, "models", vim, images, amp, "Vim-S-DART", tokenizer_ms.get("Vim-S-DART"))))
            if "scorers" in args.sections:
                plan.append(("scorers", "scorer variants", lambda: compile_scorers(bench, cfg, images, amp)))
            for section, what, step in plan:
                if bench.over_budget():
                    bench.skipped.append((section, f"{what} torch.compile"))
                    continue
                step()

    try:
        sections()
    except KeyboardInterrupt:   # e.g. `timeout -s INT`: report what was measured
        print(f"\n(interrupted at {bench.elapsed():.0f} s: the tables below hold what was measured)", flush=True)
        bench.skipped.append(("run", f"interrupted at {bench.elapsed():.0f} s"))
    goals = targets(bench)
    report = markdown(bench, info, cfg, goals)
    print()
    print(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(env=info, args=vars(args), shapes={k: v for k, v in cfg.items()}, rows=bench.rows,
                           targets=goals, skipped=bench.skipped, wall_s=bench.elapsed()), fh, indent=2, default=str)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(report + "\n")
    print(f"\n(total wall time {bench.elapsed():.0f} s)")
    return 0


def model_modes_compiled(bench: Bench, s: str, model, images, amp, label: str, tokenizer_ms: dict | None):
    """The torch.compile row of one model (whole model, fullgraph not required: timm models may break)."""
    batch = images.shape[0]
    try:
        fn = torch.compile(model, **_compile_kwargs(bench.args, fullgraph=False))
        with torch.no_grad(), amp():
            row = bench.run(s, f"{label}: torch.compile (whole model)", lambda: fn(images))
    except Exception as exc:
        traceback.print_exc(limit=3)
        bench.record(s, f"{label}: torch.compile (whole model)", None, note=f"failed: {exc}", model=label)
        return
    if row["ms"] is None:
        row["model"] = label
        return
    tok = (tokenizer_ms or {}).get("compiled")
    share = tok / row["ms"] if tok is not None else None
    row.update(img_s=batch / row["ms"] * 1e3, tokenizer_ms=tok, share=share, model=label, mode="compiled")
    print(f"    -> {row['img_s']:,.0f} img/s" + (f"; tokenizer {100 * share:.1f}% of the step" if share else ""))


def compile_scorers(bench: Bench, cfg: dict, images, amp):
    from dartmamba.tokenizer import DartScorer

    s = "scorers"
    for trunk in cfg["compile_trunks"]:
        if bench.over_budget():
            bench.skipped.append((s, f"{trunk} torch.compile"))
            continue
        head = "v1" if trunk.endswith("_v1") else "v2"
        size = cfg["scorer_input"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scorer = DartScorer((cfg["grid"], cfg["grid"]), trunk=trunk, head=head, input_size=size,
                                channels_last=True).to(bench.device).eval()
        kwargs = _compile_kwargs(bench.args, fullgraph=True)
        extra = dict(trunk=trunk, input=size, layout="channels_last", accuracy="canvas: docs/tokenizer_speed.md")
        try:
            fn = torch.compile(scorer, **kwargs)
            with torch.no_grad(), amp():
                bench.run(s, f"{trunk} (head {head}) @ {size}, channels_last: torch.compile", lambda: fn(images),
                          mode="compiled", **extra)
        except Exception as exc:
            bench.record(s, f"{trunk} (head {head}) @ {size}, channels_last: torch.compile", None,
                         note=f"failed: {exc}", **extra)


if __name__ == "__main__":
    sys.exit(main())
