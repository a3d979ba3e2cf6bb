"""The embedded demo: Vim-DART against the same Vim with a fixed grid, 16 tokens each, on cluttered canvases.

Both runs are the real entry point (``python -m dartmamba_train.train`` with the installed recipes ``demo/vim_dart``
and ``demo/vim_fixed``), started side by side (one thread each on a 2-core machine), each evaluated and
checkpointed. Then the demo draws the learned DART tokens over validation canvases and prints a summary. It runs
from any installation (a wheel too) and any working directory.

    python -m dartmamba_train.demo --out outputs/demo            # or: bash scripts/demo.sh

Outputs (``--out`` is relative to the working directory): ``<out>/vim_dart/`` and ``<out>/vim_fixed/`` (config.yaml,
steps.csv, summary.csv, checkpoints/, last.safetensors, best.safetensors), ``<out>/dart_tokens.png``,
``<out>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

RUNS = {"dart": ("vim_dart", "Vim-DART"), "fixed": ("vim_fixed", "Vim, fixed grid")}
# The DART run (scorer, partition and resampling on top of the same Vim) takes longer and decides when the demo ends;
# the fixed-grid run and its loader run at a lower scheduling priority, so that on a machine with fewer free cores
# than processes (2 cores: two training processes and two canvas loaders) the DART run's steps go first and the
# fixed run fills the gaps. Measured on 2 cores: see docs/demo.md.
NICENESS = {"dart": 0, "fixed": 6}

__all__ = ["main", "DemoRun", "object_sample_fraction", "draw_tokens_figure"]


@dataclass
class DemoRun:
    key: str
    recipe: str
    out_dir: str
    label: str
    seconds: float = 0.0
    top1: float | None = None
    tokens: int | None = None


def _recipe_path(name: str) -> str:
    """The installed demo recipe ``demo/<name>.yaml`` (package ``dartmamba_configs``) as a file path."""
    from importlib.resources import files

    path = os.fspath(files("dartmamba_configs") / "demo" / f"{name}.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo recipe not found: {path} (the installed dartmamba_configs lacks it: "
                                f"reinstall dartmamba)")
    return path


def _stream(prefix: str, pipe, sink: list) -> None:
    for line in pipe:
        sink.append(line)
        print(f"[{prefix}] {line}", end="", flush=True)


def _launch(run: DemoRun, overrides: list[str], threads: int) -> tuple[subprocess.Popen, threading.Thread, list]:
    cmd = [sys.executable, "-m", "dartmamba_train.train", "--config", run.recipe, f"output.dir={run.out_dir}",
           "output.progress_bar=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    niceness = NICENESS.get(run.key, 0)
    lower_priority = (lambda: os.nice(niceness)) if niceness and hasattr(os, "nice") else None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lower_priority)
    lines: list = []
    reader = threading.Thread(target=_stream, args=(f"{run.key:5s}", proc.stdout, lines), daemon=True)
    reader.start()
    return proc, reader, lines


def train_both(runs: list[DemoRun], overrides: list[str], jobs: int) -> None:
    """Train the runs ``jobs`` at a time, each with cores / jobs threads; raise if one fails."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = list(runs)
    active: list = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            active.append((run, time.perf_counter(), *_launch(run, overrides, threads)))
        time.sleep(0.2)
        for item in list(active):
            run, start, proc, reader, lines = item
            if proc.poll() is None:
                continue
            reader.join()
            active.remove(item)
            run.seconds = time.perf_counter() - start
            if proc.returncode != 0:
                for other in active:
                    other[2].kill()
                raise RuntimeError(f"demo: the {run.label} run failed (exit {proc.returncode}); its output is above "
                                   f"and in {run.out_dir}")


# ---------------------------------------------------------------------------------------------------------------
# Analysis of the trained DART model
# ---------------------------------------------------------------------------------------------------------------
def _load_model(out_dir: str):
    import timm

    import dartmamba.models  # noqa: F401
    from dartmamba_train.config import load_config
    from dartmamba_train.checkpoint import load_weights

    cfg = load_config(os.path.join(out_dir, "config.yaml"))
    model = timm.create_model(cfg.model.name, num_classes=cfg.data.num_classes or 10, **cfg.model.kwargs)
    model.load_state_dict(load_weights(os.path.join(out_dir, "last.safetensors")))
    return cfg, model.eval()


