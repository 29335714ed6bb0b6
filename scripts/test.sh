#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite on the CPU (Triton kernels through
# TRITON_INTERPRET=1), plus the CPU benchmarks once each as a smoke test. pytest exits non-zero
# when a test fails or when no test ran (exit 5), and so does this script.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m pytest -q tests benchmarks --benchmark-disable "$@"
