"""dartmamba.runtime.tune_cpu_allocator: with glibc, freed tensors' memory is reused instead of refaulted; the
opt-out leaves malloc alone. Each case runs in a fresh interpreter (the setting is process-wide)."""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the allocator settings are glibc's")

# Rounds of twenty 2.4 MiB tensors written and freed together, as a Vim-Ti layer at batch 8 frees its temporaries:
# with glibc's defaults the freed heap top (48 MiB) exceeds the trim threshold (twice the largest mmapped block),
# so each round returns it to the system and faults it in again (12,288 pages; measured 12,256 with glibc 2.36).
_PROBE = r"""
import json, resource, sys
import torch
from dartmamba.runtime import tune_cpu_allocator
line = tune_cpu_allocator() if sys.argv[1] == "tune" else None
def round_():
    tensors = [torch.empty(629146).fill_(1.0) for _ in range(20)]
    del tensors
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"line": line, "faults_per_round": faults, "again": tune_cpu_allocator() if line else None}))
"""


def _probe(mode: str, **env) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tuned_malloc_reuses_freed_tensors_memory():
    default = _probe("default")
    tuned = _probe("tune")
    assert tuned["line"].startswith("glibc malloc: mmap threshold 32 MiB, trim threshold 512 MiB"), tuned["line"]
    assert tuned["again"] == tuned["line"]                      # once per process; the same line after
    # 48 MiB per round is 12,288 pages: the defaults fault most of them in again, the tuned heap keeps them
    assert default["faults_per_round"] > 6000, default
    assert tuned["faults_per_round"] < 100, tuned


def test_opt_out_leaves_malloc_alone():
    out = _probe("tune", DARTMAMBA_TUNE_MALLOC="0")
    assert out["line"] == "malloc left as it is (DARTMAMBA_TUNE_MALLOC=0)"
    assert out["faults_per_round"] > 6000, out
