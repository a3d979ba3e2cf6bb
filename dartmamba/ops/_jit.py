"""Build a C++ CPU kernel at first use with torch's extension tooling, the way DeepSpeed builds its ops.

:func:`load_cpu_extension` compiles ``dartmamba/ops/csrc/<source>`` with ``torch.utils.cpp_extension.load``
(ninja and the system C++ compiler) for the vector ISA torch itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or portable code), and caches the build under torch's
extension root (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/<python>_<cuda>/``). The module name
carries a hash of the source, the flags and the torch version, so a rebuilt or upgraded checkout never loads a
stale or ABI-incompatible binary and two checkouts never rebuild each other's. Nothing is built at import time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["cpu_capability", "extension_name", "load_cpu_extension"]

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


def cpu_capability() -> str:
    """The ISA the kernels are built for: torch's CPU capability where we have flags for it, else ``DEFAULT``."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001  (older or unusual builds)
        capability = "DEFAULT"
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def _flags(capability: str) -> list[str]:
    return [*_COMMON_FLAGS, *_ISA_FLAGS[capability]]


def extension_name(source: str, capability: str | None = None) -> str:
    """``<stem>_<isa>_<hash>``: the hash covers the source text, the flags, torch's version and Python's ABI."""
    capability = capability or cpu_capability()
    text = (CSRC / source).read_bytes()
    digest = hashlib.sha256(text + " ".join([*_flags(capability), torch.__version__, sys.version]).encode())
    return f"dartmamba_{Path(source).stem}_{capability.lower()}_{digest.hexdigest()[:12]}"


def _build_directory(name: str) -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, verbose=False)


def load_cpu_extension(source: str):
    """Build (first use on this machine, cached afterwards) and load the library compiled from
    ``dartmamba/ops/csrc/<source>``; returns its op namespace ``torch.ops.<name>`` (the source registers its ops
    with ``TORCH_LIBRARY(TORCH_EXTENSION_NAME, m)``, so no Python bindings are compiled). Raises whatever the build
    raises (no compiler, no ninja, compile errors)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)   # "No CUDA runtime is found": moot
    from torch.utils.cpp_extension import load

    capability = cpu_capability()
    name = extension_name(source, capability)
    build_dir = _build_directory(name)
    fresh = not any(f.endswith(".so") or f.endswith(".pyd") for f in os.listdir(build_dir))
    start = time.perf_counter()
    if fresh:
        print(f"dartmamba: building the C++ kernel {source} for {capability} (first use on this machine; cached "
              f"in {build_dir})", file=sys.stderr, flush=True)
    load(name=name, sources=[str(CSRC / source)], extra_cflags=_flags(capability), extra_ldflags=["-fopenmp"],
         build_directory=build_dir, verbose=False, is_python_module=False)
    if fresh:
        print(f"dartmamba: built {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return getattr(torch.ops, name)
