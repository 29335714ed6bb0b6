"""`fastft bench`: its flags (`add_bench_parser`, called by fastft.apps.cli) and running it from parsed arguments:
the method table (default) or the kernel micro-benchmarks."""
from __future__ import annotations

import argparse
import sys

from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.kernels import FAMILIES
from fastft.apps.bench.peers import PEERS
from fastft.apps.bench.shapes import DTYPES, SHAPES
from fastft.apps.compiling import COMPILE_BACKENDS, COMPILE_MODES
from fastft.files import output_dir_problem
from fastft.integration.methods import METHODS


def add_bench_parser(sub) -> None:
    """The `fastft bench` subcommand and its flags (every knob, with its default, in --help)."""
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
    p.add_argument("--no-patch-model", dest="patch_model", action="store_false",
                   help="fastft rows without fastft.patch_model (the fused norm/RoPE/GLU/loss patching), to separate "
                        "its gain from the method's (default: patched)%(default).0s")  # .0s: no '(default: True)'
    p.add_argument("--dtype", default=d.dtype, choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rank", type=int, default=d.rank, help="lora/qlora/dora rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="lora/qlora/dora alpha")
    p.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens, help="prefix/prompt tuning")
    p.add_argument("--seed", type=int, default=d.seed, help="model weights and token ids")
    p.add_argument("--output-dir", default=d.output_dir,
                   help="where bench_methods.{json,md,png} (or <family>.json for kernels) go")
    p.add_argument("--formats", nargs="+", default=",".join(d.formats), metavar="FORMAT",
                   help="files to write, from json, md, png (python -m fastft.apps.bench.report turns the JSON into "
                        "the others later)")
    p.add_argument("--compile", default=d.compile, choices=COMPILE_MODES, metavar="MODE",
                   help="also time every run under torch.compile with this mode (default, reduce-overhead: CUDA "
                        "graphs, max-autotune): each (method, implementation) then has an eager row and a compiled "
                        f"row (column 'compile'); compilation happens in the warm-up steps. One of: "
                        f"{', '.join(COMPILE_MODES)}")
    p.add_argument("--compile-backend", default=d.compile_backend, choices=COMPILE_BACKENDS,
                   help="--compile's backend (inductor on the CPU needs a C++ compiler; aot_eager: traced graphs run "
                        "by eager torch)")
    p.add_argument("--family", default="all", choices=[*FAMILIES, "all"], help="kernels: which benchmark family")


def _split(values) -> tuple[str, ...]:
    """`--methods lora,qlora dora` -> ("lora", "qlora", "dora")."""
    if isinstance(values, str):
        values = [values]
    return tuple(v.strip() for item in values or () for v in item.split(",") if v.strip())


def config_from_args(args) -> BenchConfig:
    peers = _split(args.peers)
    return BenchConfig(shape=args.shape, model=args.model, methods=_split(args.methods),
                       peers=() if peers == ("none",) else peers, seq_len=args.seq_len, batch_size=args.batch_size,
                       steps=args.steps, warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing,
                       patch_model=args.patch_model,
                       dtype=args.dtype, rank=args.rank, alpha=args.alpha, num_virtual_tokens=args.num_virtual_tokens,
                       seed=args.seed, output_dir=args.output_dir, formats=_split(args.formats),
                       compile=args.compile, compile_backend=args.compile_backend)


def run_bench(args) -> int:
    try:
        if args.what == "kernels":
            from fastft.apps.bench.kernels import run_kernels

            problem = output_dir_problem(args.output_dir)
            if problem:
                raise ValueError(problem)
            families = list(FAMILIES) if args.family == "all" else [args.family]
            return run_kernels(families, args.output_dir)
        cfg = config_from_args(args)
        cfg.validate()
    except (ValueError, FileNotFoundError) as err:
        print(f"fastft bench: error: {err}", file=sys.stderr)
        return 2
    from fastft.apps.bench.methods import bench_methods
    from fastft.apps.bench.report import markdown, write_report

    every_row = tuple(f for f in cfg.formats if f != "png")   # the plot once, at the end
    result = bench_methods(cfg, on_row=lambda partial: write_report(partial, cfg.output_dir, every_row))
    paths = write_report(result, cfg.output_dir, cfg.formats)
    print("\n" + markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not any(row["status"] == "ok" for row in result["rows"]):
        print(f"fastft bench: none of the {len(result['rows'])} runs measured anything (every row is "
              f"{'/'.join(sorted({row['status'] for row in result['rows']}))}: see the note column)", file=sys.stderr)
        return 1
    return 0
