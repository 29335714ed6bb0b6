#!/usr/bin/env python3
"""fastft attention on the GPU: correctness first, then forward / forward+backward TFLOP/s against torch SDPA's
FlashAttention-2 and cuDNN backends, packed vs padded batches, peak memory.

Run from the repository root: `python3 benchmarks/gpu_attention.py` (writes $OUT/attention.json if $OUT is set,
after the checks and after every shape, so a run cut short keeps what finished), or
`fastft bench kernels --family attention`. Timing, memory, the card and the results file come from the shared
harness (fastft.apps.bench.harness).
FASTFT_BENCH_SMOKE=1 runs the same script on the CPU through the Triton interpreter at toy sizes: it checks the
script, not the speed (tests/test_attention_benchmark.py does that in CI).

1. Every launch config of the kernels (forward, backward) at a small ragged shape of the benchmark's kind
   (causal, D=128, bf16; the same specialisations, so the compiles are reused) against an fp64 reference,
   outputs poisoned with NaN first. Configs that fail to compile or to match are reported and left out of
   the tuner for the rest of the run. Then the registers and spills of every kernel compiled (this triton).
2. B4×S2048 and B1×S8192, H=32, D=128, causal, bf16: each config alone, the default (tuned) autograd path,
   SDPA flash and cuDNN. Times are medians of triton.testing.do_bench. On a GPU, the backward's device time by
   kernel (a profiler trace): the tuner's fastest config and the dQ-by-TMA-reduce candidates.
3. A realistic mix of document lengths: fastft packed (varlen) vs padded batches for fastft and SDPA.

FLOPs: forward 4·B·H·S²·D·(½ if causal); backward 2.5× the forward; forward+backward timed together counts
3.5× the forward (the convention of ../shared/anchors, whose H200 peers are flash 234/292 and cuDNN 414/507).
Packed-vs-padded rates count only the useful FLOPs (Σ over documents of their own L²).
"""
from __future__ import annotations

import functools
import math
import sys
import time
import traceback

from smoke_mode import BACKEND, DEVICE, SMOKE  # first: the interpreter before triton loads

import torch

import triton

import fastft.kernels.attention_bwd as kbwd
import fastft.kernels.attention_fwd as kfwd
from fastft.kernels.attention import tma_eligible
from fastft.ops import flash_attention
from fastft.apps.bench.clocks import clock_log, rounded
from fastft.apps.bench.harness import card_name, kernel_ms, kernel_spans, log, peak_memory_gib, time_ms, write_results
from fastft.ops.attention import attention_reference

T0 = time.time()
DTYPE = torch.bfloat16
H, D = (2, 64) if SMOKE else (32, 128)
SHAPES = [(2, 40), (1, 72)] if SMOKE else [(4, 2048), (1, 8192)]
CHECK_SHAPE = (2, 40) if SMOKE else (2, 320)  # ragged against 128-row blocks, S % 16 == 0 like SHAPES
UNBOUNDED = 1 << 30
FLOPS_CONVENTION = "fwd 4*B*H*S^2*D*(0.5 causal); bwd 2.5x fwd; fwd+bwd 3.5x fwd"
ROWS: list[dict] = []


def fwd_flops(B, S, causal=True, h=H, d=D):
    return 4 * B * h * S * S * d * (0.5 if causal else 1.0)


TOL = 2e-2  # relative error of a bf16 attention against its reference (bf16 output rounding is ~4e-3)


def check_row(what: str, err: float) -> None:
    """A correctness row (judged by main's verdict) for a check made at a timed shape."""
    ROWS.append(dict(section="correctness", kernel=what, config="at the timed shape", rel_err=err, ok=err <= TOL))


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn) -> float:
    """Median ms on CUDA; in the smoke run the wall-clock of one interpreted call (it checks the script only)."""
    return time_ms(fn, warmup=25, rep=100)


def sync() -> None:
    if not SMOKE:
        torch.cuda.synchronize()


