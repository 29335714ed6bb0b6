"""GPU benchmark of the method layers (one run, one card), M = 8192 tokens, bf16, dropout 0, fwd+bwd:

- DoRA: fastft's fused DoRA layer against fastft's fused LoRA layer (target ≤ 1.15×) and peft's DoRA layer;
- IA3: fastft's scale-in-the-GEMM (output scale / feed-forward input scale) against the plain frozen GEMM and
  peft's IA3 layer;
- bottleneck adapter (size 64): the fused kernels against the plain-torch module.
Correctness against fp64 first. Run: python benchmarks/gpu_methods.py
FASTFT_BENCH_SMOKE=1 runs it on the CPU (Triton interpreter, toy sizes) to catch script errors.
"""
from __future__ import annotations

import sys

from smoke_mode import BACKEND, DEVICE as DEV, SMOKE  # first: the interpreter before triton loads

import peft
import torch
import torch.nn.functional as F
from torch import nn

from fastft.apps.bench import (card_name, markdown_table, peak_memory_mib, rows_per_shape, time_ms,
                               write_results)
from fastft.ops import (dora_linear, dora_linear_reference, ia3_linear, ia3_linear_reference,
                        lora_linear)
from fastft.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference

M, R, DTYPE = (40 if SMOKE else 8192), 16, torch.bfloat16
SHAPES = [(48, 40)] if SMOKE else [(4096, 4096), (4096, 14336), (14336, 4096)]
CHECK_KNM = (48, 40, 37) if SMOKE else (4096, 1024, 1037)
ADAPTER_N = 40 if SMOKE else 4096


def _rel(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_correctness() -> list[str]:
    failures = []

    def check(what, fn, ref_fn, leaves):
        y = fn(*leaves)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        y_ref = ref_fn(*ref_leaves)
        refs = torch.autograd.grad(y_ref, ref_leaves, dy.double(), allow_unused=True)
        for name, got, ref in zip(["y"] + [f"d{i}" for i in range(len(leaves))], (y, *grads), (y_ref, *refs)):
            if got is None or ref is None:
                continue
            err = _rel(got, ref)
            if not err < 3e-2:
                failures.append(f"{what} {name}: rel err {err:.2e}")

    k, n, m = CHECK_KNM
    W = torch.randn(n, k, device=DEV, dtype=DTYPE) * k**-0.5
    x = torch.randn(m, k, device=DEV, dtype=DTYPE, requires_grad=True)
    A = (torch.randn(R, k, device=DEV) * k**-0.5).requires_grad_()
    B = (torch.randn(n, R, device=DEV) * 0.1).requires_grad_()
    mag = (W.float().norm(dim=1) * (1 + 0.1 * torch.randn(n, device=DEV))).requires_grad_()
    check("dora", lambda x, A, B, m_: dora_linear(x, W, None, A, B, m_, 2.0, backend=BACKEND),
          lambda x, A, B, m_: dora_linear_reference(x, W.double(), None, A, B, m_, 2.0), [x, A, B, mag])
    for ff in (False, True):
        l = (1 + 0.2 * torch.randn(k if ff else n, device=DEV)).requires_grad_()
        check(f"ia3 feedforward={ff}",
              lambda x, l: ia3_linear(x, W, None, l, feedforward=ff, backend=BACKEND),
              lambda x, l: ia3_linear_reference(x, W.double(), None, l, ff), [x, l])
    h = torch.randn(m, n, device=DEV, dtype=DTYPE, requires_grad=True)
    D, bd = (torch.randn(64, n, device=DEV) * 0.05).requires_grad_(), torch.zeros(64, device=DEV, requires_grad=True)
    U, bu = (torch.randn(n, 64, device=DEV) * 0.05).requires_grad_(), torch.zeros(n, device=DEV, requires_grad=True)
    check("adapter", lambda *t: bottleneck_adapter(*t, "silu", backend=BACKEND),
          lambda *t: bottleneck_adapter_reference(*t, "silu"),
          [h, D, bd, U, bu])
    return failures


def _peft_layer(config, k, n):
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(k, n, bias=False, device=DEV, dtype=DTYPE))
    model = peft.get_peft_model(holder, config, autocast_adapter_dtype=False)
    return model.base_model.model.proj