def object_sample_fraction(tokenizer, images, boxes):
    """Fraction of DART's sample points that fall on the object, per image.

    images: (B, C, H, W) as the model takes them; boxes: (B, 4) object boxes (x0, y0, x1, y1) in pixels. The
    sample positions are read by resampling an image of pixel coordinates with the images' own geometry.
    Returns (B,) fractions (a fixed grid's is the box's share of the canvas area).
    """
    import torch

    from dartmamba.tokenizer import resample_patches

    with torch.no_grad():
        geometry = tokenizer.geometry(images)
    batch, _, height, width = images.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    coords = torch.stack([xs, ys, xs]).expand(batch, 3, height, width)
    points = resample_patches(coords, geometry.detach(), tokenizer.patch_size, tokenizer.sampling, "torch")
    px, py = points[:, :, 0].flatten(1), points[:, :, 1].flatten(1)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    inside = ((px >= boxes[:, :1]) & (px < boxes[:, 2:3]) & (py >= boxes[:, 1:2]) & (py < boxes[:, 3:4]))
    return inside.float().mean(dim=1)


def _import_analysis_modules() -> None:
    """The analysis's imports (matplotlib, timm and the models: most of the figure's time when run at the end), run
    in a thread while the two runs train, so that they are off the demo's critical path. An import that fails here
    fails again, with its traceback, where the analysis needs it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
        import timm  # noqa: F401

        import dartmamba.models  # noqa: F401
        from dartmamba_train.data import build_data  # noqa: F401
    except Exception:  # noqa: BLE001
        pass


def draw_tokens_figure(dart_dir: str, fixed_dir: str, path: str, count: int = 6) -> dict:
    """PNG of ``count`` validation canvases: DART's learned token boundaries, the 16 patches DART's tokens read,
    and the fixed grid's view; with both models' predictions. Returns numbers measured on the validation set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from einops import rearrange

    from dartmamba.tokenizer import resample_patches
    from dartmamba.viz import draw_tokens
    from dartmamba.files import atomic_path
    from dartmamba_train.data import build_data, model_data_config

    dart_cfg, dart = _load_model(dart_dir)
    fixed_cfg, fixed = _load_model(fixed_dir)
    dart_val = build_data(dart_cfg, model_data_config(dart)).val_set
    fixed_val = build_data(fixed_cfg, model_data_config(fixed)).val_set
    index = list(range(len(dart_val)))
    samples = [dart_val.render(i) for i in index]
    mean, std = dart_val.mean, dart_val.std
    images = torch.stack([(s.image - mean) / std for s in samples])
    fixed_images = torch.stack([fixed_val[i][0] for i in index])
    with torch.no_grad():
        dart_pred = dart(images).argmax(1)
        fixed_pred = fixed(fixed_images).argmax(1)
        geometry = dart.patch_embed.geometry(images[:count])
        patches = resample_patches(images[:count], geometry, dart.patch_embed.patch_size, dart.patch_embed.sampling)
    labels = torch.tensor([s.label for s in samples])
    boxes = torch.tensor([s.box for s in samples])
    on_object = object_sample_fraction(dart.patch_embed, images, boxes)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / (images.shape[-1] * images.shape[-2])

    side = int(round(patches.shape[1] ** 0.5))
    fig, axes = plt.subplots(3, count, figsize=(2.1 * count, 7.6))
    for col in range(count):
        image = samples[col].image
        ok = lambda pred: "ok" if pred == labels[col] else "wrong"  # noqa: E731
        draw_tokens(axes[0, col], image, geometry, col, linewidth=0.8,
                    title=f"digit {labels[col].item()}: DART says {dart_pred[col].item()} ({ok(dart_pred[col])})")
        if patches.shape[1] == side * side:
            tiles = rearrange(patches[col], "(gh gw) c p q -> c (gh p) (gw q)", gh=side) * std + mean
            axes[1, col].imshow(tiles.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[1, col].set_title("what DART's tokens read", fontsize=8)
        view = (fixed_images[col] * fixed_val.std + fixed_val.mean).clamp(0, 1)
        axes[2, col].imshow(view.permute(1, 2, 0).numpy(), interpolation="nearest")
        cells = view.shape[-1] // fixed_cfg.model.kwargs.get("patch_size", 8)
        for k in range(1, cells):
            position = k * view.shape[-1] / cells - 0.5
            axes[2, col].axhline(position, color="cyan", linewidth=0.6)
            axes[2, col].axvline(position, color="cyan", linewidth=0.6)
        axes[2, col].set_title(f"fixed grid says {fixed_pred[col].item()} ({ok(fixed_pred[col])})", fontsize=8)
        for row in (1, 2):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    size, p = images.shape[-1], patches.shape[-1]
    fig.suptitle(f"{patches.shape[1]} tokens each. Top: the token boundaries Vim-DART learned, on the {size}x{size} "
                 f"validation canvas. Middle: its {patches.shape[1]} resampled {p}x{p} patches in token order "
                 f"({side} per row).\nBottom: the fixed grid's view ({view.shape[-1]}x{view.shape[-1]}, "
                 f"{patches.shape[1]} patches of {p}x{p}). Titles: the true digit and both models' predictions.",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=1.2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return {"dart_top1": 100.0 * (dart_pred == labels).float().mean().item(),
            "fixed_top1": 100.0 * (fixed_pred == labels).float().mean().item(),
            "dart_samples_on_object": float(on_object.mean()), "object_area_fraction": float(area.mean())}


def _final_top1(out_dir: str) -> float:
    from dartmamba_train.logs import read_csv

    rows = read_csv(os.path.join(out_dir, "summary.csv"))
    if not rows or not rows[-1]["top1"]:
        raise RuntimeError(f"demo: no final evaluation in {out_dir}/summary.csv")
    return float(rows[-1]["top1"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once (default: 2 when there are 2+ cores, else 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for both runs, e.g. train.epochs=2")
    args = parser.parse_args(argv)
    from dartmamba_train.config import load_config

    out = os.path.abspath(args.out)
    if not any(o.startswith(("resume=", "output.overwrite=")) for o in args.overrides):
        # the demo starts over on every call: an earlier demo's runs are moved aside into
        # <run>/previous-<UTC time>/ (a few MB each), never deleted
        args.overrides = [*args.overrides, "output.overwrite=true"]
    runs = [DemoRun(key, _recipe_path(recipe), os.path.join(out, recipe), label)
            for key, (recipe, label) in RUNS.items()]
    for run in runs:                                   # config errors surface before anything trains
        cfg = load_config(run.recipe, [*args.overrides, f"output.dir={run.out_dir}"])
        run.tokens = cfg.model.kwargs.get("num_tokens") or (cfg.model.kwargs["img_size"] //
                                                            cfg.model.kwargs["patch_size"]) ** 2
    jobs = args.jobs or (2 if (os.cpu_count() or 1) >= 2 else 1)
    print(f"demo: training {' and '.join(r.label for r in runs)} ({runs[0].tokens} tokens each) on cluttered "
          f"canvases, {jobs} at a time; outputs in {out}", flush=True)
    start = time.perf_counter()
    threading.Thread(target=_import_analysis_modules, name="demo-imports", daemon=True).start()
    train_both(runs, args.overrides, jobs)
    train_seconds = time.perf_counter() - start
    for run in runs:
        run.top1 = _final_top1(run.out_dir)
    figure = os.path.join(out, "dart_tokens.png")
    measured = draw_tokens_figure(runs[0].out_dir, runs[1].out_dir, figure)
    total = time.perf_counter() - start
    summary = {"train_seconds": train_seconds, "total_seconds": total, "figure": figure,
               "runs": {r.key: {"label": r.label, "tokens": r.tokens, "top1": r.top1, "seconds": r.seconds,
                                "out_dir": r.out_dir} for r in runs}, **measured}
    from dartmamba.files import atomic_write_text
    from dartmamba_train.logs import format_seconds

    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    dart, fixed = runs
    print(f"\n=== demo finished in {format_seconds(total)} (training both models: {format_seconds(train_seconds)}) ===")
    width = max(len(r.label) for r in runs)
    for run in runs:
        print(f"  {run.label:{width}s}  {run.tokens} tokens  top-1 {run.top1:5.1f} %  "
              f"(trained in {format_seconds(run.seconds)}; {run.out_dir})")
    print(f"  DART - fixed grid at equal token count: {dart.top1 - fixed.top1:+.1f} points")
    print(f"  DART spends {100 * measured['dart_samples_on_object']:.0f} % of its samples on the digit, which covers "
          f"{100 * measured['object_area_fraction']:.0f} % of the canvas (a fixed grid spends exactly that share)")
    print(f"  token boundaries: {figure}")
    print(f"  checkpoints: {dart.out_dir}/checkpoints, {fixed.out_dir}/checkpoints; weights: */last.safetensors; "
          f"numbers: {os.path.join(out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