def short(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


CANDIDATES: set[str] = set()  # names of the backward configs checked and timed but not in the tuner's list


def cfg_name(cfg: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_M2", "BLOCK_N2", "num_warps", "WARPS", "num_stages", "STAGES", "DQ_WARPS",
            "DQ_STAGES")
    dims = "/".join(str(cfg[k]) for k in keys if k in cfg)
    flags = [f for f in ("USE_TMA", "WARP_SPECIALIZE", "ATOMIC_DQ", "DQ_REDUCE", "PERSISTENT") if cfg.get(f)]
    return dims + ("+" + "+".join(f.lower() for f in flags) if flags else "")


def causal_inputs(B, S, h=H, kv=H, requires_grad=False):
    q = torch.randn(B, S, h, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, S, kv, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, S, kv, D, device=DEVICE, dtype=DTYPE)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


# ----------------------------------------------------------------------------------------------
# 1. Correctness of every config

def check_configs():
    B, S = CHECK_SHAPE
    q, k, v = causal_inputs(B, S)
    do = torch.randn_like(q)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    tma = tma_eligible(D, q, k, v)
    common = dict(sm_scale=D ** -0.5, left=UNBOUNDED, right=0)
    tol = TOL
    good_fwd, good_bwd, o, lse = [], [], None, None
    for cfg in kfwd.forward_configs(DTYPE, D, tma):
        row = dict(section="correctness", kernel="forward", config=cfg_name(cfg))
        try:
            out = torch.full_like(q, float("nan"))
            lse_buf = torch.full((B, H, S), float("nan"), device=DEVICE)
            kfwd.attention_forward(q, k, v, config=cfg, out=out, lse=lse_buf, **common)
            sync()
            row["rel_err"] = rel_err(out, ref)
            row["ok"] = row["rel_err"] <= tol and bool(torch.isfinite(lse_buf).all())
            if row["ok"]:
                good_fwd.append(cfg)
                o, lse = out, lse_buf
        except Exception as err:  # noqa: BLE001 - report and go on
            row.update(ok=False, error=short(err))
        ROWS.append(row)
        log(f"check forward  {row['config']:40s} {'ok' if row['ok'] else 'FAILED'} "
            f"{row.get('rel_err', row.get('error'))}")
    if o is None:
        raise RuntimeError("no forward config passed the correctness check")
    shipped = kbwd.backward_configs(DTYPE, D, tma)  # the tuner's list; the candidates are checked and timed alone
    for cfg in kbwd.backward_configs(DTYPE, D, tma, candidates=True):
        if cfg not in shipped:
            CANDIDATES.add(cfg_name(cfg))
        row = dict(section="correctness", kernel="backward", config=cfg_name(cfg), candidate=cfg not in shipped)
        try:
            bufs = dict(dq=torch.full_like(q, float("nan")), dk=torch.full_like(k, float("nan")),
                        dv=torch.full_like(v, float("nan")))
            grads = kbwd.attention_backward(do, q, k, v, o, lse, config=cfg, **bufs, **common)
            sync()
            errs = [rel_err(g, r) for g, r in zip(grads[:3], ref_grads)]
            row["rel_err"] = max(errs)
            row["ok"] = row["rel_err"] <= tol
            if row["ok"]:
                good_bwd.append(cfg)
        except Exception as err:  # noqa: BLE001
            row.update(ok=False, error=short(err))
        ROWS.append(row)
        log(f"check backward {row['config']:40s} {'ok' if row['ok'] else 'FAILED'} "
            f"{row.get('rel_err', row.get('error'))}")
    if not good_bwd:
        raise RuntimeError("no backward config passed the correctness check")
    # the default path (the "fastft" rows) tunes as users' runs do: over the tuner's list, the verified ones
    restrict_configs(good_fwd, [c for c in good_bwd if c in shipped] or good_bwd)
    return good_fwd, good_bwd


def restrict_configs(good_fwd: list[dict], good_bwd: list[dict]) -> None:
    """The default path tunes only among the configs verified here. Each function returns the same list object on
    every call, as the lru_cached originals do: the tuner registry is keyed by the list's identity, and a new list
    per call would take its slow path (~35 µs of host time a lookup, inside the timings) and grow it every call."""
    fwd, bwd = list(good_fwd), list(good_bwd)
    kfwd.forward_configs = lambda *a: fwd
    kbwd.backward_configs = lambda *a: bwd


def compiled_spills():
    """Registers and spills of every attention kernel compiled so far, on this machine's triton and ptxas (CI's
    sm_90 compile check runs its own triton version). Reads triton's per-device kernel caches, an internal
    structure: on a triton where it differs the report is skipped, nothing else."""
    for fn in (kfwd._attn_fwd_kernel, kbwd._attn_bwd_dkdv_kernel, kbwd._attn_bwd_dq_kernel):
        try:
            kernels = [k for entry in fn.device_caches.values() for k in entry[0].values()]
            for k in kernels:
                md = k.metadata
                row = dict(section="compiled", kernel=md.name, warps=md.num_warps, stages=md.num_stages,
                           smem=md.shared, regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None))
                ROWS.append(row)
                log(f"compiled {row['kernel'][:40]:40s} warps {row['warps']} stages {row['stages']} "
                    f"smem {row['smem']} regs {row['regs']} spills {row['spills']}")
        except Exception as err:  # noqa: BLE001 - a report only
            log(f"compiled-kernel report skipped for {getattr(fn, '__name__', fn)}: {short(err)}")


