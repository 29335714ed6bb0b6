"""`fastft bench`: its flags (`add_bench_parser`, called by fastft.apps.cli) and running it from parsed arguments:
the method table (default) or the kernel micro-benchmarks."""
from __future__ import annotations

import argparse
import os
import sys

from fastft.apps.bench.config import PROMPT_METHODS, RANKED_METHODS, BenchConfig, output_dir_error
from fastft.apps.bench.kernels import FAMILIES
from fastft.apps.bench.peers import PEERS
from fastft.apps.bench.shapes import DTYPES, SHAPES
from fastft.apps.compiling import COMPILE_BACKENDS, COMPILE_MODES
from fastft.apps.given_flags import ListedOnce, given_dests
from fastft.apps.optimizers import OPTIMIZERS
from fastft.integration.methods import METHODS


MODES = ("methods", "kernels")


def add_bench_parser(sub) -> None:
    """The `fastft bench` subcommand and its flags (every knob, with its default, in --help), grouped by the mode
    they apply to; the flags of the other mode are refused (run_bench)."""
    d = BenchConfig()
    p = sub.add_parser("bench", help="tokens/s, step time, peak memory and trainable parameters per fine-tuning "
                       "method beside the peers (methods, the default), or the kernel micro-benchmarks (kernels)",
                       usage="fastft bench [methods|kernels] [options]   (fastft bench --help lists them by mode)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # checked in run_bench, not by choices: a misspelled flag's value ("--stepz 2") landed here, and argparse blamed
    # `what` ("invalid choice: '2'") without naming the flag
    p.add_argument("what", nargs="?", default="methods", metavar="{methods,kernels}",
                   help="methods: the end-to-end training-step table; kernels: benchmarks/gpu_*.py (CUDA only)")
    p.add_argument("--output-dir", default=d.output_dir, type=os.path.expanduser,  # '~' in --output-dir=~/x too
                   help="(both modes) where bench_methods.{json,md,png} (or <family>.json for kernels) go")
    modes = {"methods": {}, "kernels": {}}
    m = _Group(p.add_argument_group("methods options (only with `fastft bench` / `fastft bench methods`)"),
               modes["methods"])
    m.add_argument("--shape", default=d.shape, choices=list(SHAPES), help="random-init model of this shape")
    m.add_argument("--model", default=d.model, type=os.path.expanduser,
                   help="a real model instead of --shape: 'smollm2-135m' or a local checkpoint dir")
    m.add_argument("--methods", nargs="+", action=ListedOnce, default=",".join(d.methods), metavar="METHOD",
                   help=f"methods to run, space- or comma-separated, from: {', '.join(METHODS)}")
    m.add_argument("--peers", nargs="+", action=ListedOnce, default=",".join(d.peers), metavar="PEER",
                   help=f"peers to run beside fastft, from: {', '.join(PEERS)}; 'none' for fastft alone")
    m.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    m.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    m.add_argument("--steps", type=int, default=d.steps, help="timed training steps per run")
    m.add_argument("--warmup", type=int, default=d.warmup,
                   help="untimed steps before them (at least 1: the first step JIT-compiles and autotunes)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing per layer")
    m.add_argument("--no-patch-model", dest="patch_model", action="store_false",
                   help="fastft rows without fastft.patch_model (the fused norm/RoPE/GLU/loss patching), to separate "
                        "its gain from the method's (default: patched)%(default).0s")  # .0s: no '(default: True)'
    m.add_argument("--dtype", default=d.dtype, choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU")
    m.add_argument("--rank", type=int, default=d.rank, help="lora/qlora/dora rank (at most the hidden size)")
    m.add_argument("--alpha", type=float, default=d.alpha, help="lora/qlora/dora alpha")
    m.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens, help="prefix/prompt tuning")
    m.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help="every run's optimizer (as fastft train's): adamw (torch's, fused on CUDA; the anchors' "
                        "full fine-tuning), adamw-8bit / paged-adamw-8bit (bitsandbytes: a quarter of the state)")
    m.add_argument("--lr", type=float, default=d.lr,
                   help="AdamW learning rate of every run (small: the table times steps and must not diverge)")
    m.add_argument("--seed", type=int, default=d.seed, help="model weights and token ids")
    m.add_argument("--formats", nargs="+", action=ListedOnce, default=",".join(d.formats), metavar="FORMAT",
                   help="files to write, from json, md, png (python -m fastft.apps.bench.report turns the JSON into "
                        "the others later); the JSON is written while the table is unfinished whatever this says (a "
                        "resume reads it) and removed once it is complete if json is not named")
    m.add_argument("--compile", default=d.compile, choices=COMPILE_MODES, metavar="MODE",
                   help="also time every run under torch.compile with this mode (default, reduce-overhead: CUDA "
                        "graphs, max-autotune): each (method, implementation) then has an eager row and a compiled "
                        f"row (column 'compile'); compilation happens in the warm-up steps. One of: "
                        f"{', '.join(COMPILE_MODES)}")
    m.add_argument("--compile-backend", default=d.compile_backend, choices=COMPILE_BACKENDS,
                   help="--compile's backend (inductor on the CPU needs a C++ compiler; aot_eager: traced graphs run "
                        "by eager torch); not used with --compile off")
    m.add_argument("--fresh", action="store_true",
                   help="measure every run anew, replacing the table in --output-dir (without it, an unfinished "
                        "table of the same settings there is resumed and one of other settings is refused)")
    k = _Group(p.add_argument_group("kernels options (only with `fastft bench kernels`)"), modes["kernels"])
    k.add_argument("--family", default="all", choices=[*FAMILIES, "all"], help="which benchmark family")
    p.set_defaults(_bench_modes=modes)


