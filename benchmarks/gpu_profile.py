"""Diagnosis driver for issue 10's unexplained gaps, run by benchmarks/gpu_profile.sh (gpu_check.sh `profile`).

    python benchmarks/gpu_profile.py gemv | dequant    the kernel ncu profiles, launched LAUNCHES times
    python benchmarks/gpu_profile.py host               cProfile of eager LoRA and QLoRA fwd+bwd, real launches
    python benchmarks/gpu_profile.py summarize RAW.csv  the key metrics of `ncu --import R --page raw --csv`

gemv: the CUDA NF4 decode GEMV, TABLE variant (the tuner's pick on the H200; GEMV_VARIANT=NAME profiles another
nf4_cuda variant, e.g. TABLE_DEEP_K2), bf16, 4096->14336, batch 1: 27.5 us, 23% of HBM, and its SASS is 5.1
instructions a weight element (not issue-bound): ncu's warp stalls say what is. On the H100 (2026-12-05): 3 blocks an
SM (79 registers, 38 KB shared), 2.26 waves, 4 steps a warp (docs/gpu-results.md).
dequant: the Triton dequantize at 4096x14336 with the tuner's default config (ROW4, 4096-element blocks, gather decode,
8 warps: 87% of the copy bandwidth as a CUDA-graph replay on the H100, 2026-12-05).
host: at 4096->4096 the LoRA and QLoRA calls are host-bound (QLoRA: 1.49 ms of host a call against 0.91 ms of device
time); with launches stubbed fastft's Python is ~170 us (benchmarks/host_overhead.py), so the rest is Triton's launch
path or a sync: the profile of CALLS calls at M=64 (kernels shorter than the host's work) names the functions.
Prints; writes $OUT/host_profile.txt when OUT is set.
"""
from __future__ import annotations

import cProfile
import csv
import io
import os
import pstats
import re
import sys

import torch

LAUNCHES = 5  # gpu_profile.sh has ncu skip the first 3 (compiles, first-use checks) and profile 1
CALLS = 200


def _nf4(K: int, N: int):
    from fastft.quant import quantize_nf4

    torch.manual_seed(0)
    return quantize_nf4(torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02)


def gemv() -> None:
    from fastft.kernels import nf4_cuda

    if not nf4_cuda.available():  # a fresh machine: fastft._C is built by gpu_check.sh's `build` section
        sys.exit("gpu_profile.py gemv: fastft._C is not built (run `bash benchmarks/gpu_check.sh build profile`)")
    w = _nf4(4096, 14336)
    op, x = w.kernel_operand(), torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    variant = getattr(nf4_cuda, os.environ.get("GEMV_VARIANT", "TABLE"))  # e.g. GEMV_VARIANT=TABLE_DEEP_K2
    for _ in range(LAUNCHES):
        nf4_cuda.nf4_gemv(x, op, None, variant)
    torch.cuda.synchronize()


def dequant() -> None:
    from fastft.kernels.nf4_dequant import _configs, nf4_dequantize

    w = _nf4(14336, 4096)  # W 4096x14336
    op = w.kernel_operand()
    cfg = _configs()[0]  # the tuner's default
    buf = torch.empty(w.numel(), dtype=torch.bfloat16, device="cuda")
    for _ in range(LAUNCHES):
        nf4_dequantize(op.packed, op.absmax, buf.numel(), op.blocksize, torch.bfloat16, op.code,
                       absmax2=op.absmax2, code2=op.code2, offset=op.offset if op.absmax2 is not None else 0.0,
                       nested_blocksize=op.nested_blocksize, config=cfg, out=buf)
    torch.cuda.synchronize()


def host() -> None:
    import fastft

    torch.manual_seed(0)
    K = N = 4096
    x = torch.randn(64, K, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dy = torch.randn(64, N, dtype=torch.bfloat16, device="cuda")
    W = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02
    w = _nf4(K, N)
    A = (torch.randn(16, K, device="cuda") * 0.02).requires_grad_()
    B = (torch.randn(N, 16, device="cuda") * 0.02).requires_grad_()
    cases = {"lora": lambda: fastft.lora_linear(x, W, None, A, B, 2.0).backward(dy),
             "qlora": lambda: fastft.qlora_linear(x, w, None, A, B, 2.0).backward(dy)}
    report = io.StringIO()
    for name, step in cases.items():
        for path in (("dequant", "fused") if name == "qlora" else ("-",)):
            if path != "-":
                os.environ["FASTFT_QLORA_PATH"] = path
            for _ in range(10):  # compiles, tuning, first-use checks
                step()
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            profiler.enable()
            for _ in range(CALLS):
                step()
            profiler.disable()
            end.record()
            torch.cuda.synchronize()
            stats = pstats.Stats(profiler, stream=report)
            title = f"{name}{'' if path == '-' else ' ' + path} M=64 {K}->{N} r=16 bf16"
            report.write(f"\n=== {title}: {stats.total_tt / CALLS * 1e6:.0f} us of host a call "
                         f"(profiled), {start.elapsed_time(end) / CALLS * 1e3:.0f} us a call on the device clock\n")
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
    os.environ.pop("FASTFT_QLORA_PATH", None)
    print(report.getvalue())
    if os.environ.get("OUT"):
        from fastft.files import atomic_write

        atomic_write(os.path.join(os.environ["OUT"], "host_profile.txt"), report.getvalue().encode())


KEY_METRICS = (  # (label, ncu metric): what bounds a memory-bound kernel
    ("duration", "gpu__time_duration.sum"),
    ("DRAM busy (of peak)", "dram__cycles_active.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM read (of peak)", "dram__bytes_read.sum.pct_of_peak_sustained_elapsed"),
    ("DRAM read", "dram__bytes_read.sum.per_second"),
    ("SM % of peak", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("issue slots busy %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("achieved occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("eligible warps / scheduler", "smsp__warps_eligible.avg.per_cycle_active"),
    ("registers / thread", "launch__registers_per_thread"),
    ("waves / SM", "launch__waves_per_multiprocessor"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct"),
)
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def summarize(path: str) -> None:
    """The key metrics and the warp-stall reasons (cycles a warp waits per issued instruction, largest first) of the
    last kernel in an `ncu --page raw --csv` file."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = rows[0]
    data = [r for r in rows[1:] if len(r) == len(header) and r[0].strip().isdigit()]  # skips the units row
    units = dict(zip(header, rows[1])) if len(rows) > 1 and not rows[1][0].strip().isdigit() else {}
    if not data:
        sys.exit(f"{path}: no kernel rows (ncu's message: {' '.join(rows[-1])[:300]})")
    row = dict(zip(header, data[-1]))

    def number(value: str):
        try:
            return float(value.replace(",", ""))
        except ValueError:
            return None
    print(f"kernel {row.get('Kernel Name', '?')[:120]}  grid {row.get('Grid Size')}  block {row.get('Block Size')}")
    for label, metric in KEY_METRICS:
        print(f"  {label:28s} {row.get(metric, 'n/a')} {units.get(metric, '')}".rstrip())
    stalls = sorted(((number(v) or 0.0, m.group(1)) for k, v in row.items() if (m := STALL.match(k))), reverse=True)
    print("  warp stalls (cycles per issued instruction): " + ", ".join(f"{n} {v:.2f}" for v, n in stalls[:8]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "summarize":
        summarize(sys.argv[2])
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1] not in ("gemv", "dequant", "host"):
        sys.exit(__doc__)
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs a CUDA GPU")
    {"gemv": gemv, "dequant": dequant, "host": host}[sys.argv[1]]()