# ----------------------------------------------------------------------------------------------
# 2. Dense causal: configs, the default path, SDPA

def peak_gib(fn) -> float | None:
    return None if SMOKE else peak_memory_gib(fn)


def sdpa_fns(q, k, v, do, backend):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2).contiguous()
    F = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with sdpa_kernel(backend), torch.no_grad():
            return F(qt, kt, vt, is_causal=True)

    def fwd_bwd():
        with sdpa_kernel(backend):
            out = F(qt, kt, vt, is_causal=True)
            return torch.autograd.grad(out, (qt, kt, vt), dot)

    return fwd, fwd_bwd


def time_method(shape, method, fwd, fwd_bwd, flops):
    row = dict(section="dense", shape=f"B{shape[0]}xS{shape[1]}", B=shape[0], S=shape[1], H=H, D=D,
               method=method)
    try:
        row["fwd_ms"] = bench(fwd)
        row["fwdbwd_ms"], clocks = clock_log().timed(lambda: bench(fwd_bwd))  # the clock it ran at (power limit)
        row["fwdbwd_sm_mhz"], row["fwdbwd_power_w"] = rounded(clocks, "sm_mhz"), rounded(clocks, "power_w")
        row["fwd_tflops"] = flops / row["fwd_ms"] * 1e-9
        row["fwdbwd_tflops"] = 3.5 * flops / row["fwdbwd_ms"] * 1e-9
        row["peak_gib"] = peak_gib(fwd_bwd)
    except Exception as err:  # noqa: BLE001
        row["error"] = short(err)
    ROWS.append(row)
    log(f"{row['shape']:10s} {method:22s} " + (f"fwd {row['fwd_ms']:.3f} ms ({row['fwd_tflops']:.0f} TFLOP/s), "
        f"fwd+bwd {row['fwdbwd_ms']:.3f} ms ({row['fwdbwd_tflops']:.0f})"
        + (f" at {row['fwdbwd_sm_mhz']} MHz, {row['fwdbwd_power_w']} W" if row.get("fwdbwd_sm_mhz") else "")
        if "error" not in row else row["error"]))
    return row