class _Group:
    """An argument group that also records dest -> action of each flag it adds: run_bench reads from them which of
    a mode's flags were given."""

    def __init__(self, group, flags: dict):
        self.group, self.flags = group, flags

    def add_argument(self, *names, **kwargs):
        action = self.group.add_argument(*names, **kwargs)
        self.flags[action.dest] = action
        return action


def _given(args, argv: list[str]) -> set[str]:
    """The dests of the flags given on the command line, of either mode."""
    return given_dests([a for flags in args._bench_modes.values() for a in flags.values()], argv, "bench")


def _foreign_flag(args, argv: list[str]) -> str | None:
    """The first flag given (at any value) that belongs to the other mode, as an error; None if none."""
    given = _given(args, argv)
    for mode, flags in args._bench_modes.items():
        if mode == args.what:
            continue
        for dest, action in flags.items():
            if dest in given:
                flag = action.option_strings[-1]
                return (f"{flag} applies to `fastft bench {mode}` only, not to `fastft bench {args.what}` (drop it, "
                        f"or run `fastft bench {mode}`; see `fastft bench --help` for each mode's flags)")
    return None


def _unused_flags(args, argv: list[str], cfg: BenchConfig) -> list[str]:
    """A note for each flag given that no benchmarked method reads (as fastft train notes its unused settings)."""
    given = _given(args, argv)
    methods = set(cfg.methods)
    unused = {"rank": not methods & set(RANKED_METHODS), "alpha": not methods & set(RANKED_METHODS),
              "num_virtual_tokens": not methods & set(PROMPT_METHODS), "shape": cfg.model is not None,
              "compile_backend": cfg.compile == "off"}
    why = {"shape": "--model is benchmarked instead", "compile_backend": "--compile is off: nothing is compiled"}
    return [f"note: --{dest.replace('_', '-')} is not used ({why.get(dest, 'no method in --methods reads it')})"
            for dest, idle in unused.items() if idle and dest in given]


def _cpu_scale_note(args, argv: list[str], cfg: BenchConfig, device) -> str | None:
    """A note when a bare `fastft bench` (no --shape, no --model) is about to time a GPU-sized default shape on the
    CPU: a run there takes hours, where the tiny shape times the same methods in seconds."""
    given = _given(args, argv)
    if device.type != "cpu" or cfg.model is not None or "shape" in given or cfg.shape == "tiny":
        return None
    return (f"note: --shape {cfg.shape} (the default) on the CPU: its runs take hours here; for a CPU table in "
            "seconds, run `fastft bench --shape tiny --steps 2 --warmup 1 --seq-len 32 --batch-size 2`")


def _split(values) -> tuple[str, ...]:
    """`--methods lora,qlora dora` -> ("lora", "qlora", "dora")."""
    if isinstance(values, str):
        values = [values]
    return tuple(v.strip() for item in values or () for v in item.split(",") if v.strip())


def config_from_args(args) -> BenchConfig:
    peers = _split(args.peers)
    if not peers:  # as --methods "": "none" says no peers
        raise ValueError("--peers is empty; name peers, or none for fastft's rows alone")
    return BenchConfig(shape=args.shape, model=args.model, methods=_split(args.methods),
                       peers=() if peers == ("none",) else peers, seq_len=args.seq_len, batch_size=args.batch_size,
                       steps=args.steps, warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing,
                       patch_model=args.patch_model,
                       dtype=args.dtype, rank=args.rank, alpha=args.alpha, num_virtual_tokens=args.num_virtual_tokens,
                       optimizer=args.optimizer, lr=args.lr, seed=args.seed, output_dir=args.output_dir,
                       formats=_split(args.formats), compile=args.compile, compile_backend=args.compile_backend)


def run_bench(args, argv: list[str]) -> int:
    """`fastft bench` from its parsed `args` and the command line `argv` they came from (`fastft`'s arguments)."""
    try:
        if args.what not in MODES:
            raise ValueError(f"expected `fastft bench methods` or `fastft bench kernels`, got {args.what!r}")
        problem = _foreign_flag(args, argv)
        if problem:
            raise ValueError(problem)
        if args.what == "kernels":
            from fastft.apps.bench.kernels import run_kernels

            problem = output_dir_error(args.output_dir)
            if problem:
                raise ValueError(problem)
            families = list(FAMILIES) if args.family == "all" else [args.family]
            return run_kernels(families, args.output_dir)
        cfg = config_from_args(args)
        cfg.validate()
        for note in _unused_flags(args, argv, cfg):
            print(note)
        from fastft.apps.bench.methods import default_device
        from fastft.apps.bench.resume import clear_outputs, previous_result

        device = default_device()
        note = _cpu_scale_note(args, argv, cfg, device)
        if note:
            print(note)
        previous = previous_result(cfg, device, fresh=getattr(args, "fresh", False))
    except (ValueError, FileNotFoundError) as err:
        print(f"fastft bench: error: {err}", file=sys.stderr)
        return 2
    from fastft.apps.bench.methods import bench_methods
    from fastft.apps.bench.report import markdown, write_report
    from fastft.apps.bench.resume import drop_unasked_json, formats_per_row

    every_row = formats_per_row(cfg.formats)
    clear_outputs(cfg.output_dir, rewritten=every_row)
    result = bench_methods(cfg, on_row=lambda partial: write_report(partial, cfg.output_dir, every_row),
                           previous=previous)
    paths = write_report(result, cfg.output_dir, cfg.formats)
    drop_unasked_json(cfg.output_dir, cfg.formats)
    print("\n" + markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not any(row["status"] == "ok" for row in result["rows"]):
        print(f"fastft bench: none of the {len(result['rows'])} runs measured anything (every row is "
              f"{'/'.join(sorted({row['status'] for row in result['rows']}))}: see the note column)", file=sys.stderr)
        return 1
    return 0
