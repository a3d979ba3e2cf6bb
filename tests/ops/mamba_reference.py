"""mamba-ssm's own reference scan, ``selective_scan_ref``, read from its source distribution at test time (never
committed here): PyPI's sdist of mamba-ssm 2.3.1, downloaded by pip into a cache once per machine.

    python -m tests.ops.mamba_reference        # fetch the sdist into the cache (scripts/test.sh does this)

Lookup order: ``DARTMAMBA_MAMBA_SSM_SDIST`` (the .tar.gz, or a folder holding it), then the cache
(``$XDG_CACHE_HOME/dartmamba/sdists``, default ``~/.cache/...``), then ``pip download`` into the cache (PyPI
only; the metadata step needs ``--no-build-isolation`` with mamba-ssm's CUDA build skipped). :func:`load` returns
the function, or raises :class:`Unavailable` saying why.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "2.3.1"
SDIST = f"mamba_ssm-{VERSION}.tar.gz"
MEMBER = f"mamba_ssm-{VERSION}/mamba_ssm/ops/selective_scan_interface.py"


class Unavailable(RuntimeError):
    """mamba-ssm's sdist cannot be found or downloaded here."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dartmamba" / "sdists"


def _candidates() -> list[Path]:
    found = []
    given = os.environ.get("DARTMAMBA_MAMBA_SSM_SDIST")
    if given:
        path = Path(given)
        found.append(path / SDIST if path.is_dir() else path)
    found.append(cache_dir() / SDIST)
    return found


def fetch(timeout: float = 300.0) -> Path:
    """The sdist's path, downloading it with pip into the cache when no copy exists."""
    for path in _candidates():
        if path.is_file():
            return path
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", MAMBA_FORCE_BUILD="TRUE")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
           "--quiet", f"mamba-ssm=={VERSION}", "-d", str(target)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"pip download of mamba-ssm=={VERSION} failed: {exc}") from None
    if done.returncode != 0 or not (target / SDIST).is_file():
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise Unavailable(f"pip download of mamba-ssm=={VERSION} failed (exit {done.returncode}): {tail}")
    return target / SDIST


def load(timeout: float = 300.0):
    """mamba-ssm's ``selective_scan_ref``, compiled from the sdist's source alone (its module imports the CUDA
    extension, so the function is taken out by its syntax tree and run with torch, F, rearrange and repeat)."""
    import torch
    import torch.nn.functional as F
    from einops import rearrange, repeat

    path = fetch(timeout)
    with tarfile.open(path) as archive:
        source = archive.extractfile(MEMBER).read().decode()
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref"), None)
    if node is None:
        raise Unavailable(f"{SDIST} has no selective_scan_ref in {MEMBER}")
    namespace = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
    exec(compile(ast.Module(body=[node], type_ignores=[]), f"{SDIST}:{MEMBER}", "exec"), namespace)  # noqa: S102
    return namespace["selective_scan_ref"]


if __name__ == "__main__":
    try:
        print(f"mamba-ssm {VERSION} sdist: {fetch()}")
    except Unavailable as exc:
        print(f"warning: {exc}; tests/ops/test_mamba_reference.py will skip", file=sys.stderr)