def dense(shape, good_fwd, good_bwd):
    from torch.nn.attention import SDPBackend

    B, S = shape
    flops = fwd_flops(B, S)
    q, k, v = causal_inputs(B, S, requires_grad=True)
    do = torch.randn_like(q)
    common = dict(sm_scale=D ** -0.5, left=UNBOUNDED, right=0)
    qd, kd, vd = (t.detach() for t in (q, k, v))

    # each config alone (forward; backward = delta + dK/dV (+ dQ) kernels)
    o, lse = kfwd.attention_forward(qd, kd, vd, config=good_fwd[0], **common)
    for kernel, configs in (("forward", good_fwd), ("backward", good_bwd)):
        for cfg in configs:
            row = dict(section="configs", shape=f"B{B}xS{S}", kernel=kernel, config=cfg_name(cfg),
                       candidate=cfg_name(cfg) in CANDIDATES)
            try:
                if kernel == "forward":
                    row["ms"] = bench(lambda: kfwd.attention_forward(qd, kd, vd, config=cfg, **common))
                    row["tflops"] = flops / row["ms"] * 1e-9
                else:
                    row["ms"] = bench(lambda: kbwd.attention_backward(do, qd, kd, vd, o, lse, config=cfg, **common))
                    row["tflops"] = 2.5 * flops / row["ms"] * 1e-9
            except Exception as err:  # noqa: BLE001
                row["error"] = short(err)
            ROWS.append(row)
            log(f"{row['shape']:10s} {kernel:8s} {row['config']:40s} "
                + (f"{row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s" if "ms" in row else row["error"]))

    if DEVICE == "cuda":
        backward_kernels(f"B{B}xS{S}", good_bwd, functools.partial(kbwd.attention_backward, do, qd, kd, vd, o, lse,
                                                                   **common))

    def ours_fwd():
        with torch.no_grad():
            return flash_attention(qd, kd, vd, causal=True, backend=BACKEND)

    def ours_fwd_bwd():
        return torch.autograd.grad(flash_attention(q, k, v, causal=True, backend=BACKEND), (q, k, v), do)

    ours_fwd_bwd()  # tunes both passes outside the timed region
    out = ours_fwd()
    rows = [time_method(shape, "fastft", ours_fwd, ours_fwd_bwd, flops)]
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            f, fb = sdpa_fns(q, k, v, do, backend)
            agree = rel_err(out, f().transpose(1, 2))
            log(f"{'':10s} fastft vs {name} output: rel err {agree:.2e}")
            check_row(f"{shape} output vs {name}", agree)
        except Exception as err:  # noqa: BLE001
            log(f"{name} unavailable: {short(err)}")
            ROWS.append(dict(section="dense", shape=f"B{B}xS{S}", method=name, error=short(err)))
            continue
        row = time_method(shape, name, f, fb, flops)
        row["fastft_rel_err"] = agree
        rows.append(row)
    del q, k, v, do, o, lse
    return rows


def fastest_config(kernel: str, shape: str, configs: list[dict]) -> dict | None:
    """The tuner's fastest config at `shape` by its "configs" rows (candidates left out); None where none was timed."""
    timed = [r for r in ROWS if r.get("section") == "configs" and r.get("kernel") == kernel
             and r.get("shape") == shape and "ms" in r and not r.get("candidate")]
    if not timed:
        return None
    name = min(timed, key=lambda r: r["ms"])["config"]
    return next(c for c in configs if cfg_name(c) == name)


def backward_kernels(shape: str, good_bwd: list[dict], backward, steps: int = 3) -> None:
    """Where the backward's time goes (device ms a call in each kernel: delta, dK/dV, dQ, torch's fills and the
    fp32 dQ's scaling): the tuner's fastest config at this shape (its "configs" rows) and each candidate adding dQ by
    TMA reduce-adds, whose case rests on the dQ kernel's share."""
    fastest = fastest_config("backward", shape, good_bwd)
    for cfg in ([fastest] if fastest else []) + [c for c in good_bwd if c.get("DQ_REDUCE")]:
        row = dict(section="bwd_kernels", shape=shape, config=cfg_name(cfg), candidate=cfg_name(cfg) in CANDIDATES)
        try:
            row["kernels_ms"] = kernel_ms(kernel_spans(lambda cfg=cfg: backward(config=cfg), steps), steps)
        except Exception as err:  # noqa: BLE001 - a diagnostic: never ends the shape
            row["error"] = short(err)
        ROWS.append(row)
        log(f"{shape:10s} backward kernels {row['config']:40s} "
            + (", ".join(f"{k} {v:.3f}" for k, v in row["kernels_ms"].items()) if "kernels_ms" in row
               else row["error"]))


