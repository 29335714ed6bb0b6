"""`fastft study`'s arguments and entry point (the subcommand itself is registered in fastft.apps.cli)."""
from __future__ import annotations

import argparse
import os
import sys

from fastft.apps.given_flags import ListedOnce
from fastft.apps.study.models import HEAD_FAMILIES, MODEL_FAMILIES
from fastft.apps.study.runner import LR_DEFAULTS, STEPS_DEFAULT, StudyConfig, plan, quick_config, unavailable_reason
from fastft.apps.study.tasks import REGIMES, STUDY_TASKS
from fastft.integration.methods import METHODS

DESCRIPTION = """Every fine-tuning method on six real classification tasks, accuracy beside speed and memory.
Cells: methods × tasks × models × regimes × seeds (+ peft's own implementation as the accuracy anchor).
Each cell's result is a file in OUTPUT_DIR/cells: a killed study resumes where it stopped.
Writes OUTPUT_DIR/report.md, plots/*.png, results.json (python -m fastft.apps.study.report
OUTPUT_DIR/results.json draws the report again). Exits 1 when no cell scored, 2 on bad settings."""


def _lr_table() -> str:
    return "; ".join(f"{m} {a:g}/{b:g}" for m, (a, b) in LR_DEFAULTS.items())


def _parse_lr(values: list[str]) -> dict:
    """`--lr 1e-3` (every method) or `--lr lora=1e-3 full=5e-5`; a method's own rate wins over a bare one, in
    whichever order they are given."""
    every, named = {}, {}
    for v in values:
        name, _, rate = v.rpartition("=")
        try:
            value = float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr: expected RATE or METHOD=RATE, got {v!r}") from None
        if name:
            if name in named and named[name] != value:  # the last one silently won
                raise argparse.ArgumentTypeError(f"--lr: {name} given twice ({name}={named[name]:g}, {v}); keep one")
            named[name] = value
        else:
            every = dict.fromkeys(METHODS, value)
    return {**every, **named}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a small study (MiniLM; subj, sms-spam; lora, full, ia3, prompt, dora; 32 per class; one "
                        "seed; 16 steps of 8 × 32 tokens): minutes on a CPU. Other flags given override it")
    listed = {"nargs": "+", "action": ListedOnce}   # a list flag given once (argparse kept the last of two)
    p.add_argument("--methods", **listed, choices=METHODS, help=f"default: all ({', '.join(METHODS)})")
    p.add_argument("--tasks", **listed, choices=STUDY_TASKS, help=f"default: all ({', '.join(STUDY_TASKS)})")
    p.add_argument("--models", **listed, choices=MODEL_FAMILIES, help="default: both (minilm, smollm2)")
    p.add_argument("--regimes", **listed, choices=REGIMES, help="default: both (32-per-class, full)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default 3)")
    p.add_argument("--steps", type=int, help="training steps per cell (default per regime: "
                                             + ", ".join(f"{k} {v}" for k, v in STEPS_DEFAULT.items()) + ")")
    p.add_argument("--batch-size", type=int, help="default 16")
    p.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    p.add_argument("--lr", **listed, metavar="[METHOD=]RATE",
                   help=f"learning rate for every method, or per method; defaults (MiniLM/SmolLM2): {_lr_table()}")
    p.add_argument("--head-lr", type=float, help="MiniLM's fresh classification head, every method (default 3e-3; "
                                                 "SmolLM2 has no new head)")
    p.add_argument("--evals", type=int, help="dev evaluations per cell; the best is tested (default 6)")
    p.add_argument("--max-dev", type=int, help="evaluate on N dev rows, each class its share (default: all)")
    p.add_argument("--max-test", type=int, help="test on N test rows, each class its share (default: all)")
    p.add_argument("--with-peft", dest="with_peft", action="store_true", default=None,
                   help="run peft's own implementation of each method beside fastft's (default)")
    p.add_argument("--no-peft", dest="with_peft", action="store_false",
                   help="fastft's implementation of each method only, without peft's beside it (the accuracy "
                        "anchor)")
    p.add_argument("--output-dir", type=os.path.expanduser,  # '~' in --output-dir=~/x too (the shell leaves it)
                   help="default runs/study (runs/study-quick with --quick)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice; on a busy CPU, 1 is often fastest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plan", action="store_true", help="print the cells and training steps it would run, then stop")


