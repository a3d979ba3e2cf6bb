"""Shared pieces of the benchmark scripts: which model runs a (family, size, tokenizer, token count) cell, device
names, synchronisation, memory, and table/CSV/JSON writers. Nothing here needs a GPU, matplotlib or pandas."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = ("fixed", "dart")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}    # the scripts' --dtype names


# Nothing here imports dartmamba at import time: a script may have to set TRITON_INTERPRET before anything imports
# triton (bench_tokenizer.py --smoke does). The family lists come from dartmamba's registry on first use.
def _families() -> dict:
    """The image families (the scripts here take (B, C, H, W) images; video: benchmarks/video_canvas.py)."""
    from dartmamba.models import FAMILIES as registered     # importing the models registers them

    return {name: family for name, family in registered.items() if family.modality == "image"}


def __getattr__(name: str):
    """``FAMILIES`` (the registered model families: vim, deit, ...), ``SIZES`` and ``SIZE_ALIASES`` (``ti``,
    ``s``, ...), read from dartmamba's registry."""
    if name == "FAMILIES":
        return tuple(_families())
    if name == "SIZES":
        return tuple(dict.fromkeys(size for family in _families().values() for size in family.sizes))
    if name == "SIZE_ALIASES":
        sizes = __getattr__("SIZES")
        return {**{size: size for size in sizes},
                **{alias: size for size in sizes for alias in (size[0], size[:2]) if alias not in sizes}}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """dartmamba's atomic writer (:func:`dartmamba.files.atomic_write_text`)."""
    from dartmamba.files import atomic_write_text as write

    write(path, text)
SCALING_TOKENS = (121, 196, 392, 784, 1568)


# ----------------------------------------------------------------------------------------------------------------
# Models of a scaling cell
# ----------------------------------------------------------------------------------------------------------------
def grid_for_tokens(num_tokens: int, max_aspect: float = 2.0) -> tuple[int, int]:
    """(rows, cols) of a fixed patch grid with exactly ``num_tokens`` patches, as square as possible:
    196 -> (14, 14), 392 -> (14, 28), 1568 -> (32, 49), 288 -> (16, 18). Raises for counts that only factor into
    grids longer than ``max_aspect`` : 1 (e.g. primes)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    rows = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
    cols = num_tokens // rows
    if cols / rows > max_aspect:
        raise ValueError(f"{num_tokens} tokens only make a {rows}x{cols} patch grid (aspect > {max_aspect:g}); "
                         f"pick a count with a near-square factorisation (121, 196, 392, 784, 1568, ...)")
    return rows, cols


def cell_model(family: str, size: str, tokenizer: str, num_tokens: int, patch_size: int = 16,
               overrides: dict | None = None) -> tuple[str, dict]:
    """(registered model name, kwargs) of one scaling cell.

    Fixed grid: the token count is set through the image size, ``img_size = patch_size * grid_for_tokens(N)``
    (224 -> 196 tokens, (224, 448) -> 392, 448 -> 784, (512, 784) -> 1568). DART: 448 input (the paper's), and
    ``num_tokens = N``. ``overrides`` (e.g. ``depth``, ``embed_dim``, ``img_size`` and ``dart_cfg`` for tiny test
    models) are applied on top; a ``patch_size`` in it also sets the fixed grid's patch.
    """
    families, aliases = _families(), __getattr__("SIZE_ALIASES")
    family, size = family.lower(), aliases.get(size.lower(), size.lower())
    if family not in families:
        raise ValueError(f"family must be one of {tuple(families)}, got {family!r}")
    sizes = families[family].sizes
    if size not in sizes:
        raise ValueError(f"size must be one of {sizes} (or an abbreviation: {sorted(aliases)}), got {size!r}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    overrides = dict(overrides or {})
    if tokenizer == "fixed":
        patch = int(overrides.get("patch_size", patch_size))
        rows, cols = grid_for_tokens(num_tokens)
        img = patch * rows if rows == cols else (patch * rows, patch * cols)
        kwargs = {"img_size": img}
        overrides.pop("img_size", None)            # the token count decides the image size of a fixed grid
        overrides.pop("dart_cfg", None)
        overrides.pop("grid_size", None)
    else:
        kwargs = {"num_tokens": int(num_tokens)}
    name = families[family].model_name(size, tokenizer)
    kwargs.update(overrides)
    return name, kwargs


# ----------------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------------
def timing_trunk_weights() -> None:
    """Timing runs build DART models with a randomly initialised scorer trunk unless DARTMAMBA_TRUNK_WEIGHTS says
    otherwise: time does not depend on the trunk's weights, and a machine without the Hub cache has none."""
    os.environ.setdefault("DARTMAMBA_TRUNK_WEIGHTS", "random")


def resolve_device(name: str = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but torch.cuda.is_available() is False")
    return device


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The card (``torch.cuda.get_device_name``) or the CPU model with the thread count torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats: int, warmup: int = 0, cuda: bool = False) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls: CUDA events around each call on
    the GPU (``cuda=True``; the current device), ``time.perf_counter`` on the CPU."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def backend_choices(device: torch.device) -> dict:
    """Which implementation each dartmamba op runs on ``device`` (or why none can)."""
    from dartmamba import backends

    import dartmamba.ops  # noqa: F401  (registers scan, conv1d, rmsnorm)
    import dartmamba.tokenizer  # noqa: F401  (registers resample)

    out = {}
    ops = backends.ops()
    for op in ops:
        try:
            out[op] = backends.choose(op, device)
        except Exception as exc:  # noqa: BLE001
            out[op] = f"unavailable ({exc})"
    return out


_ALLOCATOR: dict = {}


def cpu_allocator(default: bool = False) -> str:
    """For CPU benchmarks: raise glibc malloc's thresholds as dartmamba's CPU entry points do
    (:func:`dartmamba.runtime.tune_cpu_allocator`), or keep the defaults (``default``); the line goes into
    :func:`environment` and the benchmark's header."""
    from dartmamba.runtime import tune_cpu_allocator

    _ALLOCATOR["allocator"] = "glibc defaults (--default-allocator)" if default else tune_cpu_allocator()
    return _ALLOCATOR["allocator"]


def environment(device: torch.device) -> dict:
    """What produced a number: device, torch/CUDA/timm versions, host."""
    info = {"device": device_name(device), "device_type": torch.device(device).type, "torch": torch.__version__,
            "python": platform.python_version(), "host_cpu": cpu_model_name(), "cpu_threads": torch.get_num_threads()}
    try:
        import timm
        info["timm"] = timm.__version__
    except Exception:  # pragma: no cover
        pass
    if torch.device(device).type == "cuda":
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    if "allocator" in _ALLOCATOR:
        info["allocator"] = _ALLOCATOR["allocator"]
    try:
        info["backends"] = backend_choices(device)
    except Exception:  # noqa: BLE001  (informational only)
        pass
    return info


# ----------------------------------------------------------------------------------------------------------------
# Host memory (CPU runs): the process's resident set and its peak, with a peak reset where Linux allows it
# ----------------------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mib() -> float | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib / 1024


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ",.1f", missing: str = "-") -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec or '' for str)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), spec) if spec else fmt(row.get(k), "")
                                       for k, _, spec in columns) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buf.getvalue()


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def write_csv(path, rows: list[dict], columns: list[str] | None = None) -> None:
    atomic_write_text(path, csv_text(rows, columns))


def write_json(path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def parse_json_arg(text: str | None, what: str = "--model-kwargs") -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{what} must be a JSON object, e.g. '{{\"num_tokens\": 392}}': {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{what} must be a JSON object, got {type(value).__name__}")
    return value
