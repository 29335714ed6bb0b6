"""Named model shapes for benchmarks: random-init Llamas of real models' sizes, one table.

`build_model(shape=...)` makes a transformers LlamaForCausalLM with random weights (seeded) directly on the
device; `build_model(model=...)` loads a real checkpoint through `fastft.apps.models.load_causal_lm`.
"""
from __future__ import annotations

import torch

from fastft.integration.checkpointing import enable_checkpointing

# name -> LlamaConfig fields. Sizes from each model's config.json.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                               rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0),   # Llama-3.2-1B
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                     rope_theta=500000.0),   # Llama-3.1-8B
}
DESCRIPTIONS = {"tiny": "2 layers, hidden 64, for CPU smoke runs",
                "smollm2-135m-shape": "SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, vocab 49152",
                "llama-1b": "Llama-3.2-1B: 16 layers, hidden 2048, inter 8192, 32/8 heads, vocab 128256",
                "llama-8b": "Llama-3.1-8B: 32 layers, hidden 4096, inter 14336, 32/8 heads, vocab 128256"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def llama_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len + 64, 2048))


def build_model(*, shape: str | None = None, model: str | None = None, seq_len: int = 2048,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0,
                gradient_checkpointing: bool = False):
    """A fresh causal LM in training mode: random-init `shape` (built on `device`, weights seeded) or the
    real `model` (a built-in name or a local checkpoint); with activation checkpointing if asked."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model is not None:  # the model alone: the bench feeds token ids (a folder without a tokenizer runs)
        from fastft.apps.models import resolve_model_path

        lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=dtype).to(device)
    else:
        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(llama_config(shape, seq_len), dtype=dtype)
    if gradient_checkpointing:
        enable_checkpointing(lm)
    return lm.train()


def vocab_size(model) -> int:
    return model.config.vocab_size