def config_from_args(args, parser: argparse.ArgumentParser) -> StudyConfig:
    names = ("methods", "tasks", "models", "regimes", "seeds", "steps", "batch_size", "max_length", "head_lr",
             "evals", "max_dev", "max_test", "with_peft", "output_dir")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    for n in ("methods", "tasks", "models", "regimes"):
        if n in given:
            given[n] = tuple(dict.fromkeys(given[n]))
    if args.lr:
        try:
            given["lr"] = _parse_lr(args.lr)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
    config = quick_config(**given) if args.quick else StudyConfig(**given)
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    idle = [v for v in args.lr or () if v.rpartition("=")[0] and v.rpartition("=")[0] not in config.methods]
    if idle:
        print(f"note: --lr {' '.join(idle)} is not used (not in the methods run: {', '.join(config.methods)})")
    if args.head_lr is not None and not set(config.models) & set(HEAD_FAMILIES):
        print(f"note: --head-lr is not used (only {', '.join(HEAD_FAMILIES)} has a fresh classification head; "
              f"--models: {', '.join(config.models)})")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    for n in ("max_dev", "max_test"):
        if getattr(config, n) is not None and getattr(config, n) < 1:
            parser.error(f"--{n.replace('_', '-')} must be at least 1, got {getattr(config, n)}")
    cells = plan(config)
    if all(unavailable_reason(spec) for spec, _ in cells):   # it would record them and exit, having run nothing
        peft = "" if config.with_peft else ", or drop --no-peft to run peft's implementation"
        parser.error(f"--methods {' '.join(config.methods)} with --models {' '.join(config.models)}: no cell of "
                     f"this plan can run ({unavailable_reason(cells[0][0])}); add a method or a model{peft}")
    return config


def describe_plan(config: StudyConfig) -> str:
    from collections import Counter

    cells = plan(config)
    count, steps, unavailable = Counter(), Counter(), Counter()
    for spec, settings in cells:
        if unavailable_reason(spec):  # recorded without running: no steps
            unavailable[f"{spec.model} {spec.method} ({spec.implementation})"] += 1
            continue
        count[(spec.model, spec.implementation)] += 1
        steps[spec.model] += settings.steps
    lines = [f"{len(cells)} cells, {sum(steps.values()):,} training steps of batch {config.batch_size} × "
             f"≤{config.max_length} tokens, into {config.output_dir}"]
    for model in config.models:
        lines.append(f"  {model}: " + ", ".join(f"{count[(model, impl)]} {impl}" for impl in ("fastft", "peft")
                                                 if count[(model, impl)]) + f"; {steps[model]:,} steps")
    if unavailable:
        lines.append("  unavailable, recorded without running: "
                     + ", ".join(f"{n} {name}" for name, n in unavailable.items()))
    return "\n".join(lines)


def run(args, parser: argparse.ArgumentParser) -> int:
    import torch

    from fastft.apps.study.report import write_report
    from fastft.apps.study.runner import OutputDirInUse, check_inputs, holding_output_dir, run_study

    config = config_from_args(args, parser)
    if args.plan:
        print(describe_plan(config))
        return 0
    try:
        check_inputs(config)   # a missing model or data package: one line now, not a failed cell per cell later
    except ValueError as e:
        parser.error(str(e))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with holding_output_dir(config.output_dir):
            results = run_study(config, progress=not args.no_progress)
            paths = write_report(results, config.output_dir)
    except OutputDirInUse as e:
        parser.error(str(e))
    finally:  # a caller in the same process (a test) keeps its own setting
        torch.set_num_threads(threads)
    print(f"report: {paths['report']}")
    statuses = sorted({cell["status"] for cell in results["cells"]})
    if "done" not in statuses:
        print(f"fastft study: none of the {len(results['cells'])} cells scored (every cell is {'/'.join(statuses)}: "
              "see the report's cells without a score)", file=sys.stderr)
        return 1
    return 0
