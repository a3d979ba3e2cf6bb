"""Video DART against VideoMamba's fixed spatiotemporal grid on the moving-digit clips, several seeds, one study.

Every run is an installed recipe ``video/<name>`` through the real entry point (``python -m dartmamba_train.train``),
with the seed (and the scoring of a DART variant, or the frame size of a bigger grid) overridden; runs go ``--jobs``
at a time, each with ``cores / jobs`` threads, longest first. Finished runs (a complete summary.csv) are reused, so
the study can be interrupted and restarted. Then it counts every variant's FLOPs per clip (tokenizer included),
measures where each DART model puts its tokens and samples (per frame; on the digit's ink and in its box), and draws
the tokens the first seed's DART models (content and authors' scores) place across the frames.

    python benchmarks/video_canvas.py --seeds 0 1 2 3 4 --jobs 2 --out benchmarks/results/video_canvas \\
        --figure docs/img/video_tokens.png

Writes ``<out>/results.json``, ``<out>/table.md`` (the tables docs/video.md quotes) and every run's ``config.yaml``
and ``summary.csv`` under ``<out>/<run>/``; the runs themselves (checkpoints, logs) go to ``--runs``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import shutil
import statistics
import sys
import time

if __package__ in (None, ""):       # run as a script from a checkout: benchmarks/ is a folder beside it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.canvas_token_sweep import seed_cells, train_once  # noqa: E402

# name -> (installed recipe video/<name>, tokens per frame, overrides, relative cost for scheduling)
VARIANTS = {
    "dart16": ("videomamba_dart", 16, [], 1.3),
    "dart16_authors": ("videomamba_dart", 16, ["model.kwargs.tokenizer_cfg.score_mode=authors"], 1.3),
    # the authors' scores with frame 0 at the level of a static cell of a later frame (sigmoid(-1.5)), not 0.5
    "dart16_authors_low0": ("videomamba_dart", 16, ["model.kwargs.tokenizer_cfg.score_mode=authors",
                                                    "model.kwargs.tokenizer_cfg.first_frame_score=0.18"], 1.3),
    # the scorer kept as initialised (its learning rate x 0), with each scoring
    "dart16_frozen": ("videomamba_dart", 16, ["optim.lr_scale={patch_embed.scorer: 0}"], 1.3),
    "dart16_authors_frozen": ("videomamba_dart", 16, ["model.kwargs.tokenizer_cfg.score_mode=authors",
                                                      "optim.lr_scale={patch_embed.scorer: 0}"], 1.3),
    "grid16": ("videomamba_grid", 16, [], 1.0),
    "grid36": ("videomamba_grid", 36, ["model.kwargs.img_size=48", "data.canvas.output_size=48"], 2.6),
    "grid64": ("videomamba_grid", 64, ["model.kwargs.img_size=64", "data.canvas.output_size=64"], 4.5),
}
DART_VARIANTS = ("dart16", "dart16_authors", "dart16_authors_low0", "dart16_frozen", "dart16_authors_frozen")
LABELS = {"dart16": "VideoMamba + video DART (content scores)",
          "dart16_authors": "VideoMamba + video DART (authors' scores: frame 0 at 0.5)",
          "dart16_authors_low0": "VideoMamba + video DART (authors' scores, frame 0 at 0.18)",
          "dart16_frozen": "VideoMamba + video DART (content scores, scorer not trained)",
          "dart16_authors_frozen": "VideoMamba + video DART (authors' scores, scorer not trained)",
          "grid16": "VideoMamba, fixed grid", "grid36": "VideoMamba, fixed grid", "grid64": "VideoMamba, fixed grid"}
VIEWS = {**dict.fromkeys(DART_VARIANTS, "adaptive, resampled from 64x64"), "grid16": "32x32 (area-averaged)",
         "grid36": "48x48 (area-averaged)", "grid64": "64x64 (the frames themselves)"}


def recipe(name: str) -> str:
    return f"video/{VARIANTS[name][0]}"


def run_one(name: str, seed: int, runs: str, threads: int, extra: list[str]) -> dict:
    _, per_frame, overrides, _ = VARIANTS[name]
    out_dir = os.path.join(runs, f"{name}_s{seed}")
    row, seconds, train_seconds = train_once(recipe(name), [*overrides, f"train.seed={seed}", *extra], out_dir,
                                             threads, _epochs(name, extra))
    return {"name": name, "seed": seed, "tokens_per_frame": per_frame, "top1": float(row["top1"]),
            "seconds": seconds, "train_seconds": train_seconds, "out_dir": os.path.relpath(out_dir)}


def _config(name: str, extra: list[str]):
    from dartmamba_train.config import load_config

    return load_config(recipe(name), VARIANTS[name][2] + list(extra))


def _epochs(name: str, extra: list[str]) -> int:
    return _config(name, extra).train.epochs


def flops_of(name: str, extra: list[str]) -> dict:
    """GFLOPs per clip (multiply-add = 1, tokenizer and selective scan counted), by part."""
    from dartmamba.flops import count_model_flops

    cfg = _config(name, extra)
    report = count_model_flops(cfg.model.name, num_classes=cfg.data.num_classes, **cfg.model.kwargs)
    return {"tokens": report.num_tokens, "input": "x".join(map(str, report.input_size[1:])),
            "gflops": report.total / 1e9, "gflops_tokenizer": report.tokenizer / 1e9,
            "gflops_backbone": report.parts["backbone"] / 1e9}


def box_masks(boxes, frames: int, size: int):
    """The moving object's boxes as masks: (B, T, 4) (x0, y0, x1, y1), x1 / y1 exclusive -> (B, T, S, S) of 0 / 1."""
    import torch

    grid = torch.arange(size, dtype=torch.float32)
    inside_x = (grid >= boxes[..., 0:1]) & (grid < boxes[..., 2:3])                  # (B, T, S)
    inside_y = (grid >= boxes[..., 1:2]) & (grid < boxes[..., 3:4])
    return (inside_y[..., :, None] & inside_x[..., None, :]).float()


