"""The `fastft` command line."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from fastft.apps.datasets import TASK_NAMES
from fastft.apps.train import TrainConfig


def _add_train(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help="LoRA fine-tune a causal LM on a labelled text task (defaults: SmolLM2-135M on MR)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="built-in 'smollm2-135m' or a local transformers checkpoint dir")
    p.add_argument("--task", default=d.task, choices=TASK_NAMES)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--target-modules", nargs="+", default=list(d.target_modules))
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--eval-examples", type=int, default=d.eval_examples)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--quantize", default=d.quantize, choices=["nf4"],
                   help="QLoRA: quantize the base linear layers to NF4 first (lm_head stays dense)")


def _add_bench(sub) -> None:
    from fastft.apps.bench.config import BenchConfig
    from fastft.apps.bench.kernels import FAMILIES
    from fastft.apps.bench.peers import PEERS
    from fastft.apps.bench.shapes import DTYPES, SHAPES
    from fastft.integration.methods import METHODS

    d = BenchConfig()
    p = sub.add_parser("bench", help="tokens/s, step time, peak memory and trainable parameters per fine-tuning "
                       "method beside the peers (methods, the default), or the kernel micro-benchmarks (kernels)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", nargs="?", choices=("methods", "kernels"), default="methods",
                   help="methods: the end-to-end training-step table; kernels: benchmarks/gpu_*.py (CUDA only)")
    p.add_argument("--shape", default=d.shape, choices=list(SHAPES), help="random-init model of this shape")
    p.add_argument("--model", default=d.model,
                   help="a real model instead of --shape: 'smollm2-135m' or a local checkpoint dir")
    p.add_argument("--methods", nargs="+", default=",".join(d.methods), metavar="METHOD",
                   help=f"methods to run, space- or comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--peers", nargs="+", default=",".join(d.peers), metavar="PEER",
                   help=f"peers to run beside fastft, from: {', '.join(PEERS)}; 'none' for fastft alone")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--steps", type=int, default=d.steps, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before them")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing per layer")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rank", type=int, default=d.rank, help="lora/qlora/dora rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="lora/qlora/dora alpha")
    p.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens, help="prefix/prompt tuning")
    p.add_argument("--seed", type=int, default=d.seed, help="model weights and token ids")
    p.add_argument("--output-dir", default=d.output_dir,
                   help="where bench_methods.{json,md,png} (or <family>.json for kernels) go")
    p.add_argument("--family", default="all", choices=[*FAMILIES, "all"], help="kernels: which benchmark family")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastft", description="fastft: fast LoRA / QLoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from fastft.apps.bench.command import run_bench

        return run_bench(args)
    if args.command == "train":
        from fastft.apps.train import train

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in vars(args).items() if k in fields}
        values["target_modules"] = tuple(values["target_modules"])
        for name in ("steps", "batch_size", "rank", "max_length", "eval_examples", "eval_batch_size"):
            if values[name] < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1, got {values[name]}")
        if values["max_length"] < 8:
            parser.error(f"--max-length must be at least 8, got {values['max_length']}")
        train(TrainConfig(**values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
