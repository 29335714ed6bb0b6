#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite on the CPU (Triton kernels through
# TRITON_INTERPRET=1), plus the CPU benchmarks once each as a smoke test. pytest exits non-zero
# when a test fails or when no test ran (exit 5), and so does this script.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# Two pytest-xdist workers, whole files each (module fixtures load once; tests/conftest.py starts the longest
# files first), one thread each: most tests are single-threaded Python (the Triton interpreter), so two workers
# on CI's 2 cores take ~12 min where one took ~17. FASTFT_TEST_WORKERS=0 runs in one process.
# --no-loadscope-reorder: xdist would otherwise hand out files by test count, most first, and start the one-test
# files that run longest (the quick study, ~3 min) last, alone on one worker while the other idles.
workers="${FASTFT_TEST_WORKERS:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([ "$workers" = 0 ] && nproc || echo 1)}"
exec python -m pytest -q tests benchmarks --benchmark-disable -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
