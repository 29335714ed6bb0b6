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
    from fastft.apps.bench.command import add_bench_parser

    add_bench_parser(sub)


def _add_study(sub) -> None:
    from fastft.apps.study.command import DESCRIPTION, add_arguments

    p = sub.add_parser("study", help="every method × six real tasks × two models: accuracy beside speed and memory",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastft", description="fastft: fast LoRA / QLoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_bench(sub)
    _add_study(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from fastft.apps.bench.command import run_bench

        return run_bench(args)
    if args.command == "study":
        from fastft.apps.study.command import run as run_study

        return run_study(args, parser)
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
