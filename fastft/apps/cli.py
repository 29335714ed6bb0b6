"""The `fastft` command line. User errors (bad settings, missing or malformed files) print one line and exit
with status 2, before any model is loaded; a run that has to stop (non-finite loss, out of memory) prints one
line and exits with status 1."""
from __future__ import annotations

import argparse
import sys

import fastft
from fastft.apps.training.config import ConfigError, add_train_arguments, config_from_args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastft", description="fastft: fast LoRA / QLoRA fine-tuning")
    parser.add_argument("--version", action="version", version=f"fastft {fastft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage="fastft train [options]   (fastft train --help lists them with their defaults)",
        help="fine-tune a causal LM (defaults: LoRA on SmolLM2-135M, MR sentiment)",
        description="Fine-tune a causal LM: sft/dpo/distill objectives, on built-in data or your jsonl, with "
                    "packing, exact gradient accumulation, checkpoints and --resume; DDP/FSDP2 through "
                    "accelerate (torchrun --nproc_per_node N -m fastft.apps.cli train ...).")
    add_train_arguments(train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from fastft.apps.training import TrainingStopped, train, validate

        train_parser = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
        try:
            train(validate(config_from_args(train_parser, args, argv)))
        except ConfigError as e:
            print(f"fastft train: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (TrainingStopped, NotImplementedError) as e:
            print(f"fastft train: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
