"""Imported first by every benchmarks/gpu_*.py, before torch or triton.

FASTFT_BENCH_SMOKE=1 runs a GPU benchmark on the CPU at toy sizes, its Triton kernels through the interpreter
(switched on here, before triton is imported), so that CI (tests/test_*_benchmark.py) catches a script error before
GPU time is spent on it. Also puts the repository root on sys.path: the scripts run from a checkout."""
import os
import sys

SMOKE = os.environ.get("FASTFT_BENCH_SMOKE") == "1"
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cpu" if SMOKE else "cuda"
BACKEND = "triton" if SMOKE else "auto"  # the smoke run forces the kernels (interpreted) over the CPU path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
