#!/usr/bin/env bash
# The one prepared GPU script: run from the repo root on the GPU machine (torch, triton, transformers, peft,
# pybind11, scikit-build-core, cmake, nvcc preinstalled; no network). Carry `.peers` (bash
# ../shared/gpu/fetch-peers.sh) for bitsandbytes as a peer. Correctness comes first in every section, then
# timings; a failing section does not stop the next, and each gets what is left of the time budget.
#   bash benchmarks/gpu_check.sh [section ...]    sections: build nf4 attention lora-tests fuzz-tests lora losses-tests losses
#   (on request: nf4-tests attention-tests methods-tests methods layers-tests layers patch-step train-tests train
#    train-methods-tests compile-tests bench-1b bench-1b-compile bench-8b lora-paths host; `issue10` names the kernel-speed set, correctness first)
set -uo pipefail
export PYTHONPATH="$PWD/.peers:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: "${OUT:=/tmp/fastft-out}"; mkdir -p "$OUT"; export OUT
budget="${FASTFT_GPU_BUDGET:-560}"   # seconds for all sections together
sections="${*:-build nf4 attention lora-tests fuzz-tests lora losses-tests losses}"
# issue10: the tables first, each benchmark checking its kernels against fp64 before timing them (lora-tests
# first: the LoRA GEMM's configs changed most), then the suites. The caps add up to ~27 min, more than one session's
# 15 min of device time: what the budget cuts off is the tail (run it as named sections next time).
sections="${sections//issue10/build lora-tests nf4 lora attention lora-paths attention-tests nf4-tests methods-tests host}"
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
# Optional sections (not in the default list; name them): nf4-tests attention-tests, and the method tables of
# `fastft bench` (random-init models, fastft beside peft / peft+bnb / peft+Liger in the same process; files under
# $OUT/bench-*/bench_methods.json, rewritten after every run so a time-out keeps the finished rows; the table is
# printed last; `python -m fastft.apps.bench.report bench_methods.json` draws table + plot back home). On an H200:
#   bench-1b  llama-1b B4×S2048 bf16, 7 methods × (fastft, peft, Liger): model builds ~2 s each, Triton
#             compiles/tuning in each fastft method's first step ~20–60 s, 4 steps of ~0.1–0.4 s: ~4–7 min.
#             Liger rows run last, so a time-out drops them first (--peers peft to skip them).
#   bench-8b  llama-8b QLoRA B1×S2048 with checkpointing × (fastft, peft+bnb, Liger): an 8B build + NF4
#             quantization ~20–40 s per run, NF4 kernel compiles ~30–60 s, steps ~0.5 s: ~2–3 min.
#   bench-1b-compile  llama-1b lora, qlora × (fastft, peft), each eager and under torch.compile (inductor): the
#             compiled rows add ~1–2 min of compiling each (never run).
# e.g. bash benchmarks/gpu_check.sh bench-1b bench-8b   (or FASTFT_GPU_BUDGET=... with the default sections)
for s in $sections; do
  case "$s" in
    bench-1b) run 420 bench-1b python3 -m fastft.apps.cli bench methods --shape llama-1b --seq-len 2048 \
                --batch-size 4 --methods lora,qlora,full,dora,prefix,prompt,ia3 --steps 3 --warmup 1 \
                --formats json --output-dir "$OUT/bench-1b" ;;
    bench-1b-compile) run 420 bench-1b-compile python3 -m fastft.apps.cli bench methods --shape llama-1b \
                --seq-len 2048 --batch-size 4 --methods lora,qlora --peers peft --steps 3 --warmup 1 --compile default \
                --formats json --output-dir "$OUT/bench-1b-compile" ;;
    bench-8b) run 200 bench-8b python3 -m fastft.apps.cli bench methods --shape llama-8b --seq-len 2048 \
                --batch-size 1 --methods qlora --gradient-checkpointing --steps 3 --warmup 1 \
                --formats json --output-dir "$OUT/bench-8b" ;;
    build) run 120 build python3 -m pip install -q --no-build-isolation --no-deps -e . \
             --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90 ;;
    nf4) run 200 nf4 python3 benchmarks/gpu_nf4.py ;;
    attention) run 170 attention python3 benchmarks/gpu_attention.py ;;
    lora-tests) FASTFT_AUTOTUNE=0 run 170 lora-tests python3 -m pytest -q -m gpu tests/test_lora_gpu.py -p no:cacheprovider ;;
    fuzz-tests) FASTFT_AUTOTUNE=0 run 120 fuzz-tests python3 -m pytest -q -m gpu tests/fuzz -p no:cacheprovider ;;
    lora) run 130 lora python3 benchmarks/gpu_lora.py ;;
    # LoRA split vs fold (x·Aᵀ, dy·B inside the GEMMs): both paths vs fp64, then fwd / bwd / fwd+bwd and host time at
    # M=8192, the three shapes, r 8/16/64; prints the MEASURED entries for fastft/ops/lora_path.py (~3–4 min with
    # compiles and tuning). The GPU tests of the fold path are in lora-tests and fuzz-tests.
    lora-paths) run 300 lora-paths python3 benchmarks/gpu_lora_paths.py ;;
    # host time of each fused op's eager fwd+bwd at tiny shapes: launches stubbed (fastft's Python) and real (+ Triton's
    # launch path); the gap says whether bypassing JITFunction.run is worth it (~30 s with compiles)
    host) run 90 host python3 benchmarks/host_overhead.py ;;
    nf4-tests) run 180 nf4-tests python3 -m pytest -q -m gpu tests/test_nf4_gpu.py tests/test_qlora_path.py -p no:cacheprovider ;;
    losses-tests) run 120 losses-tests python3 -m pytest -q -m gpu tests/test_linear_losses_gpu.py -p no:cacheprovider ;;
    losses) run 150 losses python3 benchmarks/gpu_losses.py ;;
    train-tests) run 120 train-tests python3 -m pytest -q -m gpu tests/test_train_gpu.py -p no:cacheprovider ;;
    train) run 300 train python3 benchmarks/gpu_train.py ;;
    # every method through `fastft train`, patched (--patch-model auto) in bf16; patched vs unpatched losses
    train-methods-tests) run 300 train-methods-tests python3 -m pytest -q -m gpu tests/test_train_methods.py -p no:cacheprovider ;;
    attention-tests) FASTFT_AUTOTUNE=0 run 150 attention-tests python3 -m pytest -q -m gpu tests/test_attention_op.py tests/test_attention_integration.py -p no:cacheprovider ;;
    methods-tests) FASTFT_AUTOTUNE=0 run 120 methods-tests python3 -m pytest -q -m gpu tests/test_methods_gpu.py -p no:cacheprovider ;;
    # every fused op under torch.compile on the GPU: mode="reduce-overhead" (CUDA graphs) vs eager, capture refusals
    compile-tests) run 300 compile-tests python3 -m pytest -q -m gpu tests/test_compile_ops.py tests/test_compile_layers.py tests/test_compile_lora.py tests/test_compile_attention.py tests/test_compile_losses.py tests/test_train_compile.py -p no:cacheprovider ;;
    methods) run 150 methods python3 benchmarks/gpu_methods.py ;;
    # layer ops and patch_model; not in the default list (time): gpu_check.sh layers-tests layers patch-step
    layers-tests) run 120 layers-tests python3 -m pytest -q -m gpu tests/test_layer_ops.py tests/test_patch_model.py -p no:cacheprovider ;;
    layers) run 150 layers python3 benchmarks/gpu_layers.py ;;
    patch-step) FASTFT_STEP_TIMEOUT=100 run 330 patch-step python3 benchmarks/gpu_patch_step.py ;;
    *) echo "unknown section $s"; status=1 ;;
  esac
done
echo "== done in $(( SECONDS - start ))s"
exit $status
