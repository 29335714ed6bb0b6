#!/usr/bin/env bash
# The one prepared GPU script (run from the repo root on the GPU machine, which has torch, triton,
# transformers and peft preinstalled and no network). Correctness first, then timings; every section
# runs even if an earlier one fails, and results land in $OUT. Sections: `bash benchmarks/gpu_check.sh lora`.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: "${OUT:=/tmp/fastft-out}"; mkdir -p "$OUT"; export OUT
sections="${*:-lora}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
status=0
for s in $sections; do
  case "$s" in
    lora)
      FASTFT_AUTOTUNE=0 timeout 200 python3 -m pytest -q -m gpu tests/test_lora_gpu.py -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/pytest-lora.txt" || status=1
      timeout 300 python3 benchmarks/gpu_lora.py 2>&1 | tee "$OUT/bench-lora.txt" | grep -v "^  [0-9]" || status=1 ;;
    *) echo "unknown section $s"; status=1 ;;
  esac
done
exit $status
