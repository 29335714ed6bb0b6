"""The settings of a `fastft bench methods` table (the CLI's flags and their defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastft.apps.bench.peers import PEERS
from fastft.apps.bench.shapes import DTYPES, SHAPES
from fastft.apps.compiling import compile_problem
from fastft.apps.models import SMOLLM2, model_problem, rank_problem
from fastft.apps.optimizers import OPTIMIZERS, eight_bit_problem
from fastft.files import output_dir_problem
from fastft.integration.methods import METHODS

RANKED_METHODS = ("lora", "qlora", "dora")   # the methods --rank and --alpha apply to
PROMPT_METHODS = ("prefix", "prompt")         # the methods --num-virtual-tokens applies to


@dataclass
class BenchConfig:
    shape: str = "llama-1b"             # a name in fastft.apps.bench.shapes.SHAPES (random init) ...
    model: str | None = None            # ... or a real model (built-in name or local checkpoint) instead
    methods: tuple[str, ...] = METHODS
    peers: tuple[str, ...] = PEERS      # besides fastft; () for fastft alone
    seq_len: int = 2048
    batch_size: int = 4
    steps: int = 6                      # timed steps (the anchors: mean of 6 steps after 2 warm-ups)
    warmup: int = 2                     # untimed steps first (compilation, autotuning, allocator warm-up)
    gradient_checkpointing: bool = False
    patch_model: bool = True            # fastft rows: apply fastft.patch_model (fused layers, fastft attention)
    dtype: str = "auto"                 # bf16 on CUDA, fp32 on CPU
    rank: int = 16                      # lora, qlora, dora
    alpha: float = 32.0
    num_virtual_tokens: int = 32        # prefix, prompt
    optimizer: str = "adamw"             # fastft.apps.optimizers: every row's, fused AdamW on CUDA by default
    lr: float = 1e-5
    seed: int = 0
    output_dir: str = "bench-results"
    formats: tuple[str, ...] = ("json", "md", "png")   # files written to output_dir
    compile: str = "off"                # a torch.compile mode: each run is then timed eager and compiled
    compile_backend: str = "inductor"

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"--methods: unknown method {', '.join(map(repr, bad)) or '(none given)'}; "
                             f"expected some of {', '.join(METHODS)}")
        bad = [p for p in self.peers if p not in PEERS]
        if bad:
            alone = " (or none alone, for fastft without peers)"
            if bad == ["none"]:
                raise ValueError(f"--peers: none means fastft alone and stands by itself; got {','.join(self.peers)}")
            raise ValueError(f"--peers: unknown peer {', '.join(map(repr, bad))}; expected some of {', '.join(PEERS)}"
                             + alone)
        for name, values in (("methods", self.methods), ("peers", self.peers), ("formats", self.formats)):
            twice = [v for i, v in enumerate(values) if v in values[:i]]
            if twice:
                raise ValueError(f"--{name}: {', '.join(dict.fromkeys(twice))} given twice; name each once")
        if self.model is not None:
            problem = model_problem(self.model, "--model")  # `fastft train --model`'s check
            if problem:
                raise ValueError(problem)
        elif self.shape not in SHAPES:
            raise ValueError(f"--shape: unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a finite number > 0, got {value}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        problem = eight_bit_problem(self.optimizer, torch.cuda.is_available(), "none")
        if problem:
            raise ValueError(problem)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("seq_len", "batch_size", "steps", "rank", "num_virtual_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # torch.manual_seed overflowed in every row
            raise ValueError(f"--seed must be in [0, 2**32 - 1] (numpy's and accelerate's range), got {self.seed}")
        bad = [f for f in self.formats if f not in ("json", "md", "png")]
        if bad or not self.formats:
            raise ValueError(f"--formats: unknown format {', '.join(map(repr, bad)) or '(none given)'}; expected some "
                             "of json, md, png")
        if self.warmup < 1:   # the headline is the mean step: one JIT/autotune step would dominate it
            first = (f"--compile {self.compile} compiles in it" if self.compile != "off"
                     else "it JIT-compiles and autotunes the Triton kernels and warms the allocator")
            raise ValueError(f"--warmup must be at least 1 (the first step is never timed: {first}), "
                             f"got {self.warmup}")
        self._check_rank()
        problem = output_dir_error(self.output_dir)
        if problem:
            raise ValueError(problem)
        problem = compile_problem(self.compile, self.compile_backend, cuda=torch.cuda.is_available())
        if problem:
            raise ValueError(problem)

    def _check_rank(self) -> None:
        """A rank above the hidden size adds nothing a full-rank update lacks and only costs time (a local --model's
        size is read from its config.json; the built-in SmolLM2-135M's is its shape's, before the 15–30 s load)."""
        ranked = [m for m in self.methods if m in RANKED_METHODS]
        if not ranked:
            return
        if self.model is None:
            hidden, what = SHAPES[self.shape]["hidden_size"], f"--shape {self.shape}"
        elif self.model == SMOLLM2:
            hidden, what = SHAPES["smollm2-135m-shape"]["hidden_size"], f"--model {self.model}"
        elif Path(self.model, "config.json").is_file():
            from transformers import AutoConfig

            hidden = getattr(AutoConfig.from_pretrained(self.model).get_text_config(), "hidden_size", None)
            what = f"--model {self.model}"
        else:
            return   # a folder without config.json: model_problem refused it already
        problem = rank_problem(self.rank, hidden, what, ", ".join(ranked))
        if problem:
            raise ValueError(problem)


def output_dir_error(output_dir: str) -> str | None:
    """Why --output-dir cannot hold the results (one line), or None."""
    if not str(output_dir).strip():
        return "--output-dir is empty; give a folder to write the results to (default: bench-results)"
    return output_dir_problem(output_dir)
