"""GPU benchmark of the fused linear cross-entropy (one run, one card): 8192 tokens × hidden 4096 × vocab 128256,
bf16, forward + backward (dhidden and dW), against torch with the logits materialised (fp32 loss, as
transformers computes it) and Liger's LigerFusedLinearCrossEntropyLoss when importable (.peers).

Per method: median ms (best of interleaved rounds), peak memory above the inputs (`peak_mib`, the returned
gradients included) and the same less the returned gradients (`workspace_mib`: what the loss itself needs).
fastft is timed at several chunk sizes, with a frozen weight (LoRA fine-tuning: dhidden only), and its
KL-distillation loss beside torch's. Correctness first: fp64 references at a medium shape. JSON to $OUT.
Run: python benchmarks/gpu_losses.py. FASTFT_BENCH_SMOKE=1 runs it on the CPU (Triton interpreter, toy sizes)
to catch script errors before GPU time is spent (tests/test_losses_benchmark.py).
"""
from __future__ import annotations

import sys
import time

from smoke_mode import BACKEND, DEVICE, SMOKE  # first: the interpreter before triton loads

import torch
import torch.nn.functional as F

from fastft.apps.bench import (card_name, markdown_table, peak_memory_mib, time_cases, time_ms,
                               write_results)
from fastft.ops import (linear_cross_entropy, linear_cross_entropy_reference, linear_kl_div,
                        linear_kl_div_reference)

T, H, V = (24, 16, 67) if SMOKE else (8192, 4096, 128256)
CHECKS = ([(19, 16, 67, {}), (9, 8, 131, dict(label_smoothing=0.1, softcap=30.0))] if SMOKE else
          [(1031, 512, 32003, {}), (700, 256, 50001, dict(label_smoothing=0.1, softcap=30.0)),
           (513, 256, 4099, dict(reduction="sum"))])
CHUNKS = (8,) if SMOKE else (256, 512, 1024, 2048)
DTYPE = torch.bfloat16
TARGET_MS, TARGET_GIB = 36.0, 0.1  # issue 7's target on an H200


def timed_ms(fn) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return time_ms(fn)


def peak_mib(fn) -> float | None:
    return None if SMOKE else peak_memory_mib(fn)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def check_correctness() -> list[str]:
    failures = []
    for (t, h, v, opts) in CHECKS:
        x = torch.randn(t, h, device=DEVICE, dtype=DTYPE, requires_grad=True)
        W = (torch.randn(v, h, device=DEVICE) * h**-0.5).to(DTYPE).requires_grad_()
        y = torch.randint(0, v, (t,), device=DEVICE)
        y[::7] = -100
        loss = linear_cross_entropy(x, W, y, backend=BACKEND, **opts)
        grads = torch.autograd.grad(loss * 1.7, [x, W])
        leaves = [x.detach().double().requires_grad_(), W.detach().double().requires_grad_()]
        ref = linear_cross_entropy_reference(*leaves, y, **opts)
        refs = torch.autograd.grad(ref * 1.7, leaves)
        for name, got, want in zip(("loss", "dx", "dW"), (loss, *grads), (ref, *refs)):
            err = rel(got, want)
            if not err < 2e-2:
                failures.append(f"CE {name} at {(t, h, v, opts)}: rel err {err:.2e}")
    t, v = (11, 67) if SMOKE else (600, 32003)
    xs = torch.randn(t, 256, device=DEVICE, dtype=DTYPE, requires_grad=True)
    Ws = (torch.randn(v, 256, device=DEVICE) * 0.06).to(DTYPE)
    xt, Wt = torch.randn(t, 384, device=DEVICE, dtype=DTYPE), (torch.randn(v, 384, device=DEVICE) * 0.05).to(DTYPE)
    for direction in ("forward", "reverse"):
        loss = linear_kl_div(xs, Ws, xt, Wt, temperature=2.0, direction=direction, backend=BACKEND)
        (g,) = torch.autograd.grad(loss, [xs])
        leaf = xs.detach().double().requires_grad_()
        ref = linear_kl_div_reference(leaf, Ws.double(), xt.double(), Wt.double(), temperature=2.0,
                                      direction=direction)
        (g_ref,) = torch.autograd.grad(ref, [leaf])
        for name, got, want in (("loss", loss, ref), ("dx", g, g_ref)):
            err = rel(got, want)
            if not err < 2e-2:
                failures.append(f"KL {direction} {name}: rel err {err:.2e}")
    return failures


def liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - Liger is an optional peer (.peers)
        return None
    return LigerFusedLinearCrossEntropyLoss()


