#!/usr/bin/env bash
# Issue 10's diagnosis run (gpu_check.sh `profile`, ~1-2 min): ncu's hardware counters for the NF4 decode GEMV and
# the dequantize (benchmarks/gpu_profile.py says why each), then the host profile of eager LoRA / QLoRA calls.
# --clock-control none: the card's clocks are left as they are (never change them). ncu reads counters on the
# Firecracker H200 machines (the device tool's KINDS.md), not on gVisor ones: there the section fails, nothing else.
set -uo pipefail
out="${OUT:-/tmp}"
rc=0
if command -v ncu > /dev/null; then
  for kernel in gemv dequant; do
    case $kernel in gemv) name='regex:nf4_gemv' ;; dequant) name='regex:nf4_dequant' ;; esac
    # launches 1-3 are compiles and first-use checks; the 4th is profiled
    ncu --clock-control none --target-processes all -k "$name" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats \
      python3 benchmarks/gpu_profile.py "$kernel" > "$out/ncu_$kernel.txt" 2>&1 || rc=1
    echo "== ncu $kernel"
    grep -E "nf4_|Duration|DRAM Throughput|Memory Throughput|L2 Hit|Achieved Occupancy|Theoretical Occupancy|Waves Per SM|Registers Per|Warp Cycles Per Issued|Issued Warp|No Eligible|Eligible Warps|Active Warps|Stall|stall|ERR|rror" \
      "$out/ncu_$kernel.txt" | head -60
  done
else
  echo "ncu is not on PATH"; rc=1
fi
echo "== host profile"
python3 benchmarks/gpu_profile.py host || rc=1
exit $rc
