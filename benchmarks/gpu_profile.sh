#!/usr/bin/env bash
# Issue 10's diagnosis run (gpu_check.sh `build profile`, ~2 min): ncu's hardware counters for the NF4 decode GEMV
# and the dequantize (benchmarks/gpu_profile.py says why each), after the host profile of eager LoRA / QLoRA calls.
# --clock-control none: the card's clocks are left as they are (never change them). ncu reads counters on the
# Firecracker H200 machines (the device tool's KINDS.md), not on gVisor ones: there the section fails, nothing else.
# Per kernel: the report (ncu_KERNEL.ncu-rep), its details as text and every metric as CSV, then a summary (the
# warp-stall reasons ranked, throughput, occupancy) printed from the CSV.
set -uo pipefail
out="${OUT:-/tmp}"
rc=0
# the host profile first: no ncu, the surest minute of the section (ncu's runs may be cut by the section's cap)
echo "== host profile"
python3 benchmarks/gpu_profile.py host || rc=1
if command -v ncu > /dev/null; then
  for kernel in gemv dequant; do
    case $kernel in gemv) name='regex:nf4_gemv' ;; dequant) name='regex:nf4_dequant' ;; esac
    # launches 1-3 are compiles and first-use checks; the 4th is profiled
    ncu --clock-control none --target-processes all -k "$name" --launch-skip 3 --launch-count 1 --set full \
      -f -o "$out/ncu_$kernel" python3 benchmarks/gpu_profile.py "$kernel" > "$out/ncu_${kernel}_run.txt" 2>&1 || rc=1
    echo "== ncu $kernel"
    if [[ -f "$out/ncu_$kernel.ncu-rep" ]]; then
      ncu --import "$out/ncu_$kernel.ncu-rep" --print-details all > "$out/ncu_$kernel.txt" 2>&1 ||
        ncu --import "$out/ncu_$kernel.ncu-rep" > "$out/ncu_$kernel.txt" 2>&1
      ncu --import "$out/ncu_$kernel.ncu-rep" --page raw --csv > "$out/ncu_${kernel}_raw.csv" 2>&1 || rc=1
      python3 benchmarks/gpu_profile.py summarize "$out/ncu_${kernel}_raw.csv" || rc=1
    else
      tail -n 20 "$out/ncu_${kernel}_run.txt"; rc=1
    fi
  done
else
  echo "ncu is not on PATH"; rc=1
fi
exit $rc
