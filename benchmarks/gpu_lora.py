"""GPU benchmark of the fused LoRA linear (one run, one card): forward+backward against the frozen bf16
base and against peft's LoRA layer, M = 8192 tokens, bf16 everywhere (adapters too), dropout 0.

Per (K→N, r): median ms of fwd+bwd (dX for the base; dX, dA, dB for LoRA), ratio to the base, and peak
memory above the inputs; the base and fastft also replayed from a CUDA graph (one captured fwd+bwd step: no host
time, what torch.compile mode="reduce-overhead" gives), which says how much of a ratio is host overhead; and the
candidate "overlapped dA/dB" (fastft.ops.overlap: the backward's reductions on a side stream during the dx GEMM).
Then a breakdown of fastft's kernels at r=16. Run: python benchmarks/gpu_lora.py
FASTFT_BENCH_SMOKE=1 runs it on the CPU (Triton interpreter, toy sizes, fp32, no CUDA graphs) to catch script errors.
"""
from __future__ import annotations

import logging
import os
import sys

from smoke_mode import BACKEND, DEVICE, SMOKE  # first: the interpreter before triton loads

import peft
import torch
import torch.nn.functional as F
from torch import nn

from fastft.apps.bench import (card_name, concurrency_share, graphed, markdown_table, paired_ratio, peak_memory_mib,
                               rows_per_shape, time_cases, time_ms, write_results)
from fastft.kernels import rank_ops
from fastft.kernels.lora_gemm import lora_gemm
from fastft.ops import lora_linear, lora_linear_reference, overlap

M = 40 if SMOKE else 8192
SHAPES = [(48, 40), (37, 70)] if SMOKE else [(4096, 4096), (4096, 14336), (14336, 4096)]
# sm_mhz, power_w: the card's mean SM clock and power over the case's timed rounds (harness.time_cases, NVML)
COLUMNS = ["shape", "method", "r", "ms", "ratio", "peak_mib", "sm_mhz", "power_w"]
RANKS = [8] if SMOKE else [int(r) for r in os.environ.get("LORA_BENCH_RANKS", "8,16,64").split(",")]
DTYPE = torch.float32 if SMOKE else torch.bfloat16
CHECKS = [(37, 48, 40, 8), (5, 37, 70, 16)] if SMOKE else [(1037, 4096, 4096, 16), (8192, 4096, 1024, 64),
                                                           (333, 14336, 512, 8)]