def print_backward_kernels() -> None:
    rows = [r for r in ROWS if r.get("section") == "bwd_kernels"]
    if not rows:
        return
    names = ("_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "torch")
    print("\n### Backward, device ms a call by kernel (delta / dK-dV / dQ / torch: fills, the fp32 dQ's scaling)")
    print("| shape | config | delta | dK/dV | dQ | torch | sum |\n|---|---|---|---|---|---|---|")
    for r in rows:
        parts = r.get("kernels_ms") or {}
        cells = " | ".join(fmt(parts.get(n), ".3f") for n in names)
        total = sum(parts.values()) if parts else None
        print(f"| {r['shape']} | {r['config']}{' (candidate)' if r.get('candidate') else ''} | {cells} | "
              f"{fmt(total, '.3f')} |" + (f" {r['error']}" if "error" in r else ""))


# ----------------------------------------------------------------------------------------------
# 3. Packed vs padded

def doc_lengths(n=32, median=500, sigma=0.8, lo=16, hi=2048, seed=0):
    if SMOKE:
        n, median, hi = 4, 20, 48
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * sigma + math.log(median)
    return [int(min(hi, max(lo, round(math.exp(t))))) for t in x.tolist()]


def packed_vs_padded(best_fwd, best_bwd):
    from torch.nn.attention import SDPBackend

    lengths = doc_lengths()
    n, total, S = len(lengths), sum(lengths), max(lengths)
    useful = sum(fwd_flops(1, L) for L in lengths)
    info = dict(n_docs=n, total_tokens=total, max_len=S, mean_len=total / n, padded_tokens=n * S)
    log(f"packed vs padded: {info}")
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q, k, v = (torch.randn(total, H, D, device=DEVICE, dtype=DTYPE) for _ in range(3))
    do = torch.randn_like(q)
    common = dict(sm_scale=D ** -0.5, left=UNBOUNDED, right=0)
    rows = []

    def add(method, layout, fn):
        row = dict(section="packing", method=method, layout=layout, **info)
        try:
            row["fwdbwd_ms"] = bench(fn)
            row["useful_tflops"] = 3.5 * useful / row["fwdbwd_ms"] * 1e-9
            row["peak_gib"] = peak_gib(fn)
        except Exception as err:  # noqa: BLE001
            row["error"] = short(err)
        ROWS.append(row)
        rows.append(row)
        log(f"{method:12s} {layout:7s} " + (f"{row['fwdbwd_ms']:.3f} ms, useful {row['useful_tflops']:.0f} TFLOP/s"
                                             if "error" not in row else row["error"]))

    # packed: the varlen kernels with the configs that won the dense runs (no extra tuning compiles)
    kw = dict(cu_seqlens=cu, max_seqlen=S, **common)
    try:
        o, lse = kfwd.attention_forward(q, k, v, config=best_fwd, **kw)
        dq, dk, dv = kbwd.attention_backward(do, q, k, v, o, lse, config=best_bwd, **kw)[:3]
        bounds = cu.tolist()[:4]
        docs = [[t[None, a:b].float().requires_grad_() for t in (q, k, v)] for a, b in zip(bounds[:-1], bounds[1:])]
        refs = [attention_reference(*doc, causal=True) for doc in docs]
        grads = [torch.autograd.grad(ref, doc, do[None, a:b].float())
                 for ref, doc, (a, b) in zip(refs, docs, zip(bounds[:-1], bounds[1:]))]
        end = int(cu[3])
        for what, got, want in (("output", o, [r[0] for r in refs]), ("dq", dq, [g[0][0] for g in grads]),
                                ("dk", dk, [g[1][0] for g in grads]), ("dv", dv, [g[2][0] for g in grads])):
            err = rel_err(got[:end], torch.cat(want))
            log(f"packed {what} (first 3 docs) vs fp32 reference: rel err {err:.2e}")
            check_row(f"packed {what}", err)
    except Exception as err:  # noqa: BLE001
        log(f"packed check failed: {short(err)}")
        ROWS.append(dict(section="correctness", kernel="packed", config="check", ok=False, error=short(err)))

    def packed():
        o, lse = kfwd.attention_forward(q, k, v, config=best_fwd, **kw)
        return kbwd.attention_backward(do, q, k, v, o, lse, config=best_bwd, **kw)

    add("fastft", "packed", packed)
    # padded: right padding keeps causal rows of real tokens exact, so every method computes the same values
    pad = lambda t: torch.nn.utils.rnn.pad_sequence(list(t.split(lengths)), batch_first=True)  # noqa: E731
    qp, kp, vp, dop = (pad(t) for t in (q, k, v, do))

    def padded():
        o, lse = kfwd.attention_forward(qp, kp, vp, config=best_fwd, **common)
        return kbwd.attention_backward(dop, qp, kp, vp, o, lse, config=best_bwd, **common)

    add("fastft", "padded", padded)
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        _, fb = sdpa_fns(qp, kp, vp, dop, backend)
        add(name, "padded", fb)
    return rows, info


# ----------------------------------------------------------------------------------------------

def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def main():
    if not SMOKE and not torch.cuda.is_available():
        print("needs a CUDA GPU (or FASTFT_BENCH_SMOKE=1 for a CPU smoke run)")
        return 1
    card = "cpu (smoke run, Triton interpreter)" if SMOKE else card_name()
    log(f"{card}; torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)

    def save():  # after every part and shape: a run cut short keeps what finished
        write_results("attention", dict(card=card, torch=torch.__version__, triton=triton.__version__,
                                        dtype=str(DTYPE), flops_convention=FLOPS_CONVENTION,
                                        elapsed_s=time.time() - T0, rows=ROWS))
    try:
        good_fwd, good_bwd = check_configs()
    finally:
        save()
    if not SMOKE:
        compiled_spills()
    dense_rows = []
    for shape in SHAPES:
        dense_rows += dense(shape, good_fwd, good_bwd)
        save()
        if not SMOKE:
            torch.cuda.empty_cache()

    def best(kernel):
        configs = good_fwd if kernel == "forward" else good_bwd
        return fastest_config(kernel, f"B{SHAPES[0][0]}xS{SHAPES[0][1]}", configs) or configs[0]

    pack_rows, info = [], {}
    try:
        pack_rows, info = packed_vs_padded(best("forward"), best("backward"))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    save()

    print(f"\n### Attention on {card} (causal, H={H}, D={D}, bf16; FLOPs: fwd 4·B·H·S²·D/2, fwd+bwd 3.5× that)")
    print("| shape | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB "
          "| fwd+bwd speed-up vs flash | vs cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        name = f"B{shape[0]}xS{shape[1]}"
        rows = {r["method"]: r for r in dense_rows if r["shape"] == name}
        for method, r in rows.items():
            ratio = {p: (rows[p]["fwdbwd_ms"] / r["fwdbwd_ms"] if "fwdbwd_ms" in rows.get(p, {}) and "fwdbwd_ms" in r
                         else None) for p in ("sdpa_flash", "sdpa_cudnn")}
            print(f"| {name} | {method} | {fmt(r.get('fwd_ms'), '.3f')} | {fmt(r.get('fwd_tflops'), '.0f')} | "
                  f"{fmt(r.get('fwdbwd_ms'), '.3f')} | {fmt(r.get('fwdbwd_tflops'), '.0f')} | "
                  f"{fmt(r.get('peak_gib'), '.2f')} | {fmt(ratio['sdpa_flash'], '.2f')} | "
                  f"{fmt(ratio['sdpa_cudnn'], '.2f')} |")
    print_backward_kernels()
    if pack_rows:
        base = next((r for r in pack_rows if r["layout"] == "packed" and "fwdbwd_ms" in r), None)
        print(f"\n### Packed vs padded fwd+bwd: {info['n_docs']} documents, {info['total_tokens']} tokens "
              f"(mean {info['mean_len']:.0f}, max {info['max_len']}; padded {info['padded_tokens']})")
        print("| method | layout | fwd+bwd ms | useful TFLOP/s | peak GiB | time ÷ fastft packed |")
        print("|---|---|---|---|---|---|")
        for r in pack_rows:
            rel = r["fwdbwd_ms"] / base["fwdbwd_ms"] if base and "fwdbwd_ms" in r else None
            print(f"| {r['method']} | {r['layout']} | {fmt(r.get('fwdbwd_ms'), '.3f')} | "
                  f"{fmt(r.get('useful_tflops'), '.0f')} | {fmt(r.get('peak_gib'), '.2f')} | {fmt(rel, '.2f')} |")
    failed = [r for r in ROWS if r.get("section") == "correctness" and not r.get("ok")]
    configs = [r for r in failed if r["config"] not in ("at the timed shape", "check")]
    timed = [r for r in failed if r not in configs]
    print(f"\nconfigs failing to compile or check (left out of the timings): {len(configs)}"
          + "".join(f"\n- {r['kernel']} {r['config']}: {r.get('error', r.get('rel_err'))}" for r in configs))
    print(f"total {time.time() - T0:.0f} s")
    # the verdict last, where summary.md's log tail shows it: a check failing at a timed shape voids the timings
    print("correctness at the timed shapes:", "ok" if not timed else "FAILED, the timings above are not results: "
          + "; ".join(f"{r['kernel']}: {r.get('error', r.get('rel_err'))}" for r in timed))
    return 1 if timed else 0


if __name__ == "__main__":
    sys.exit(main())
