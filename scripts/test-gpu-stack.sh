#!/usr/bin/env bash
# Runs the CPU test suite under the GPU machine's torch / triton / transformers / peft (requirements/gpu-stack.txt),
# on this CPU machine, before a GPU session spends device time: code written against CI's newer stack (torch 2.13,
# transformers 5.24) can fail there only. The first run installs .venv-gpu-stack (~5.5 GB, PyPI: torch 2.11's CUDA
# wheel and its nvidia-* libraries); later runs reuse it. Not part of CI (the download); run it when a kernel, an
# op's compile path or a transformers integration changed, and before a GPU session. Arguments go to pytest.
# fastft runs from the tree (PYTHONPATH, no compiled extension: it stays optional at import).
#   bash scripts/test-gpu-stack.sh                      the whole suite, 2 workers (~13 min on 2 cores)
#   bash scripts/test-gpu-stack.sh tests/test_x.py -n 0  one file
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTFT_GPU_STACK_VENV:-$root/.venv-gpu-stack}"
# scripts/setup.sh's install, with this stack's pins and no editable install (nor its compiled extension)
FASTFT_VENV="$venv" FASTFT_REQUIREMENTS=requirements/gpu-stack.txt FASTFT_EDITABLE=0 source "$root/scripts/setup.sh"
"$venv/bin/python" -c "import torch, triton, transformers, peft; print('gpu stack: torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
workers="${FASTFT_TEST_WORKERS:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests benchmarks -n "$workers" --dist loadfile --no-loadscope-reorder)
exec "$venv/bin/python" -m pytest -q --benchmark-disable -p no:cacheprovider "${args[@]}"