def check_correctness() -> tuple[list[str], list[str]]:
    """fp64 reference on fresh random inputs before timing anything; returns (the default path's failures, the
    overlap candidate's: kept apart, so a failing candidate never voids the default path's table)."""
    failures, overlap_failures = [], []
    for (m, k, n, r) in CHECKS:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
        W = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
        A = (torch.randn(r, k, device=DEVICE, dtype=DTYPE) * k**-0.5).requires_grad_()
        B = (torch.randn(n, r, device=DEVICE, dtype=DTYPE) * 0.1).requires_grad_()
        y = lora_linear(x, W, None, A, B, 2.0, backend=BACKEND)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, A, B], dy)
        leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
        y_ref = lora_linear_reference(leaves[0], W.double(), None, leaves[1], leaves[2], 2.0)
        refs = torch.autograd.grad(y_ref, leaves, dy.double())
        for name, got, ref in zip(("y", "dx", "dA", "dB"), (y, *grads), (y_ref, *refs)):
            err = ((got.double() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                failures.append(f"{name} at {(m, k, n, r)}: rel err {err:.2e}")
        # the overlap candidate (FASTFT_LORA_OVERLAP): the same math on two streams with other configs (the dx GEMM's
        # that leave room, the reductions' small tile), so the default path's gradients to summation-order rounding;
        # a stream race would be far off (benchmarks/candidates.py promotes it only without failures here)
        before = overlap.enabled()
        overlap.set_enabled(True)
        try:
            overlapped = torch.autograd.grad(lora_linear(x, W, None, A, B, 2.0, backend=BACKEND), [x, A, B], dy)
        except Exception as err:  # noqa: BLE001 - the candidate failing is a finding, not the end of the run
            overlap_failures.append(f"overlapped at {(m, k, n, r)}: {type(err).__name__}: {err}"[:300])
            continue
        finally:
            overlap.set_enabled(before)
        for name, got, want in zip(("dx", "dA", "dB"), overlapped, grads):
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            if not err <= 1e-3:
                overlap_failures.append(f"overlapped {name} at {(m, k, n, r)}: {err:.2e} off the default path")
    return failures, overlap_failures


def peft_layer(k: int, n: int, r: int) -> nn.Module:
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(k, n, bias=False, device=DEVICE, dtype=DTYPE))
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]),
                                autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def bench_shape(k: int, n: int, rounds: int = 1 if SMOKE else 5) -> list[dict]:
    """Every method of this shape timed in `rounds` interleaved rounds: ms is its best round, ratio the median over
    rounds of its time ÷ the base's in the same round (harness.paired_ratio: the card's sustained clocks drift by
    ~10% within a run, so best ÷ best can pair different clock states)."""
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    W = peft_layer(k, n, 8).base_layer.weight

    def base():
        torch.autograd.grad(F.linear(x, W), [x], dy)

    cases = [dict(shape=f"{k}->{n}", method="frozen bf16 base", r="-", fn=base)]
    for r in RANKS:
        layer = peft_layer(k, n, r)
        layer.base_layer.weight = W
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

        def peft_step(layer=layer, A=A, B=B):
            torch.autograd.grad(layer(x), [x, A, B], dy)

        def fastft_step(A=A, B=B):
            torch.autograd.grad(lora_linear(x, W, None, A, B, 2.0, backend=BACKEND), [x, A, B], dy)

        def overlapped_step(step=fastft_step):  # the candidate: dA, dB on a side stream (fastft.ops.overlap)
            before = overlap.enabled()
            overlap.set_enabled(True)
            try:
                step()
            finally:
                overlap.set_enabled(before)

        cases += [dict(shape=f"{k}->{n}", method="peft LoRA", r=r, fn=peft_step),
                  dict(shape=f"{k}->{n}", method="fastft fused", r=r, fn=fastft_step),
                  dict(shape=f"{k}->{n}", method="fastft fused, overlapped dA/dB", r=r, fn=overlapped_step)]
    graph_cases = [("frozen bf16 base, CUDA graph", "-", base)] + [
        ("fastft fused, CUDA graph", c["r"], c["fn"]) for c in cases if c["method"] == "fastft fused"]
    for method, r, step in graph_cases if DEVICE == "cuda" else []:  # no graphs on the CPU (smoke run)
        try:
            cases.append(dict(shape=f"{k}->{n}", method=method, r=r, fn=graphed(step)))
        except Exception as err:  # noqa: BLE001 - a step that cannot be captured is reported, not timed
            print(f"{method} r={r}: not captured: {type(err).__name__}: {err}"[:300], flush=True)
    failed = []  # the overlap candidate that raises is reported as a row, and the shape's other cases still timed
    for case in [c for c in cases if c["method"] == "fastft fused, overlapped dA/dB"]:
        try:
            case["fn"]()
        except Exception as err:  # noqa: BLE001
            cases.remove(case)
            failed.append(dict(shape=case["shape"], method=case["method"], r=case["r"],
                               error=f"{type(err).__name__}: {err}"[:200]))
    time_cases(cases, rounds)
    t_base = cases[0]["ms"]
    ratios = {(case["method"], case["r"]): paired_ratio(case, cases[0]) for case in cases}
    rows = []
    for case in cases:
        fn = case.pop("fn")
        graph = "CUDA graph" in case["method"]  # a replay allocates nothing: its memory is the graph's pool
        rows.append(dict(case, ratio=ratios[case["method"], case["r"]], peak_mib="-" if graph else peak_memory_mib(fn)))
    rows[0]["tflops"] = 2 * 2 * M * k * n / t_base / 1e9
    return rows + failed


def breakdown(k: int, n: int, r: int = 16) -> dict:
    """Each fastft kernel alone at rank r, with cuBLAS's plain GEMMs for the same products."""
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE)
    dy = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    W = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
    R = rank_ops.rank_pad(r)
    A = torch.randn(R, k, device=DEVICE, dtype=DTYPE) * 0.01
    B = torch.randn(n, R, device=DEVICE, dtype=DTYPE) * 0.01
    xs = rank_ops.rank_project(x, A, scale=2.0)
    g = rank_ops.rank_project(dy, B.t(), scale=2.0)
    parts = {
        "cublas x@W.T": lambda: x @ W.t(),
        "cublas dy@W": lambda: dy @ W,
        "fwd rank_project (x·Aᵀ)": lambda: rank_ops.rank_project(x, A, scale=2.0),
        "fwd lora_gemm": lambda: lora_gemm(x, W, xs, B, None, b_nk=True),
        "bwd rank_project (dy·B)": lambda: rank_ops.rank_project(dy, B.t(), scale=2.0),
        "bwd lora_gemm (dx)": lambda: lora_gemm(dy, W, g, A, None, b_nk=False),
        "bwd rank_reduce (dA)": lambda: rank_ops.rank_reduce(g, x),
        "bwd rank_reduce (dB)": lambda: rank_ops.rank_reduce(xs, dy),
        # the overlap's kernels alone (fastft.ops.overlap): what the room left costs the dx GEMM, and what the small
        # reduction config takes that the side stream hides
        "bwd lora_gemm (dx), room left": lambda: lora_gemm(dy, W, g, A, None, b_nk=False, leave_room=True),
        "bwd rank_reduce_pair (dA, dB), beside-GEMM config": lambda: rank_ops.rank_reduce_pair(g, x, xs, dy,
                                                                                              beside_gemm=True),
    }
    out = {}
    for name, fn in parts.items():
        fn()
        out[name] = time_ms(fn)
    return out