def bench_shape(k: int, n: int, rounds: int = 1 if SMOKE else 3) -> list[dict]:
    x = torch.randn(M, k, device=DEV, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(M, n, device=DEV, dtype=DTYPE)
    W = torch.randn(n, k, device=DEV, dtype=DTYPE) * k**-0.5
    A = (torch.randn(R, k, device=DEV, dtype=DTYPE) * k**-0.5).requires_grad_()
    B = (torch.randn(n, R, device=DEV, dtype=DTYPE) * 0.02).requires_grad_()
    mag = W.float().norm(dim=1).to(DTYPE).requires_grad_()
    dora_peft = _peft_layer(peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], use_dora=True), k, n)
    dora_peft.base_layer.weight.data = W
    ia3_out = _peft_layer(peft.IA3Config(target_modules=["proj"], feedforward_modules=[]), k, n)
    ia3_ff = _peft_layer(peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"]), k, n)
    for layer in (ia3_out, ia3_ff):
        layer.base_layer.weight.data = W
    l_out = (1 + 0.1 * torch.randn(n, device=DEV)).requires_grad_()
    l_ff = (1 + 0.1 * torch.randn(k, device=DEV)).requires_grad_()
    pd = [p for p in dora_peft.parameters() if p.requires_grad]

    cases = {
        "frozen base": lambda: torch.autograd.grad(F.linear(x, W), [x], dy),
        "fastft LoRA": lambda: torch.autograd.grad(lora_linear(x, W, None, A, B, 2.0, backend=BACKEND),
                                                   [x, A, B], dy),
        "fastft DoRA": lambda: torch.autograd.grad(dora_linear(x, W, None, A, B, mag, 2.0, backend=BACKEND),
                                                   [x, A, B, mag], dy),
        "peft DoRA": lambda: torch.autograd.grad(dora_peft(x), [x, *pd], dy),
        "fastft IA3 out": lambda: torch.autograd.grad(
            ia3_linear(x, W, None, l_out, feedforward=False, backend=BACKEND), [x, l_out], dy),
        "peft IA3 out": lambda: torch.autograd.grad(ia3_out(x), [x, ia3_out.ia3_l["default"]], dy),
        "fastft IA3 ff": lambda: torch.autograd.grad(
            ia3_linear(x, W, None, l_ff, feedforward=True, backend=BACKEND), [x, l_ff], dy),
        "peft IA3 ff": lambda: torch.autograd.grad(ia3_ff(x), [x, ia3_ff.ia3_l["default"]], dy),
    }
    for fn in cases.values():
        fn()
    ms = {}
    for _ in range(rounds):
        for name, fn in cases.items():
            ms[name] = min(ms.get(name, float("inf")), time_ms(fn))
    rows = [dict(shape=f"{k}->{n}", method=name, ms=ms[name], vs_base=ms[name] / ms["frozen base"],
                 vs_lora=ms[name] / ms["fastft LoRA"], peak_mib=peak_memory_mib(fn)) for name, fn in cases.items()]
    return rows


def bench_adapter(n: int = ADAPTER_N, size: int = 64) -> list[dict]:
    h = torch.randn(M, n, device=DEV, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(h)
    D, bd = (torch.randn(size, n, device=DEV, dtype=DTYPE) * 0.02).requires_grad_(), \
        torch.zeros(size, device=DEV, dtype=DTYPE, requires_grad=True)
    U, bu = (torch.randn(n, size, device=DEV, dtype=DTYPE) * 0.02).requires_grad_(), \
        torch.zeros(n, device=DEV, dtype=DTYPE, requires_grad=True)
    leaves = [h, D, bd, U, bu]
    cases = {"fastft adapter": lambda: torch.autograd.grad(
                 bottleneck_adapter(h, D, bd, U, bu, "relu", backend=BACKEND), leaves, dy),
             "torch adapter": lambda: torch.autograd.grad(bottleneck_adapter_reference(h, D, bd, U, bu, "relu"),
                                                          leaves, dy)}
    rows = []
    for name, fn in cases.items():
        fn()
        rows.append(dict(shape=f"{n} size {size}", method=name, ms=time_ms(fn), peak_mib=peak_memory_mib(fn)))
    return rows


def main() -> int:
    card = card_name()
    print(f"card: {card}; torch {torch.__version__}", flush=True)
    failures = check_correctness()
    print("correctness:", "ok" if not failures else failures, flush=True)
    def save(rows, adapter_rows=(), complete=False):
        write_results("methods", dict(card=card, torch=torch.__version__, M=M, r=R, dtype=str(DTYPE), rows=rows,
                                      adapter=list(adapter_rows), correctness_failures=failures, complete=complete))

    rows = rows_per_shape(SHAPES, bench_shape, ["shape", "method", "ms", "vs_base", "vs_lora", "peak_mib"],
                          on_shape=save)
    try:
        adapter_rows = bench_adapter()
    except Exception as err:  # noqa: BLE001
        adapter_rows = [dict(shape="adapter", method=f"FAILED: {type(err).__name__}: {err}"[:200])]
    save(rows, adapter_rows, complete=True)
    print(f"\n## method layers fwd+bwd, M={M}, r={R}, bf16, on {card} (DoRA target: vs_lora ≤ 1.15)")
    print(markdown_table(rows, ["shape", "method", "ms", "vs_base", "vs_lora", "peak_mib"]))
    print("\n## bottleneck adapter fwd+bwd")
    print(markdown_table(adapter_rows, ["shape", "method", "ms", "peak_mib"]))
    # the verdict last, where summary.md's log tail shows it: timings of a failed check are not results
    print("correctness:", "ok" if not failures else f"FAILED, the timings above are not results: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
