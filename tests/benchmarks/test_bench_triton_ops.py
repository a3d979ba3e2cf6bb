"""The GPU check's Triton rows (benchmarks/bench_triton_ops.py) on a CPU: it imports, skips cleanly without a GPU,
and its bound arithmetic and target verdicts are right (the GPU numbers come from benchmarks/gpu_check.sh)."""
import pytest
import torch

from benchmarks import bench_triton_ops as bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert bench.main([]) == 0
    assert "no CUDA device: skipped" in capsys.readouterr().out


def test_bound_and_verdict():
    """1 GB of least traffic at 2,000 GB/s is 0.5 ms; a kernel taking 0.625 ms reaches 80% of the copy bandwidth
    (memory-bound), one taking 2.5 ms 20% (something else bounds it)."""
    row = bench.bound_row({"baseline_ms": 0.625, "triton_ms": 2.5}, 10**9, 2000.0)
    assert row["bound_ms"] == pytest.approx(0.5) and row["min_traffic_mb"] == pytest.approx(1000.0)
    assert row["baseline_bw_share"] == pytest.approx(0.8) and row["triton_bw_share"] == pytest.approx(0.2)
    assert bench.verdict(row).startswith("not memory-bound: 20% of copy bandwidth")
    row["triton_bw_share"] = 0.75
    assert bench.verdict(row) == "memory-bound (75% of copy bandwidth)"
    assert bench.verdict(bench.bound_row({}, 10, None)) == "-"           # no CUDA: no bandwidth measured
    args = bench.parse_args([])
    assert (args.batch, args.length, args.d_inner, args.dstate, args.dtype) == (256, 197, 768, 16, "bf16")
