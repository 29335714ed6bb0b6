"""`fastft bench` from parsed arguments: the method table (default) or the kernel micro-benchmarks."""
from __future__ import annotations

import sys

from fastft.apps.bench.config import BenchConfig


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
                       dtype=args.dtype, rank=args.rank, alpha=args.alpha, num_virtual_tokens=args.num_virtual_tokens,
                       seed=args.seed, output_dir=args.output_dir)


def run_bench(args) -> int:
    try:
        if args.what == "kernels":
            from fastft.apps.bench.kernels import FAMILIES, run_kernels

            families = list(FAMILIES) if args.family == "all" else [args.family]
            return run_kernels(families, args.output_dir)
        cfg = config_from_args(args)
        cfg.validate()
    except (ValueError, FileNotFoundError) as err:
        print(f"fastft bench: error: {err}", file=sys.stderr)
        return 2
    from fastft.apps.bench.methods import bench_methods
    from fastft.apps.bench.report import markdown, write_report

    result = bench_methods(cfg, on_row=lambda partial: write_report(partial, cfg.output_dir, plot=False))
    paths = write_report(result, cfg.output_dir)
    print("\n" + markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