def bench_ce(rounds: int = 1 if SMOKE else 3) -> list[dict]:
    x = torch.randn(T, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
    W = (torch.randn(V, H, device=DEVICE) * H**-0.5).to(DTYPE).requires_grad_()
    W_frozen = W.detach()
    y = torch.randint(0, V, (T,), device=DEVICE)
    y[::10] = -100
    grad_bytes = x.numel() * x.element_size() + W.numel() * W.element_size()

    def torch_step():
        loss = F.cross_entropy(F.linear(x, W).float(), y)
        torch.autograd.grad(loss, [x, W])

    def fastft_step(rows=None, weight=W):
        loss = linear_cross_entropy(x, weight, y, chunk_size=rows, backend=BACKEND)
        torch.autograd.grad(loss, [x, weight] if weight.requires_grad else [x])

    cases = [dict(method="torch (logits materialised)", fn=torch_step, grads=grad_bytes)]
    liger = liger_loss()
    if liger is not None and not SMOKE:
        cases.append(dict(method="Liger fused linear CE", grads=grad_bytes,
                          fn=lambda: torch.autograd.grad(liger(W, x, y), [x, W])))
    cases.append(dict(method="fastft (default chunk)", fn=fastft_step, grads=grad_bytes))
    for rows in CHUNKS:
        cases.append(dict(method=f"fastft chunk {rows} rows", fn=lambda rows=rows: fastft_step(rows), grads=grad_bytes))
    cases.append(dict(method="fastft, frozen W (dh only)", fn=lambda: fastft_step(None, W_frozen),
                      grads=x.numel() * x.element_size(), gemms=2))  # logits and dh: no dW GEMM
    time_cases(cases, rounds, timed_ms)
    rows = []
    for case in cases:
        fn, grads, gemms = case.pop("fn"), case.pop("grads"), case.pop("gemms", 3)
        peak = peak_mib(fn)
        rows.append(dict(case, peak_mib=peak, workspace_mib=None if peak is None else peak - grads / 2**20,
                         tflops=gemms * 2 * T * V * H / case["ms"] / 1e9))
    return rows


def bench_kl() -> list[dict]:
    xs = torch.randn(T, H, device=DEVICE, dtype=DTYPE, requires_grad=True)
    Ws = (torch.randn(V, H, device=DEVICE) * H**-0.5).to(DTYPE)
    xt = torch.randn(T, H, device=DEVICE, dtype=DTYPE)
    Wt = (torch.randn(V, H, device=DEVICE) * H**-0.5).to(DTYPE)

    def torch_kl():
        log_ps = F.log_softmax(F.linear(xs, Ws).float(), -1)
        with torch.no_grad():
            log_pt = F.log_softmax(F.linear(xt, Wt).float(), -1)
        loss = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
        torch.autograd.grad(loss, [xs])

    def fastft_kl():
        torch.autograd.grad(linear_kl_div(xs, Ws, xt, Wt, backend=BACKEND), [xs])

    rows = []
    for name, fn in (("torch KL (logits materialised)", torch_kl), ("fastft linear_kl_div", fastft_kl)):
        fn()
        rows.append(dict(method=name, ms=timed_ms(fn), peak_mib=peak_mib(fn)))
    return rows


def main() -> int:
    if not SMOKE and not torch.cuda.is_available():
        print("needs a CUDA GPU (or FASTFT_BENCH_SMOKE=1 for a CPU smoke run)")
        return 2
    card = "cpu (smoke run, Triton interpreter)" if SMOKE else card_name()
    print(f"card: {card}; torch {torch.__version__}", flush=True)
    failures = check_correctness()
    print("correctness:", "ok" if not failures else failures, flush=True)
    ce, kl = [], []
    try:
        ce = bench_ce()
    except Exception as err:  # noqa: BLE001 - report, keep going
        ce = [dict(method=f"FAILED: {type(err).__name__}: {err}"[:200])]
        failures.append(ce[0]["method"])
    save = lambda complete: write_results("losses", dict(  # noqa: E731 - after each table: a cut run keeps the first
        card=card, torch=torch.__version__, T=T, H=H, V=V, dtype=str(DTYPE), ce=ce, kl=kl, complete=complete,
        target=dict(ms=TARGET_MS, gib_above_inputs=TARGET_GIB), correctness_failures=failures))
    save(False)
    if not SMOKE:
        torch.cuda.empty_cache()
    try:
        kl = bench_kl()
    except Exception as err:  # noqa: BLE001
        kl = [dict(method=f"FAILED: {type(err).__name__}: {err}"[:200])]
        failures.append(kl[0]["method"])
    save(True)
    print(f"\n## linear + cross-entropy fwd+bwd, {T} × {H} × {V}, bf16, on {card} (target ≤ {TARGET_MS} ms, "
          f"≤ {TARGET_GIB} GiB workspace; floor 3 GEMMs ≈ 25.8 TFLOP)")
    print(markdown_table(ce, ["method", "ms", "tflops", "peak_mib", "workspace_mib"]))
    print(f"\n## linear KL distillation fwd+bwd (student dh only), {T} × {H} × {V}, bf16")
    print(markdown_table(kl, ["method", "ms", "peak_mib"]))
    # the verdict last, where summary.md's log tail shows it: timings of a failed check are not results
    print("correctness:", "ok" if not failures else f"FAILED, the timings above are not results: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
