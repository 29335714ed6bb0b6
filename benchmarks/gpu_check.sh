#!/usr/bin/env bash
# The one prepared GPU script: run from the repo root on the GPU machine (torch, triton, transformers, peft,
# pybind11, scikit-build-core, cmake, nvcc preinstalled; no network). Carry `.peers` (bash
# ../shared/gpu/fetch-peers.sh) for bitsandbytes as a peer. Correctness comes first in every section, then
# timings; a failing section does not stop the next, and each gets what is left of the time budget.
#   bash benchmarks/gpu_check.sh [section ...]    sections: build nf4 attention lora-tests lora
#   (on request: nf4-tests attention-tests train-tests train)
set -uo pipefail
export PYTHONPATH="$PWD/.peers:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: "${OUT:=/tmp/fastft-out}"; mkdir -p "$OUT"; export OUT
budget="${FASTFT_GPU_BUDGET:-560}"   # seconds for all sections together
sections="${*:-build nf4 attention lora-tests lora}"
start=$SECONDS
status=0

run() {  # run CAP NAME CMD...: at most CAP seconds and never past the budget; output tee'd to $OUT/NAME.txt
  local cap=$1 name=$2; shift 2
  local left=$(( budget - (SECONDS - start) ))
  (( left < cap )) && cap=$left
  if (( cap < 15 )); then echo "== $name: skipped, time budget spent"; status=1; return; fi
  echo "== $name (≤ ${cap}s, at $(( SECONDS - start ))s)"
  timeout "$cap" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v -E "^  [0-9.]+ ms  \{" "$OUT/$name.txt" | tail -n 60
  (( rc != 0 )) && { echo "== $name: exit $rc"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
for s in $sections; do
  case "$s" in
    build) run 120 build python3 -m pip install -q --no-build-isolation --no-deps -e . \
             --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90 ;;
    nf4) run 200 nf4 python3 benchmarks/gpu_nf4.py ;;
    attention) run 170 attention python3 benchmarks/gpu_attention.py ;;
    lora-tests) FASTFT_AUTOTUNE=0 run 70 lora-tests python3 -m pytest -q -m gpu tests/test_lora_gpu.py -p no:cacheprovider ;;
    lora) run 130 lora python3 benchmarks/gpu_lora.py ;;
    nf4-tests) run 150 nf4-tests python3 -m pytest -q -m gpu tests/test_nf4_gpu.py -p no:cacheprovider ;;
    train-tests) run 120 train-tests python3 -m pytest -q -m gpu tests/test_train_gpu.py -p no:cacheprovider ;;
    train) run 300 train python3 benchmarks/gpu_train.py ;;
    attention-tests) FASTFT_AUTOTUNE=0 run 150 attention-tests python3 -m pytest -q -m gpu tests/test_attention_op.py tests/test_attention_integration.py -p no:cacheprovider ;;
    *) echo "unknown section $s"; status=1 ;;
  esac
done
echo "== done in $(( SECONDS - start ))s"
exit $status
