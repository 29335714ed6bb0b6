"""The `fastft` command line: train, bench, study. User errors (bad settings, missing or malformed files) print
one line and exit with status 2, before any model is loaded; a run that has to stop (non-finite loss, out of
memory) prints one line and exits with status 1."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# bitsandbytes (imported by peft, below) logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip
# install kernels" at every start on CPUs with AVX512-BF16 when the optional `kernels` package is absent: about its
# own CPU 4-bit GEMM, which fastft never calls. Printed above `--help` and every one-line error, it read as a failure.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import fastft  # noqa: E402  (quick: fastft loads its modules on first use)

# torch, transformers and peft load when the parser is built (seconds): below, inside `command`'s Ctrl-C handling.


def _add_train(sub) -> argparse.ArgumentParser:
    from fastft.apps.training.arguments import add_train_arguments

    train = sub.add_parser(
        "train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage="fastft train [options]   (fastft train --help lists them with their defaults)",
        help="fine-tune a causal LM (defaults: LoRA on SmolLM2-135M, MR sentiment)",
        description="Fine-tune a causal LM: sft/dpo/distill objectives, on built-in data or your jsonl, with "
                    "packing, exact gradient accumulation, checkpoints and --resume; DDP/FSDP2 through "
                    "accelerate (torchrun --nproc_per_node N -m fastft.apps.cli train ...).")
    add_train_arguments(train)
    return train


def _add_bench(sub) -> None:
    from fastft.apps.bench.command import add_bench_parser

    add_bench_parser(sub)


def _add_study(sub) -> argparse.ArgumentParser:
    from fastft.apps.study.command import DESCRIPTION, add_arguments

    p = sub.add_parser("study", help="every method × six real tasks × two models: accuracy beside speed and memory",
                       usage="fastft study [options]   (fastft study --help lists them)",  # an error's one line
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `fastft` parser, and the subcommands' parsers that read their own arguments again or name themselves in
    errors (`fastft study: error: ...`)."""
    parser = argparse.ArgumentParser(prog="fastft", description="fastft: fast fine-tuning of transformer LLMs")
    parser.add_argument("--version", action="version", version=f"fastft {fastft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = _add_train(sub)
    _add_bench(sub)
    study = _add_study(sub)
    return parser, {"train": train, "study": study}


class InterruptedWhileStarting(KeyboardInterrupt):
    """Ctrl-C while the parser was built (torch, transformers and peft imported): before anything ran."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, commands = _parser()
    except KeyboardInterrupt:
        raise InterruptedWhileStarting from None
    args = parser.parse_args(argv)
    if args.command == "bench":
        from fastft.apps.bench.command import run_bench

        return run_bench(args, argv)
    if args.command == "study":
        from fastft.apps.study.command import run as run_study

        return run_study(args, commands["study"])
    if args.command == "train":
        from fastft.apps.training import ConfigError, TrainingStopped, train, validate
        from fastft.apps.training.arguments import config_from_args

        config = None  # (a Ctrl-C while the settings are read: none to name a checkpoint from)
        try:
            config = config_from_args(commands["train"], args, argv)
            validate(config)  # the settings' errors first; train gets them as given (its config.yaml keeps those)
            train(config)
        except ConfigError as e:
            print(f"fastft train: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (TrainingStopped, NotImplementedError) as e:
            print(f"fastft train: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C: the cleanup ran (finally blocks); one line, as every other stop
            print(f"fastft train: interrupted (Ctrl-C){_after_train_interrupt(config)}",
                  file=sys.stderr)
            return 130
    return 0


def _after_train_interrupt(config) -> str:
    """What continues an interrupted `fastft train`: --resume from its newest checkpoint, or, before the first one,
    the command again (--resume on an --output-dir not made yet is refused: the line must not send the user there)."""
    from fastft.apps.training.checkpoints import Checkpoints

    last = Checkpoints(config.output_dir, None).latest() if config is not None else None
    if last is not None:
        return f"; `fastft train ... --resume` continues from its last checkpoint, {last}"
    if config is None:
        return "; `fastft train ... --resume` continues from the last checkpoint, if one was written"
    out = Path(config.output_dir)
    where = f"none in {out / 'checkpoints'}" if out.is_dir() else f"{out} not made yet"
    return f" before its first checkpoint ({where}); run the same command again to start over"


# what the same command does after a Ctrl-C of `fastft bench` / `fastft study` (train says its own in main)
RESUMES = {"bench": "the same command resumes the table (bench_methods.json keeps the finished rows)",
           "bench kernels": "the same command runs the kernel benchmarks again",
           "study": "the same command resumes it (--output-dir's cells/ keeps the finished cells)"}


def command(argv: list[str] | None = None) -> int:
    """The `fastft` program (`python -m fastft.apps.cli` too): main, then the process group of torchrun's processes
    is taken down. One left to the interpreter's exit can abort a process whose run had finished (gloo's threads:
    "terminate called without an active exception", SIGABRT) and torchrun then reports the launch failed. main()
    itself keeps it: several runs in one process share it. A Ctrl-C of bench or study is one line and status 130, as
    train's (main lets it through: a caller in the same process, a test, stops as a kill would stop it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except InterruptedWhileStarting:
        print("fastft: interrupted (Ctrl-C) while starting; nothing was run or written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        name = next((a for a in argv if not a.startswith("-")), None)
        if name not in RESUMES:
            raise
        resumes = RESUMES["bench kernels" if name == "bench" and "kernels" in argv else name]
        print(f"fastft {name}: interrupted (Ctrl-C); {resumes}", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")  # (not imported: no process group; a Ctrl-C may have cut torch's)
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(command())
