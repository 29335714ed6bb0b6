#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: `fastft train` with its embedded defaults
# (LoRA on SmolLM2-135M, MR movie-review sentiment). Extra arguments go to `fastft train`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec fastft train "$@"
