#!/usr/bin/env bash
# Puts the pure-Python test packages the GPU machine lacks into ./.peers beside the peers of
# ../shared/gpu/fetch-peers.sh (run that first: it recreates the folder): hypothesis (tests/fuzz imports it: without
# it gpu_check.sh's fuzz-tests cannot collect) and pytest-xdist (kernel-tests' 4 workers). Needs PyPI; the GPU
# machine has none. Carry `.peers` to the device run.
set -euo pipefail
dest=.peers
mkdir -p "$dest"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp" \
  hypothesis==6.170.17 sortedcontainers==2.4.0 pytest-xdist==3.8.0 execnet==2.1.2
for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$dest"; done
rm -rf "$tmp"
du -sh "$dest"
