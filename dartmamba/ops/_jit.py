"""dartmamba's C++ CPU kernels, built at first use with torch's extension tooling, the way DeepSpeed builds its ops.

:func:`cpu_kernels` compiles every ``dartmamba/ops/csrc/*.cpp`` (the selective scan and the causal conv1d) into one
library with ``torch.utils.cpp_extension.load`` (ninja and the system C++ compiler), for the vector ISA torch itself
dispatches to on this CPU (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or portable code), and
caches the build under torch's extension root (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions/<python>_<cuda>/``). The library's name carries a hash of the sources, the flags, the
torch version and install directory and Python's version, so a changed or upgraded checkout never loads a stale or
ABI-incompatible binary and two environments never rebuild each other's; the sources are compiled from a copy in the
build directory, so checkouts with the same sources in one environment share one build. The sources register their ops with ``TORCH_LIBRARY(TORCH_EXTENSION_NAME)``:
no Python bindings are compiled. Each op's ``cpp`` module registers, with :func:`after_load`, what it adds to the
ops once the library loads (fake implementations, autograd, FLOP formulas). Nothing is built at import time;
``DARTMAMBA_BUILD_CPU_KERNELS=0`` never builds (the torch implementations run instead).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .. import backends

__all__ = ["cpu_capability", "extension_name", "cpu_kernels", "cpu_kernels_unavailable", "after_load",
           "register_cpp_backend"]

CSRC = Path(__file__).resolve().parent / "csrc"

# compiler flags of each capability, as torch's own per-ISA kernel builds (at::vec picks its implementation from
# the CPU_CAPABILITY_* define)
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}
_COMMON_FLAGS = ["-O3", "-fopenmp"]    # torch's at::parallel_for runs on OpenMP (torch's own libgomp at run time)
_LOADED: dict = {}
_AFTER_LOAD: list = []


def cpu_capability() -> str:
    """The ISA the kernels are built for: torch's CPU capability where we have flags for it, else ``DEFAULT``."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001  (older or unusual builds)
        capability = "DEFAULT"
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def _flags(capability: str) -> list[str]:
    return [*_COMMON_FLAGS, *_ISA_FLAGS[capability]]


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def extension_name(capability: str | None = None) -> str:
    """``dartmamba_cpu_<isa>_<hash>``: the hash covers every source and header, the flags, torch's version and
    install directory, and Python's version."""
    capability = capability or cpu_capability()
    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*.[ch]*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    # torch's install directory too: the build files name its headers and libraries, so two environments sharing a
    # build directory would rebuild each other's library on every switch, silently
    digest.update(" ".join([*_flags(capability), torch.__version__, sys.version,
                            os.path.dirname(os.path.abspath(torch.__file__))]).encode())
    return f"dartmamba_cpu_{capability.lower()}_{digest.hexdigest()[:12]}"


def _build_directory(name: str) -> str:
    from ..compat.torch_internals import extension_build_directory

    return extension_build_directory(name)


def after_load(register) -> None:
    """Call ``register(namespace)`` once the kernels' library is loaded (at once if it is): what an op adds to its
    C++-registered ops (``torch.library.register_fake`` / ``register_autograd``, FLOP formulas), done once."""
    _AFTER_LOAD.append(register)
    if "ops" in _LOADED:
        register(_LOADED["name"])


def _staged_sources(build_dir: str) -> Path:
    """The sources copied into ``<build_dir>/src`` (each file written only when missing or different), so that the
    build files torch writes name the same paths for every checkout with these sources: otherwise ninja sees a
    second clone's paths as a changed build and silently rebuilds (every first run from a fresh clone did, and the
    next run in the first checkout rebuilt again)."""
    staged = Path(build_dir) / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for path in sorted(CSRC.glob("*.[ch]*")):
        data, target = path.read_bytes(), staged / path.name
        if target.is_file() and target.read_bytes() == data:
            continue                                   # untouched, so its timestamp does not trigger a rebuild
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, target)
    return staged


def cpu_kernels():
    """The kernels' op namespace ``torch.ops.<name>`` (``scan_fwd``, ``scan_bwd``, ``causal_conv1d_fwd``,
    ``causal_conv1d_bwd``, ``rms_norm_fwd``), built on first use on this machine and loaded from the cache afterwards. Raises whatever
    the build raises (no compiler, no ninja, a compile error)."""
    if "ops" in _LOADED:
        return _LOADED["ops"]
    # "No CUDA runtime is found" (logged when cpp_extension is first imported) is moot for CPU kernels: the
    # extension logger is quieted for this call only
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        name = _load()
    finally:
        logger.setLevel(level)
    for register in _AFTER_LOAD:
        register(name)
    _LOADED["name"] = name
    _LOADED["ops"] = getattr(torch.ops, name)
    return _LOADED["ops"]


def _load() -> str:
    """Build (when not cached) and load the library; returns its name."""
    from torch.utils.cpp_extension import load

    capability = cpu_capability()
    name = extension_name(capability)
    build_dir = _build_directory(name)
    fresh = not any(f.endswith((".so", ".pyd")) for f in os.listdir(build_dir))
    start = time.perf_counter()
    if fresh:
        print(f"dartmamba: building the C++ CPU kernels for {capability} (first use on this machine; cached in "
              f"{build_dir})", file=sys.stderr, flush=True)
    staged = _staged_sources(build_dir)
    load(name=name, sources=[str(staged / p.name) for p in _sources()], extra_cflags=_flags(capability),
         extra_ldflags=["-fopenmp"], extra_include_paths=[str(staged)], build_directory=build_dir, verbose=False,
         is_python_module=False)
    if fresh:
        print(f"dartmamba: built {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return name


def _check() -> str | None:
    if os.environ.get("DARTMAMBA_BUILD_CPU_KERNELS", "1") == "0":
        return "DARTMAMBA_BUILD_CPU_KERNELS=0"
    try:
        cpu_kernels()
    except Exception as exc:  # no compiler or ninja, a compile error: the torch implementations stay
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        detail = " / ".join(lines[-3:])[-400:]
        return f"building the C++ CPU kernels failed ({type(exc).__name__}: {detail})"
    return None


# the availability check of every "cpp" backend: None when the kernels load, else why not (cached per process)
cpu_kernels_unavailable = backends.cached_check(_check)


def register_cpp_backend(op: str, fn, *, supports, capabilities=(), fallback: str | None = None):
    """Register ``fn`` as the ``"cpp"`` backend of ``op``: CPU tensors, available where these kernels load;
    ``fallback`` completes the warning "auto" gives once when it passes over the kernels (what runs instead)."""
    warning = None if fallback is None else (f"dartmamba's C++ {op} kernel for CPU tensors could not be built, so "
                                             f"they use {fallback} (a C++ compiler and ninja are needed)")
    return backends.register(op, "cpp", fn, devices=("cpu",), available=cpu_kernels_unavailable, supports=supports,
                             capabilities=capabilities, fallback_warning=warning)
