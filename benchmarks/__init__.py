"""Benchmark tools (throughput, FLOPs, scaling study, the GPU check); see docs/benchmarks.md. Run from the repository
root as modules (``python -m benchmarks.throughput --help``) or as scripts."""