def video_samples_on_object(tokenizer, video, masks):
    """Fraction of video DART's sample points that land on the moving object, per clip.

    video: (B, C, T, H, W) as the model takes it; masks: (B, T, H, W) the object's masks (its ink, or its box). The
    sample positions are read by resampling a picture of pixel coordinates of the frame stack with the clips' own
    geometry.
    """
    import torch

    from dartmamba.tokenizer import resample_patches

    with torch.no_grad():
        geometry = tokenizer.geometry(video)
    batch, _, frames, height, width = video.shape
    ys, xs = torch.meshgrid(torch.arange(frames * height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    coords = torch.stack([xs, ys, xs]).expand(batch, 3, frames * height, width)
    points = resample_patches(coords, geometry.detach(), tokenizer.patch_size, tokenizer.sampling, "torch")
    px = points[:, :, 0].flatten(1).round().long().clamp(0, width - 1)
    py = points[:, :, 1].flatten(1).round().long().clamp(0, frames * height - 1)
    tall = masks.reshape(batch, frames * height, width)
    return (torch.gather(tall.flatten(1), 1, py * width + px) >= 0.5).float().mean(dim=1)


def allocation_statistics(model, val, count: int | None = None) -> dict:
    """Where a video DART ``model`` puts its tokens on the first ``count`` (default all) clips of the validation set
    ``val``: tokens per frame (and frame 0's against the later frames' mean: frame 0 is as static as the rest of the
    scene), the share of samples on the moving object's ink and inside its box, against the share of the frames
    they cover (what a fixed grid spends on them)."""
    import torch

    from dartmamba.tokenizer import tokens_per_frame

    samples = [val.render(i) for i in range(count or len(val))]
    video = torch.stack([(s.video - val.mean) / val.std for s in samples])
    masks = torch.stack([s.masks for s in samples])
    boxes = box_masks(torch.stack([s.boxes for s in samples]), video.shape[2], video.shape[-1])
    with torch.no_grad():
        geometry = model.patch_embed.geometry(video)
    per_frame = tokens_per_frame(geometry, video.shape[2]).mean(0)
    on_object = float(video_samples_on_object(model.patch_embed, video, masks).mean())
    in_box = float(video_samples_on_object(model.patch_embed, video, boxes).mean())
    ink_share, box_share = float((masks >= 0.5).float().mean()), float(boxes.mean())
    return {"tokens_per_frame": [round(float(v), 2) for v in per_frame],
            "frame0_over_later_mean": float(per_frame[0] / per_frame[1:].mean()),
            "samples_on_object": on_object, "object_area_fraction": ink_share,
            "samples_on_object_over_area": on_object / ink_share,
            "samples_in_box": in_box, "box_area_fraction": box_share, "samples_in_box_over_area": in_box / box_share}


def dart_statistics(out_dir: str, count: int | None = None) -> dict:
    """:func:`allocation_statistics` of a trained DART run (its checkpoint) on its validation clips."""
    from dartmamba_train.data import build_data, model_data_config
    from dartmamba_train.demo import _load_model

    cfg, model = _load_model(out_dir)
    return allocation_statistics(model, build_data(cfg, model_data_config(model)).val_set, count)


def initial_statistics(name: str, seed: int, count: int = 256) -> dict:
    """:func:`allocation_statistics` of an untrained ``name`` model, built as the run of ``seed`` builds it (before
    any update), on the first ``count`` validation clips."""
    from dartmamba_train.data import build_data, model_data_config
    from dartmamba_train.engine import create_model
    from dartmamba_train.loop import seed_step

    cfg = _config(name, [])
    seed_step(seed, 1)                     # as the run seeds its model's construction
    model = create_model(cfg, cfg.data.num_classes).eval()
    return allocation_statistics(model, build_data(cfg, model_data_config(model)).val_set, count)


def draw_figure(dart_dir: str, grid_dir: str, path: str, count: int = 4) -> None:
    """PNG: ``count`` validation clips, one per column block; every frame with the tokens video DART placed (frame
    0 first, top to bottom), and beside it the fixed grid's view of the same frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from dartmamba.files import atomic_path
    from dartmamba.tokenizer import stack_frames, tokens_per_frame
    from dartmamba.viz import draw_tokens
    from dartmamba_train.data import build_data, model_data_config
    from dartmamba_train.demo import _load_model

    dart_cfg, dart = _load_model(dart_dir)
    grid_cfg, grid = _load_model(grid_dir)
    dart_val = build_data(dart_cfg, model_data_config(dart)).val_set
    grid_val = build_data(grid_cfg, model_data_config(grid)).val_set
    index = list(range(count))
    samples = [dart_val.render(i) for i in index]
    mean, std = dart_val.mean, dart_val.std
    video = torch.stack([(s.video - mean) / std for s in samples])
    grid_video = torch.stack([grid_val[i][0] for i in index])
    with torch.no_grad():
        geometry = dart.patch_embed.geometry(video)
        dart_pred, grid_pred = dart(video).argmax(1), grid(grid_video).argmax(1)
    counts = tokens_per_frame(geometry, video.shape[2])
    frames, height = video.shape[2], video.shape[3]
    fig, axes = plt.subplots(frames, 2 * count, figsize=(2.0 * 2 * count, 2.3 * frames + 0.9))
    for col, sample in enumerate(samples):
        tall = stack_frames(sample.video[None])[0]
        view = (grid_video[col] * grid_val.std + grid_val.mean).clamp(0, 1)
        cells = view.shape[-1] // grid_cfg.model.kwargs.get("patch_size", 8)
        for t in range(frames):
            ax = axes[t, 2 * col]
            draw_tokens(ax, tall, geometry, col, linewidth=0.7)
            ax.set_ylim(t * height + height - 0.5, t * height - 0.5)
            ax.set_title(f"frame {t}: {counts[col, t]:.1f} DART tokens", fontsize=7)
            other = axes[t, 2 * col + 1]
            other.imshow(view[:, t].permute(1, 2, 0).numpy(), interpolation="nearest")
            for k in range(1, cells):
                position = k * view.shape[-1] / cells - 0.5
                other.axhline(position, color="cyan", linewidth=0.5)
                other.axvline(position, color="cyan", linewidth=0.5)
            other.set_xticks([])
            other.set_yticks([])
            other.set_title("fixed grid's view", fontsize=7)
        ok = lambda pred: "ok" if pred == sample.label else "wrong"  # noqa: E731
        axes[0, 2 * col].set_title(f"digit {sample.label}: DART {dart_pred[col].item()} ({ok(dart_pred[col])})\n"
                                   f"frame 0: {counts[col, 0]:.1f} tokens", fontsize=7)
        axes[0, 2 * col + 1].set_title(f"grid {grid_pred[col].item()} ({ok(grid_pred[col])})\nfixed grid's view",
                                       fontsize=7)
    tokens = geometry.num_tokens
    fig.suptitle(f"Video DART, {dart.patch_embed.scorer.score_mode} scores ({tokens} tokens over {frames} frames, "
                 f"8x8 each, resampled from 64x64) on validation "
                 f"clips: the token boundaries on every frame (top: frame 0),\nbeside the fixed grid's view "
                 f"({tokens} tokens: a 4x4 grid per frame at 32x32). The digit moves; the scene stays.", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def table(results: list[dict], flops: dict) -> str:
    lines = ["| tokenizer | tokens per clip (per frame) | view of the 64x64 frames | GFLOPs per clip (tokenizer) | "
             "top-1 per seed | mean top-1 |", "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        if not rows:
            continue
        per_seed, mean = seed_cells(rows)
        f = flops[name]
        lines.append(f"| {LABELS[name]} | {f['tokens']} ({VARIANTS[name][1]}) | {VIEWS[name]} | "
                     f"{f['gflops']:.4f} ({f['gflops_tokenizer']:.4f}) | {per_seed} | {mean} |")
    return "\n".join(lines) + "\n"


def allocation_table(results: list[dict], stats: dict) -> str:
    """Where each DART run puts its tokens and samples (validation clips), one row per run, then the means."""
    top1 = {(r["name"], r["seed"]): r["top1"] for r in results}
    lines = ["| scores | seed | top-1 | tokens per frame (frame 0, 1, 2, 3) | frame 0 / later frames' mean | "
             "samples on the digit's ink (its area share) | samples in the digit's box (its area share) |",
             "|---|---|---|---|---|---|---|"]
    for name, per_seed in stats.items():
        rows = [(seed, stat) for seed, stat in sorted(per_seed.items())]
        for seed, stat in rows:
            lines.append(f"| {name} | {seed} | {top1[(name, seed)]:.1f} | "
                         f"{', '.join(f'{v:.1f}' for v in stat['tokens_per_frame'])} | "
                         f"{stat['frame0_over_later_mean']:.2f}x | {100 * stat['samples_on_object']:.1f} % "
                         f"({100 * stat['object_area_fraction']:.1f} %: {stat['samples_on_object_over_area']:.2f}x) | "
                         f"{100 * stat['samples_in_box']:.1f} % ({100 * stat['box_area_fraction']:.1f} %: "
                         f"{stat['samples_in_box_over_area']:.2f}x) |")
        mean = lambda key: statistics.mean(stat[key] for _, stat in rows)  # noqa: E731
        lines.append(f"| **{name}** | mean | **{statistics.mean(top1[(name, s)] for s, _ in rows):.1f}** | | "
                     f"**{mean('frame0_over_later_mean'):.2f}x** | **{mean('samples_on_object_over_area'):.2f}x** | "
                     f"**{mean('samples_in_box_over_area'):.2f}x** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "video_canvas"),
                        help="results folder (default relative to the working directory)")
    parser.add_argument("--runs", default=os.path.join("outputs", "video_canvas"),
                        help="where the training runs write (checkpoints, logs; relative to the working directory)")
    parser.add_argument("--figure", default=None, help="also draw the first seed's DART tokens to this PNG (and the "
                        "authors' scoring's to <name>_authors.png)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    runs = os.path.abspath(args.runs)
    jobs = sorted(((n, s) for s in args.seeds for n in args.variants), key=lambda job: -VARIANTS[job[0]][3])
    results = []
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(run_one, n, s, runs, threads, args.overrides): (n, s) for n, s in jobs}
        for done in futures.as_completed(pending):
            result = done.result()
            results.append(result)
            print(f"{result['name']} seed {result['seed']}: top-1 {result['top1']:.2f}", flush=True)
    wall = time.perf_counter() - start
    flops = {name: flops_of(name, args.overrides) for name in args.variants}
    stats = {name: {seed: dart_statistics(os.path.join(os.path.relpath(runs), f"{name}_s{seed}"))
                    for seed in args.seeds} for name in args.variants if name in DART_VARIANTS}
    initial = {name: {seed: initial_statistics(name, seed) for seed in args.seeds}
               for name in args.variants if name in DART_VARIANTS}
    os.makedirs(args.out, exist_ok=True)
    for result in results:
        kept = os.path.join(args.out, os.path.basename(result["out_dir"]))
        os.makedirs(kept, exist_ok=True)
        for name in ("config.yaml", "summary.csv"):
            shutil.copyfile(os.path.join(result["out_dir"], name), os.path.join(kept, name))
    summary = {"results": sorted(results, key=lambda r: (r["name"], r["seed"])), "flops": flops,
               "dart_statistics": stats, "initial_dart_statistics": initial, "wall_seconds": wall, "jobs": args.jobs,
               "threads_per_job": threads, "overrides": args.overrides}
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    text = table(results, flops) + "\n" + allocation_table(results, stats)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(text)
    print(text)
    print(json.dumps(stats, indent=1))
    if args.figure and "grid16" in args.variants:
        seed = args.seeds[0]
        stem, ext = os.path.splitext(args.figure)
        for name, path in (("dart16", args.figure), ("dart16_authors", f"{stem}_authors{ext}")):
            if name in args.variants:
                draw_figure(os.path.join(os.path.relpath(runs), f"{name}_s{seed}"),
                            os.path.join(os.path.relpath(runs), f"grid16_s{seed}"), path)
                print(f"figure: {path}")


if __name__ == "__main__":
    main()
