"""GPU check of the LoRA linear's two paths (fastft.ops.lora_path): split (skinny passes for x·Aᵀ and dy·B) and fold
(both computed inside the GEMMs' own loops). One run, one card, M = 8192 tokens, bf16 everywhere, dropout 0.

1. Correctness first: both paths against an fp64 reference (y, dx, dA, dB, bias grad) at ragged shapes.
2. Timings, interleaved rounds (best round counts): the frozen base (x·Wᵀ and dx), then per (K→N, r) and path the
   forward alone, the backward alone and forward+backward, and the host time of one fwd+bwd call (CPU time of
   20 calls queued without synchronising: when it is near the GPU time the call is host-bound).
3. The MEASURED entries fastft/ops/lora_path.py should carry: `fold` for a direction and shape only where the fold
   path passed step 1 and was faster than split by more than MARGIN for every r with that padded rank.

Writes $OUT/lora_paths.json and prints the entries so far after each shape (a run cut short keeps the finished
shapes), the tables at the end. Run: python benchmarks/gpu_lora_paths.py.
FASTFT_BENCH_SMOKE=1 runs it on the CPU (Triton interpreter, toy sizes, fp32) to catch script errors.
"""
from __future__ import annotations

import os
import sys
from unittest import mock

from smoke_mode import BACKEND, DEVICE, SMOKE  # first: the interpreter before triton loads

import torch
import torch.nn.functional as F

from fastft.apps.bench import card_name, host_ms, markdown_table, rows_per_shape, time_cases, time_ms, write_results
from fastft.kernels.rank_ops import rank_pad
from fastft.ops import lora_linear, lora_linear_reference, lora_path

M = 40 if SMOKE else 8192
SHAPES = [(48, 40)] if SMOKE else [(4096, 4096), (4096, 14336), (14336, 4096)]
RANKS = [8] if SMOKE else [int(r) for r in os.environ.get("LORA_BENCH_RANKS", "8,16,64").split(",")]
DTYPE = torch.float32 if SMOKE else torch.bfloat16
CHECKS = ([(37, 48, 40, 8), (5, 37, 70, 33)] if SMOKE else
          [(1037, 4096, 4096, 16), (8192, 4096, 1024, 64), (333, 14336, 512, 8), (513, 1001, 333, 33),
           (64, 1024, 4096, 64)])
MARGIN = 0.02  # fold must beat split by more than 2% (the card's clock noise between rounds is ~1%)


def path(name: str):
    """FASTFT_LORA_PATH set to `name` inside the block."""
    return mock.patch.dict(os.environ, {lora_path.ENV: name})


