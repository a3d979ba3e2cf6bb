"""Accuracy for the scaling study: train one study cell on the cluttered canvas and report its top-1.

``benchmarks/scaling.py --metrics accuracy --train-fn dartmamba_train.scaling:canvas_cell`` calls
:func:`canvas_cell` once per cell. The cell's own model (its registered name and ``model_kwargs``, exactly as the
study's FLOP and throughput columns measured it) is trained with the demo's canvas recipe (the installed recipe
``base/demo_canvas``) through the real entry point (``python -m dartmamba_train.train``, one process, in a subprocess
so every run starts clean). A fixed-grid cell sees the canvas area-averaged to its ``img_size``; a DART cell
resamples its tokens from the full canvas, so its ``img_size`` must be the canvas size. Give the study canvas-scale
models through its kwargs, e.g. the demo's::

    python -m benchmarks.scaling --families vim --sizes ti --tokens 16 36 64 --metrics flops accuracy \\
        --model-kwargs '{"patch_size": 8, "embed_dim": 64, "depth": 4, "d_state": 8, "expand": 1}' \\
        --dart-kwargs '{"img_size": 64, "grid_size": 8, "dart_cfg": {"trunk": "tiny_cnn", "head": "v2"}}' \\
        --train-fn dartmamba_train.scaling:canvas_cell --train-kwargs '{"epochs": 4}' --out benchmarks/results/canvas_scaling

Keys the study passes through ``--train-kwargs``: ``epochs`` (default: the recipe's 4), ``seed`` (0), ``threads``
(default: all cores), ``recipe`` (another canvas recipe), ``overrides`` (a list of extra ``key=value``). A finished
run (its ``summary.csv`` has the last epoch evaluated) is reused; an interrupted one resumes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

DEFAULT_RECIPE = "base/demo_canvas"     # a recipe name: base/demo_canvas.yaml in the installed dartmamba_configs

__all__ = ["canvas_cell", "canvas_overrides"]


def _json_flow(value) -> str:
    """A YAML flow value the config reader parses back to ``value`` (JSON is YAML)."""
    import json

    return json.dumps(value, sort_keys=True)


def _recipe_file(recipe: str) -> str:
    """A YAML path (relative to the working directory) or an installed recipe's name, as an absolute file path."""
    if os.path.isfile(recipe):
        return os.path.abspath(recipe)
    from importlib.resources import files

    name = recipe[:-5] if recipe.endswith(".yaml") else recipe
    path = os.fspath(files("dartmamba_configs").joinpath(*name.split("/"))) + ".yaml"
    if not os.path.isfile(path):
        raise ValueError(f"train kwargs 'recipe': {recipe!r} is neither a YAML file nor an installed recipe ({path})")
    return path


def canvas_overrides(cell: dict, canvas_size: int) -> list[str]:
    """The ``key=value`` overrides that turn the canvas recipe into a run of ``cell``'s model.

    Raises ValueError naming the cell when its model cannot see the canvas as configured.
    """
    kwargs = dict(cell.get("model_kwargs") or {})
    img_size = kwargs.get("img_size")
    key = f"{cell.get('family')}-{cell.get('size')}-{cell.get('tokenizer')}-{cell.get('tokens')}"
    if not isinstance(img_size, int):
        raise ValueError(f"cell {key}: model_kwargs['img_size'] must be one int for the canvas (square images), got "
                         f"{img_size!r}; pass canvas-scale models through the study's --model-kwargs/--dart-kwargs")
    overrides = [f"model.name={cell['model']}", f"model.kwargs={_json_flow(kwargs)}"]
    if cell.get("tokenizer") == "dart":
        if img_size != canvas_size:
            raise ValueError(f"cell {key}: a DART cell resamples from the whole canvas, so model_kwargs['img_size'] "
                             f"must be the canvas size {canvas_size}, got {img_size} (set it with --dart-kwargs)")
        overrides.append("data.canvas.output_size=null")
    else:
        if img_size > canvas_size:
            raise ValueError(f"cell {key}: a fixed grid of {cell.get('tokens')} tokens reads {img_size}x{img_size} "
                             f"pixels, more than the {canvas_size}x{canvas_size} canvas; use fewer tokens or a "
                             f"smaller patch_size")
        overrides.append(f"data.canvas.output_size={img_size}")
    return overrides


def _final_row(out_dir: str, epochs: int) -> dict | None:
    from dartmamba_train.logs import read_csv

    path = os.path.join(out_dir, "summary.csv")
    rows = read_csv(path) if os.path.isfile(path) else []
    if rows and int(rows[-1]["epoch"]) == epochs and rows[-1].get("top1"):
        return rows[-1]
    return None


def canvas_cell(cell: dict) -> dict:
    """Train ``cell`` (a scaling-study cell dict) on the cluttered canvas; return ``{"accuracy": top-1 %, ...}``."""
    from dartmamba_train.config import load_config

    recipe = _recipe_file(cell.get("recipe") or DEFAULT_RECIPE)
    workdir = cell["workdir"]
    run_dir = os.path.join(workdir, "run")
    canvas_size = load_config(recipe).data.canvas.canvas_size
    overrides = canvas_overrides(cell, canvas_size)
    seed = int(cell.get("seed", 0))
    overrides += [f"train.seed={seed}", f"output.dir={run_dir}", "output.progress_bar=false", "resume=auto"]
    if cell.get("epochs") is not None:
        overrides.append(f"train.epochs={int(cell['epochs'])}")
    extra = cell.get("overrides") or []
    if isinstance(extra, str) or not all(isinstance(x, str) for x in extra):
        raise ValueError(f"train kwargs 'overrides' must be a list of 'key=value' strings, got {extra!r}")
    overrides += list(extra)
    cfg = load_config(recipe, overrides)          # config errors surface here, before any training
    epochs = cfg.train.epochs

    row = _final_row(run_dir, epochs)
    seconds = None
    if row is None:
        threads = str(int(cell.get("threads") or (os.cpu_count() or 1)))
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        os.makedirs(workdir, exist_ok=True)
        start = time.perf_counter()
        log_path = os.path.join(workdir, "train.log")
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "dartmamba_train.train", "--config", recipe, *overrides],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            with open(log_path) as log:
                tail = "".join(log.readlines()[-5:]).strip()
            raise RuntimeError(f"training exited with status {proc.returncode} (log: {log_path}): {tail}")
        row = _final_row(run_dir, epochs)
        if row is None:
            raise RuntimeError(f"training finished without a final evaluation in {run_dir}/summary.csv")
    return {"accuracy": float(row["top1"]), "train_top5": float(row["top5"]), "train_epochs": epochs,
            "train_seed": seed, "train_seconds": seconds, "train_dir": run_dir}
