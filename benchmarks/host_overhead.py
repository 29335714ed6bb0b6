"""Host time of the fused ops' eager calls: the Python fastft runs around its kernels, with every Triton launch
replaced by a no-op, so what is left is validation, dispatch, allocation, tuner lookups and autograd.

On a GPU this time is hidden only when each kernel runs longer than the host needs to queue the next one; at
4096→4096 the H100 run (docs/gpu-results.md) found the LoRA call host-bound. Runs anywhere: on a machine without
CUDA the inputs live on the CPU and the launches that are stubbed are the interpreter's (nothing is computed, so
the figure is the host path alone). Triton's own launch cost (argument binding, the driver call) is not in it.

    python benchmarks/host_overhead.py [--ops lora,qlora,...] [--calls 200] [--rounds 7]

Prints µs per forward+backward, best of the rounds, beside the floor: a trivial autograd.Function with the same
inputs (what any custom op pays); on a GPU also the time with real launches at these tiny shapes (kernels shorter
than the host's work: still host time), whose difference from the stubbed figure is Triton's own launch path.
Writes $OUT/host_overhead.json when OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.setdefault("FASTFT_AUTOTUNE", "0")  # a stubbed launch takes no time: nothing to tune

import torch  # noqa: E402


@contextlib.contextmanager
def launches_stubbed():
    """Every `kernel[grid](...)` returns at once: the interpreter's and the compiled launcher alike."""
    from triton.runtime import interpreter, jit

    classes = [jit.KernelInterface, jit.JITFunction, interpreter.InterpretedFunction]
    saved = [(cls, cls.__dict__.get("__getitem__")) for cls in classes]
    for cls in classes:
        cls.__getitem__ = lambda self, grid: _noop
    try:
        yield
    finally:
        for cls, fn in saved:
            if fn is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = fn


def _noop(*args, **kwargs):
    return None


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


class _Floor(torch.autograd.Function):
    """What any autograd.Function costs: save the inputs, return fresh tensors."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.save_for_backward(x, *params)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return (torch.empty_like(dy), *(torch.empty_like(p) for p in ctx.saved_tensors[1:]))


def _leaf(*shape, grad=True):
    return torch.randn(*shape, device=device(), dtype=dtype()).requires_grad_(grad)


def lora_case(M=64, K=128, N=128, r=16):
    from fastft.ops import lora_linear

    x, W, A, B = _leaf(M, K), _leaf(N, K, grad=False), _leaf(r, K), _leaf(N, r)
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    return (lambda: lora_linear(x, W, None, A, B, 2.0, backend="triton").backward(dy),
            lambda: _Floor.apply(x, A, B).backward(torch.empty_like(x)))


def qlora_case(M=64, K=128, N=128, r=16):
    from fastft.ops import qlora_linear
    from fastft.quant.nf4_weight import quantize_nf4

    x, A, B = _leaf(M, K), _leaf(r, K), _leaf(N, r)
    qweight = quantize_nf4(torch.randn(N, K, device=device(), dtype=dtype()))
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    return (lambda: qlora_linear(x, qweight, None, A, B, 2.0, backend="triton").backward(dy),
            lambda: _Floor.apply(x, A, B).backward(torch.empty_like(x)))


CASES = {"lora": lora_case, "qlora": qlora_case}


def per_call_us(fn, calls: int, rounds: int, sync: bool = False) -> float:
    """Best of `rounds` of the mean µs of `calls` calls (the minimum is the least disturbed by other work); sync:
    wait for the GPU at the end of each round (real launches)."""
    for _ in range(3):
        fn()  # first calls: imports, config lookups, tuner keys, compiles
    best = float("inf")
    for _ in range(rounds):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best is reported")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {', '.join(CASES)}")
    real = torch.cuda.is_available()  # on a GPU also with real launches: the difference is Triton's launch cost
    rows = []
    for op in ops:
        call, floor = CASES[op]()
        with launches_stubbed():
            us, floor_us = per_call_us(call, args.calls, args.rounds), per_call_us(floor, args.calls, args.rounds)
        row = {"op": op, "device": str(device()), "fwd_bwd_us": round(us, 1), "floor_us": round(floor_us, 1)}
        line = (f"{op:12s} {us:8.1f} µs per fwd+bwd, launches stubbed   "
                f"(floor {floor_us:.1f} µs: a trivial autograd.Function)")
        if real:  # tiny shapes: the kernels finish before the host queues the next, so this is host time too
            row["real_launches_us"] = round(per_call_us(call, args.calls, args.rounds, sync=True), 1)
            line += f";  with real launches {row['real_launches_us']:.1f} µs"
        rows.append(row)
        print(line)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "host_overhead.json"), "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
