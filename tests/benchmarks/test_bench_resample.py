"""benchmarks/bench_resample.py on CPU: its refusal without a GPU, and its smoke run (Triton interpreter), whose
numbers mean nothing as timings but whose bookkeeping and sanity check are real."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

pytest.importorskip("triton")
BENCH = REPO / "benchmarks" / "bench_resample.py"


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_unless_smoke():
    result = run()
    assert result.returncode == 2
    assert "bench_resample: no CUDA device" in result.stderr and "--smoke" in result.stderr


def test_smoke_run_tables_and_fusion_bound(tmp_path):
    out = tmp_path / "resample.json"
    result = run("--smoke", "--dtypes", "fp32", "--embed-dim", "96", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["tokens"], r["impl"]) for r in rows} == {(n, i) for n in (16, 24)
                                                        for i in ("reference", "torch", "triton", "triton-det")}
    for r in rows:
        assert r["max_abs_err_vs_torch"] < 1e-5          # the kernel's forward agrees with the torch path
        assert r["fwd_bwd_ms"] > 0
    fusion = data["embed_fusion_bound"]
    assert [(r["tokens"], r["dtype"], r["embed_dim"]) for r in fusion] == [(16, "fp32", 96), (24, "fp32", 96)]
    for r in fusion:
        assert r["max_saving_pct"] == pytest.approx(100 * r["round_trip_ms"] / (r["resample_ms"] + r["gemm_ms"]))
    text = result.stdout
    # gpu_check.sh keeps the block from the last "###" heading: both tables must be in it
    last = text[text.rindex("### "):]
    assert last.startswith("### DART resampling, CPU (Triton interpreter)")
    assert "| N | dtype | implementation |" in last and "max saving, % of resample + GEMM" in last
