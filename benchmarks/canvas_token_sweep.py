"""Tokens vs accuracy on the cluttered canvas: Vim-DART against the fixed-grid Vim, several seeds.

Every run is an installed demo recipe (``demo/vim_dart``, ``demo/vim_fixed``) through the real entry point
(``python -m dartmamba_train.train``), with the token count and seed overridden; runs go ``--jobs`` at a time, each
with ``cores / jobs`` threads. Finished runs (a complete summary.csv) are reused, so the sweep can be interrupted and
restarted.

    python benchmarks/canvas_token_sweep.py --seeds 0 1 2 --jobs 2 --out benchmarks/results/canvas_token_sweep

Writes ``<out>/results.json`` and ``<out>/table.md`` (the table docs/demo.md quotes).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (recipe, tokens, overrides). Fixed grids keep 8x8-pixel tokens, so more tokens = a finer view of the canvas.
VARIANTS = {
    "dart16": ("vim_dart", 16, []),
    "dart36": ("vim_dart", 36, ["model.kwargs.num_tokens=36"]),
    "fixed16": ("vim_fixed", 16, []),
    "fixed36": ("vim_fixed", 36, ["model.kwargs.img_size=48", "data.canvas.output_size=48"]),
    "fixed64": ("vim_fixed", 64, ["model.kwargs.img_size=64", "data.canvas.output_size=64"]),
    # control: the DART model with constant scores, i.e. a regular 4x4 grid point-sampled from the 64x64 canvas
    "uniform16": ("vim_dart", 16, ["model.kwargs.dart_cfg.uniform_scores=true"]),
    # scorer variants (the tokenizer-speed issue's accuracy column): the demo's scorer is tiny_cnn + head v2 at 64 px
    "dart16_scorer32": ("vim_dart", 16, ["model.kwargs.dart_cfg.scorer_input_size=32"]),
    "dart16_headv1": ("vim_dart", 16, ["model.kwargs.dart_cfg.head=v1"]),
    "dart16_mnv3small": ("vim_dart", 16, ["model.kwargs.dart_cfg.trunk=mobilenetv3_small",
                                          "model.kwargs.dart_cfg.scorer_input_size=64"]),
}
LABELS = {"dart": "Vim-DART", "fixed": "Vim, fixed grid", "uniform": "Vim-DART, constant scores (control)",
          "dart16_scorer32": "Vim-DART, scorer input 32x32 (half)", "dart16_headv1": "Vim-DART, scorer head v1",
          "dart16_mnv3small": "Vim-DART, frozen random-init MobileNetV3-small trunk (no pretrained weights here)"}


def final_row(out_dir: str, epochs: int) -> dict | None:
    path = os.path.join(out_dir, "summary.csv")
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1] if rows and int(rows[-1]["epoch"]) == epochs and rows[-1]["top1"] else None


def train_once(config: str, overrides: list[str], out_dir: str, threads: int, epochs: int) -> tuple[dict, float | None,
                                                                                                  float]:
    """One run of ``python -m dartmamba_train.train --config <config> <overrides>`` into ``out_dir`` with ``threads``
    threads, unless a finished one (``epochs`` epochs in its summary.csv) is there. Returns (its last summary row, the
    seconds this call trained or None when reused, the summed epoch times)."""
    row = final_row(out_dir, epochs)
    seconds = None
    if row is None:
        cmd = [sys.executable, "-m", "dartmamba_train.train", "--config", config, f"output.dir={out_dir}",
               "output.progress_bar=false", "resume=auto", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        os.makedirs(out_dir, exist_ok=True)
        start = time.perf_counter()
        with open(os.path.join(out_dir, "stdout.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        row = final_row(out_dir, epochs)
    with open(os.path.join(out_dir, "summary.csv"), newline="") as handle:
        train_seconds = sum(float(r["epoch_time_s"]) for r in csv.DictReader(handle))
    return row, seconds, train_seconds


def run_one(name: str, seed: int, out: str, threads: int, epochs: int, extra: list[str]) -> dict:
    recipe, tokens, overrides = VARIANTS[name]
    row, seconds, train_seconds = train_once(
        f"demo/{recipe}",
        [*overrides, f"train.seed={seed}", f"train.epochs={epochs}", *extra],
        os.path.join(out, f"{name}_s{seed}"), threads, epochs)
    return {"name": name, "seed": seed, "tokens": tokens, "top1": float(row["top1"]), "seconds": seconds,
            "train_seconds": train_seconds}


def table(results: list[dict]) -> str:
    lines = ["| tokenizer | tokens | view of the 64x64 canvas | top-1 per seed | mean top-1 |",
             "|---|---|---|---|---|"]
    views = {"dart": "adaptive, resampled from 64x64", "uniform": "regular grid point-sampled from 64x64"}
    for name in VARIANTS:
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        if not rows:
            continue
        kind = name if name in LABELS else "".join(c for c in name if c.isalpha())
        tokens = rows[0]["tokens"]
        side = int(round(tokens ** 0.5)) * 8
        view = views.get(kind.split("16")[0], f"{side}x{side} " + ("(area-averaged)" if side < 64 else
                                                                   "(the canvas itself)"))
        per_seed, mean = seed_cells(rows)
        lines.append(f"| {LABELS[kind]} | {tokens} | {view} | {per_seed} | {mean} |")
    return "\n".join(lines) + "\n"


def seed_cells(rows: list[dict]) -> tuple[str, str]:
    """Table cells of one variant's runs (sorted by seed): ``"73.1 (s0), 75.3 (s1)"`` and ``"**74.2** ± 1.6"``."""
    accs = [r["top1"] for r in rows]
    spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
    return ", ".join(f"{a:.1f} (s{r['seed']})" for a, r in zip(accs, rows)), f"**{statistics.mean(accs):.1f}**{spread}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "canvas_token_sweep"),
                        help="results folder (default relative to the working directory)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = [(n, s) for s in args.seeds for n in args.variants]
    results = []
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(run_one, n, s, args.out, threads, args.epochs, args.overrides): (n, s) for n, s in jobs}
        for done in futures.as_completed(pending):
            result = done.result()
            results.append(result)
            print(f"{result['name']} seed {result['seed']}: top-1 {result['top1']:.2f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(sorted(results, key=lambda r: (r["name"], r["seed"])), handle, indent=1)
    text = table(results)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