class OnPath:
    """A call timed on one path. Called directly (warm-up) it sets the path around itself; `measured` sets it once
    around a whole measurement instead: patching os.environ costs ~125 µs of host time, which inside the timed
    call would be added to fastft's side only."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self):
        with path(self.name):
            return self.fn()


def measured(measure, fn):
    """measure(fn), the path of an OnPath set around the measurement, not inside the calls it times."""
    if not isinstance(fn, OnPath):
        return measure(fn)
    with path(fn.name):
        return measure(fn.fn)


def check_correctness() -> list[str]:
    """Both paths against fp64 on fresh random inputs (descriptor and pointer-load variants, r padded and not)."""
    failures = []
    for name in lora_path.PATHS:
        for m, k, n, r in CHECKS:
            x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
            W = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
            b = (torch.randn(n, device=DEVICE, dtype=DTYPE) * 0.1).requires_grad_()
            A = (torch.randn(r, k, device=DEVICE, dtype=DTYPE) * k**-0.5).requires_grad_()
            B = (torch.randn(n, r, device=DEVICE, dtype=DTYPE) * 0.1).requires_grad_()
            with path(name):
                y = lora_linear(x, W, b, A, B, 2.0, backend=BACKEND)
                dy = torch.randn_like(y)
                grads = torch.autograd.grad(y, [x, b, A, B], dy)
            leaves = [t.detach().double().requires_grad_() for t in (x, b, A, B)]
            y_ref = lora_linear_reference(leaves[0], W.double(), leaves[1], leaves[2], leaves[3], 2.0)
            refs = torch.autograd.grad(y_ref, leaves, dy.double())
            for what, got, ref in zip(("y", "dx", "db", "dA", "dB"), (y, *grads), (y_ref, *refs)):
                err = ((got.double() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    failures.append(f"{name} {what} at {(m, k, n, r)}: rel err {err:.2e}")
    return failures


def bench_shape(k: int, n: int, rounds: int = 1 if SMOKE else 3) -> list[dict]:
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    W = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
    shape = f"{k}->{n}"

    def base():
        torch.autograd.grad(F.linear(x, W), [x], dy)

    cases = [dict(shape=shape, r="-", path="frozen base", part="fwd+bwd", fn=base)]
    for r in RANKS:
        A = (torch.randn(r, k, device=DEVICE, dtype=DTYPE) * k**-0.5).requires_grad_()
        B = (torch.randn(n, r, device=DEVICE, dtype=DTYPE) * 0.02).requires_grad_()
        for name in lora_path.PATHS:
            with path(name):
                graph = lora_linear(x, W, None, A, B, 2.0, backend=BACKEND)  # backward path fixed at forward time

            def step(A=A, B=B):
                torch.autograd.grad(lora_linear(x, W, None, A, B, 2.0, backend=BACKEND), [x, A, B], dy)

            def forward(A=A, B=B):
                with torch.no_grad():
                    lora_linear(x, W, None, A, B, 2.0, backend=BACKEND)

            def backward(graph=graph, A=A, B=B):
                torch.autograd.grad(graph, [x, A, B], dy, retain_graph=True)

            for part, fn in (("fwd+bwd", OnPath(name, step)), ("fwd", OnPath(name, forward)), ("bwd", backward)):
                cases.append(dict(shape=shape, r=r, R=rank_pad(r), path=name, part=part, fn=fn))
    time_cases(cases, rounds, timer=lambda fn: measured(time_ms, fn))
    t_base = cases[0]["ms"]
    rows = []
    for case in cases:
        fn = case.pop("fn")
        row = dict(case, ratio=case["ms"] / t_base)
        if case["part"] == "fwd+bwd":
            row["host_ms"] = measured(lambda f: host_ms(f, 1 if SMOKE else 20), fn)
        rows.append(row)
    return rows


def measured_entries(rows: list[dict], correct: bool) -> dict:
    """{MEASURED key: 'fold'} where fold beat split by more than MARGIN for every r sharing the padded rank."""
    if not correct:
        return {}
    ms = {(r["shape"], r["r"], r["path"], r["part"]): r for r in rows if "R" in r}
    verdict: dict[tuple, bool] = {}
    for (shape, rank, name, part), row in ms.items():
        if name != "fold" or part == "fwd+bwd":
            continue
        split = ms.get((shape, rank, "split", part))
        if split is None:
            continue
        k, n = (int(v) for v in shape.split("->"))
        key = lora_path.path_key("forward" if part == "fwd" else "backward", M, k, n, row["R"], DTYPE)
        wins = row["ms"] < (1.0 - MARGIN) * split["ms"]
        verdict[key] = verdict.get(key, True) and wins
    return {key: "fold" for key, wins in verdict.items() if wins}


def main() -> int:
    card = card_name()
    print(f"card: {card}; torch {torch.__version__}", flush=True)
    failures = check_correctness()
    print("correctness (split and fold vs fp64):", "ok" if not failures else failures, flush=True)
    rows: list[dict] = []
    entries: dict = {}

    def save(done: int):
        write_results("lora_paths", dict(card=card, torch=torch.__version__, M=M, dtype=str(DTYPE), margin=MARGIN,
                                         rows=rows, correctness_failures=failures, shapes_done=done,
                                         measured=[dict(key=list(key), path=p) for key, p in entries.items()]))
    save(0)
    for done, (k, n) in enumerate(SHAPES, 1):  # results and entries after each shape: a cut run keeps those done
        rows += rows_per_shape([(k, n)], bench_shape, ["shape", "r", "path", "part", "ms", "ratio", "host_ms"],
                               label="path")
        entries = measured_entries(rows, not failures)
        save(done)
        print(f"MEASURED entries after {k}->{n} ({done}/{len(SHAPES)} shapes): "
              + (", ".join(f"{key!r}: {p!r}" for key, p in entries.items()) or "none"), flush=True)
    dtype = str(DTYPE).removeprefix("torch.")
    print(f"\n## LoRA linear split vs fold, fwd+bwd, M={M}, {dtype}, on {card} (ratio = ms / frozen base fwd+bwd)")
    table = [r for r in rows if r.get("part") == "fwd+bwd"]
    print(markdown_table(table, ["shape", "r", "path", "ms", "ratio", "host_ms"]))
    print("\n## per direction (ms)")
    print(markdown_table([r for r in rows if r.get("part") in ("fwd", "bwd")], ["shape", "r", "path", "part", "ms"]))
    print("\n## entries for fastft/ops/lora_path.py MEASURED (fold wins by > "
          f"{MARGIN:.0%}; empty: keep split everywhere)")
    for key, p in entries.items():
        print(f"    {key!r}: {p!r},")
    # the verdict last, where summary.md's log tail shows it: timings of a failed check are not results
    print("correctness:", "ok" if not failures else f"FAILED, the timings above are not results: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