def overlap_share(k: int, n: int, r: int = 16) -> float | None:
    """With FASTFT_LORA_OVERLAP on: the share of the rank reductions' device time that ran while the dx GEMM ran
    (harness.concurrency_share; CUDA only, None elsewhere). Near 0: the streams took turns on the SMs and the overlap
    can gain nothing, whatever the timings say; near 1: the reductions hid behind the GEMM."""
    if DEVICE != "cuda":
        return None
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    W = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
    A = (torch.randn(r, k, device=DEVICE) * k**-0.5).requires_grad_()
    B = (torch.randn(n, r, device=DEVICE) * 0.01).requires_grad_()
    before = overlap.enabled()
    overlap.set_enabled(True)
    try:
        # the forward's GEMM is the same kernel: it never runs beside a reduction (the join waits for them)
        return concurrency_share(
            lambda: torch.autograd.grad(lora_linear(x, W, None, A, B, 2.0, backend=BACKEND), [x, A, B], dy),
            ("_rank_reduce_pair_kernel", "_rank_reduce_kernel"), ("_lora_gemm_kernel",))
    finally:
        overlap.set_enabled(before)


def main() -> int:
    if os.environ.get("FASTFT_TUNE_LOG"):
        logging.basicConfig(level=logging.DEBUG, format="%(message)s")
        logging.getLogger("fastft.kernels.autotune").setLevel(logging.DEBUG)
    card = card_name()
    print(f"card: {card}; torch {torch.__version__}", flush=True)
    failures, overlap_failures = check_correctness()
    print("correctness:", "ok" if not failures else failures, flush=True)
    print("overlap candidate:", "ok" if not overlap_failures else overlap_failures, flush=True)
    parts = {}

    shares = {}

    def shape_rows(k, n):
        rows = bench_shape(k, n)
        for r in (16, 64) if not SMOKE and 64 in RANKS else (16,):  # r=64: 1.17-1.24x at 14336->4096 on the H100
            name = f"{k}->{n}" + ("" if r == 16 else f" r{r}")  # (r=16: 1.07): which pass
            try:  # a diagnostic (the room-left and beside-GEMM kernels run only here on a GPU): never the shape's end
                parts[name] = breakdown(k, n, r)
            except Exception as err:  # noqa: BLE001
                parts[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
        try:
            shares[f"{k}->{n}"] = overlap_share(k, n)
        except Exception as err:  # noqa: BLE001 - a diagnostic: reported, never fatal
            shares[f"{k}->{n}"] = f"{type(err).__name__}: {err}"[:200]
        return rows

    def save(rows, complete=False):
        write_results("lora", dict(card=card, torch=torch.__version__, M=M, dtype=str(DTYPE), rows=rows,
                                   breakdown_ms=parts, overlap_share=shares, correctness_failures=failures,
                                   overlap_failures=overlap_failures, complete=complete))

    rows = rows_per_shape(SHAPES, shape_rows, COLUMNS, on_shape=save)
    save(rows, complete=True)
    dtype = str(DTYPE).removeprefix("torch.")
    print(f"\n## fused LoRA linear fwd+bwd, M={M}, {dtype}, on {card} (ratio = median over rounds of ms / frozen "
          "base ms in the same round)")
    print(markdown_table(rows, COLUMNS))
    print("\n## fastft kernel breakdown at r=16, and r=64 where named (ms)")
    names = list(dict.fromkeys(nm for p in parts.values() for nm in p))
    print(markdown_table([dict(kernel=nm, **{s: p.get(nm) for s, p in parts.items()}) for nm in names],
                         ["kernel", *parts.keys()]))
    print("\noverlapped dA/dB, share of the reductions' device time beside the dx GEMM (r=16; 0: the streams took "
          "turns):", shares)
    # the verdict last, where summary.md's log tail shows it: timings of a failed check are not results
    print("overlap candidate:", "ok" if not overlap_failures else f"FAILED (keep it off): {overlap_failures}")
    print("correctness:", "ok" if not failures else f"FAILED, the timings above are not results: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
