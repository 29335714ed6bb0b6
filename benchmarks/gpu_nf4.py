"""NF4 / QLoRA on the GPU: correctness first, then the card's copy bandwidth, dequant bandwidth, decode GEMV, QLoRA
linear fwd+bwd and memory.

    PYTHONPATH=$PWD/.peers:$PWD python3 benchmarks/gpu_nf4.py      # bitsandbytes/peft as peers when importable

Peers timed in the same run: bitsandbytes (dequantize_4bit, Linear4bit), peft LoRA on bitsandbytes NF4, and the
frozen bf16 base (x @ W.T forward + dy @ W backward). fastft's QLoRA is timed on both base-GEMM paths (fused: NF4
decoded in registers; dequant: one shared scratch + the dense LoRA GEMM) and on the one fastft.ops.qlora_path
selects, each checked against fp32 first. Every variant runs in its own try: one that fails is
reported, the rest go on. Timing, memory, the card and the results file come from the shared harness
(fastft.apps.bench.harness; medians of triton.testing.do_bench). Dequant and GEMV bandwidths are also given as a
fraction of a 1 GiB device-to-device copy_ timed in the same run (the issue's yardstick for dequant), and each
dequant beside a copy moving its bytes (a CUDA graph replay: what a transfer of that size can reach). Writes
$OUT/nf4.json when $OUT is set (or the --output-dir of `fastft bench kernels --family nf4`) after every shape of every
part, so a run cut short keeps what finished, and prints short markdown tables last. Exits 1 when a correctness check
failed, raised or did not run, or a whole part crashed. Budget: about 2–3 minutes on an H100 including compilation.
FASTFT_BENCH_SMOKE=1 runs it on the CPU (Triton interpreter, toy sizes; no CUDA GEMV) to catch script errors.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from unittest import mock

from smoke_mode import BACKEND, DEVICE as DEV, SMOKE  # first: the interpreter before triton loads

import torch

import fastft
from fastft.apps.bench.clocks import clock_log, record_round
from fastft.apps.bench.harness import (card_name, concurrency_share, graphed, hbm_spec_tbps, host_ms, log,
                                       paired_ratio, peak_memory_mib, time_ms, versions, write_results)
from fastft.kernels.rank_ops import rank_pad
from fastft.ops import qlora_path
from fastft.quant import NF4Weight, quantize_nf4

BF16 = torch.bfloat16
SHAPES = [(128, 64), (64, 96)] if SMOKE else [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K in, N out), as in
M_TRAIN, RANK, ALPHA = (40 if SMOKE else 8192), 16, 32                                      # ../shared/anchors
BATCHES = (1, 4) if SMOKE else (1, 4, 16)
# optional timings (the peft+bnb peer, the interleaved retimes, the prefetch rows) are skipped past this: gpu_check.sh
# caps the run at 150 s. Not in the CPU smoke run, which checks every variant and whose time depends on the
# machine's load (CI's 2 workers took >120 s)
DEADLINE_S = float("inf") if SMOKE else 130
GEMV_TOL = 1e-2  # relative error of the bf16 GEMV against fp32 (bf16 output rounding is ~4e-3)
T0 = time.time()
RESULTS: dict = {"errors": []}
PATHS = ("fused", "dequant", "auto")  # QLoRA base GEMM: in-register NF4, shared-scratch dequant, measured choice


def qlora_path_forced(path: str):
    """FASTFT_QLORA_PATH set to `path` inside the block (auto: the selector measures per shape)."""
    return mock.patch.dict(os.environ, {qlora_path.ENV: path})


try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
except Exception as err:  # noqa: BLE001
    bnb = bnbf = None
    RESULTS["errors"].append(f"bitsandbytes not importable: {err}")


def attempt(what: str, fn, optional: bool = False):
    if optional and time.time() - T0 > DEADLINE_S:
        RESULTS["errors"].append(f"{what}: skipped (time budget)")
        return None
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - report and keep going
        RESULTS["errors"].append(f"{what}: {type(err).__name__}: {err}")
        log(f"FAILED {what}: {type(err).__name__}: {err}")
        traceback.print_exc(limit=3)
        return None


def cuda_gemv():
    """fastft's CUDA GEMV (fastft._C built with nvcc) when it can run: on a GPU, not in the smoke run."""
    from fastft.kernels import nf4_cuda
    return nf4_cuda if DEV == "cuda" and nf4_cuda.available() else None


def bench(fn, grad_to_none=None) -> float:
    return time_ms(fn, warmup=10, rep=40, grad_to_none=grad_to_none)


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def dequant_bytes(w: NF4Weight, out_dtype) -> int:
    return w.nbytes + w.numel() * torch.empty((), dtype=out_dtype).element_size()


def bnb_state(x: torch.Tensor):
    packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    sd = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    sd["w"] = packed
    return packed, state, NF4Weight.from_bnb_state_dict(sd, "w")


# ----------------------------------------------------------------------------------------------
# 1. correctness

def check_correctness():
    out = {}
    from fastft.kernels.nf4_dequant import nf4_dequantize
    from fastft.quant import nf4_format as fmt
    for K, N in SHAPES:
        w = quantize_nf4(torch.randn(N, K, dtype=BF16, device=DEV) * 0.02)
        ref = fmt.dequantize_nf4_torch(w.packed, w.block_absmax(), w.numel(), 64, BF16)
        for cfg in dequant_configs():  # the candidates too: checked before they are timed
            got = nf4_dequantize(w.packed, w.absmax, w.numel(), 64, BF16, w.code, absmax2=w.absmax2, code2=w.code2,
                                 offset=w.offset, config=cfg)
            out[f"dequant {K}x{N} {cfg} exact vs torch"] = bool(torch.equal(got, ref))
        if bnbf is not None:
            packed, state, ours = bnb_state(torch.randn(N, K, dtype=BF16, device=DEV))
            out[f"dequant {K}x{N} exact vs bitsandbytes"] = bool(torch.equal(ours.dequantize(),
                                                                             bnbf.dequantize_4bit(packed, state)))
    (K, N), M = SHAPES[0], (37 if SMOKE else M_TRAIN)  # the timed M: `auto` picks its path per M bucket
    w = quantize_nf4(torch.randn(N, K, dtype=BF16, device=DEV) * 0.02)
    W = w.dequantize(torch.float32)
    x = torch.randn(M, K, dtype=BF16, device=DEV, requires_grad=True)
    A = (torch.randn(RANK, K, device=DEV) * 0.02).requires_grad_()
    B = (torch.randn(N, RANK, device=DEV) * 0.02).requires_grad_()
    dy = torch.randn(M, N, dtype=BF16, device=DEV)
    xf, Af, Bf = (t.detach().float().requires_grad_() for t in (x, A, B))
    yf = xf @ W.T + 2.0 * (xf @ Af.T) @ Bf.T
    yf.backward(dy.float())
    for path in PATHS:  # both base-GEMM paths, then the one the selector measures and picks
        def one(path=path):
            x.grad = A.grad = B.grad = None
            with qlora_path_forced(path):
                y = fastft.qlora_linear(x, w, None, A, B, 2.0, backend=BACKEND)
                y.backward(dy)
            errs = [rel(y, yf), rel(x.grad, xf.grad), rel(A.grad, Af.grad), rel(B.grad, Bf.grad)]
            out[f"qlora {path} rel err y / dx / dA / dB (bf16, vs fp32)"] = errs
            return max(errs) < 1e-2
        out[f"qlora {path} within 1e-2 of fp32"] = attempt(f"qlora {path} correctness", one)
    from fastft.kernels.nf4_gemm import gemm_configs, nf4_lora_gemm
    lo = torch.randn(M, 16, dtype=BF16, device=DEV) * 0.02
    Bt = torch.randn(N, 16, dtype=BF16, device=DEV) * 0.02
    At = torch.randn(16, K, dtype=BF16, device=DEV) * 0.02
    for cfg in gemm_configs(2):  # every config the tuner may pick (the kernels QLoRA compiles anyway)
        def one(cfg=cfg):
            op = w.kernel_operand()
            yc = nf4_lora_gemm(x.detach(), op, lo, Bt, None, w_nk=True, config=cfg)
            dxc = nf4_lora_gemm(dy, op, lo, At, None, w_nk=False, config=cfg)
            errs = (rel(yc, x.detach().float() @ W.T + lo.float() @ Bt.float().T),
                    rel(dxc, dy.float() @ W + lo.float() @ At.float()))
            return max(errs) < 1e-2
        out[f"gemm config {cfg} within 1e-2 of fp32"] = attempt(f"gemm config {cfg}", one)
    nf4_cuda = cuda_gemv()
    if nf4_cuda is not None:
        out["gemv table kernel agrees with scaled"] = attempt(
            "gemv table check", lambda: nf4_cuda.table_agrees(torch.device(DEV, torch.cuda.current_device()), BF16))
        for Kg, Ng in SHAPES:  # every timed shape: the automatic pick may differ between them
            wg = quantize_nf4(torch.randn(Ng, Kg, dtype=BF16, device=DEV) * 0.02)
            Wg = wg.dequantize(torch.float32)
            for batch in BATCHES:
                xb = torch.randn(batch, Kg, dtype=BF16, device=DEV)
                for name, v in gemv_kernels(nf4_cuda):
                    out[f"gemv {name} {Kg}->{Ng} batch {batch} rel err"] = attempt(
                        f"gemv {name} {Kg}->{Ng} batch {batch}",
                        lambda v=v, xb=xb, wg=wg, Wg=Wg: rel(nf4_cuda.nf4_gemv(xb, wg.kernel_operand(), None, v),
                                                            xb.float() @ Wg.T))
                # the candidates run TABLE's arithmetic in the same order: bit-identical y
                for name, v in (("table_lean", nf4_cuda.TABLE_LEAN), ("table_deep", nf4_cuda.TABLE_DEEP)):
                    out[f"gemv {name} == table {Kg}->{Ng} batch {batch}"] = attempt(
                        f"gemv {name} == table {Kg}->{Ng} batch {batch}",
                        lambda xb=xb, wg=wg, v=v: torch.equal(
                            nf4_cuda.nf4_gemv(xb, wg.kernel_operand(), None, v),
                            nf4_cuda.nf4_gemv(xb, wg.kernel_operand(), None, nf4_cuda.TABLE)))
    elif DEV == "cuda":
        RESULTS["errors"].append("fastft._C has no CUDA GEMV (built without nvcc?)")
        out["CUDA GEMV built (fastft._C)"] = False
    return out


def gemv_kernels(nf4_cuda) -> list[tuple[str, int]]:
    """(name, variant) of every CUDA GEMV kernel, checked and timed forced: the tuner's four, then the candidates
    waiting for a GPU (TABLE_DEEP_K4 / _K2: K split over 4 / 2 warps)."""
    return [("scaled", nf4_cuda.SCALED), ("table", nf4_cuda.TABLE), ("table_lean", nf4_cuda.TABLE_LEAN),
            ("table_deep", nf4_cuda.TABLE_DEEP), ("table_deep_k4", nf4_cuda.TABLE_DEEP_K4),
            ("table_deep_k2", nf4_cuda.TABLE_DEEP_K2)]


def failed_checks(checks: dict | None) -> list[str]:
    """The correctness entries that failed: False, None (the check raised; the error is in RESULTS["errors"]) or a
    GEMV relative error above GEMV_TOL (NaN included). Lists are the QLoRA paths' errors, judged by their
    `within 1e-2` entry."""
    if checks is None:
        return ["correctness did not run"]
    bad = []
    for name, value in checks.items():
        if value is None or value is False:
            bad.append(f"{name}: {'raised' if value is None else 'False'}")
        elif isinstance(value, float) and not value <= GEMV_TOL:
            bad.append(f"{name}: {value:.2e} > {GEMV_TOL:.0e}")
    return bad


def save():
    """The results so far to $OUT/nf4.json (rewritten after every shape: a run cut short keeps what finished)."""
    RESULTS["wall_s"] = time.time() - T0
    write_results("nf4", RESULTS)


def run_part(name: str, fn) -> bool:
    """RESULTS[name]: the rows fn(rows) appends (saving after each); False when fn raised (the rows so far stay)."""
    rows = RESULTS[name] = []
    ok = attempt(name, lambda: fn(rows) or True) is not None
    save()
    return ok


def of_copy(tbps):
    """A bandwidth as a fraction of the card's measured device-to-device copy bandwidth (None when either is)."""
    copy = (RESULTS.get("copy") or [{}])[0].get("TBps")
    return tbps / copy if tbps and copy else None


# ----------------------------------------------------------------------------------------------
# 2. the card's copy bandwidth, dequantization bandwidth

def time_copy(rows):
    """A 1 GiB device-to-device copy_ (read + write): what a bandwidth-bound kernel can reach on this card."""
    n = (1 << 20) if SMOKE else (1 << 30)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    rows.append({"bytes": n, "ms": ms, "TBps": 2 * n / ms / 1e9})
    log(f"copy {rows[-1]}")


def dequant_configs() -> list[dict]:
    """The tuner's configs, then the candidates waiting for a GPU (nf4_dequant.candidate_configs)."""
    from fastft.kernels import nf4_dequant
    return nf4_dequant._configs() + nf4_dequant.candidate_configs()


def config_label(cfg: dict) -> str:
    decode = {0: "gather", 1: "select", 2: "prmt"}.get(cfg["DECODE"], cfg["DECODE"])
    return f"{cfg['BLOCK']}-{decode}-w{cfg['num_warps']}{'-row4' if cfg.get('ROW4') else ''}"


def dequant_into(op, buf, cfg):
    """W decoded into buf as the QLoRA dequant path does (fastft.ops.qlora_path.dequant_scratch), cfg forced or the
    tuner's (None)."""
    from fastft.kernels.nf4_dequant import nf4_dequantize
    nested = op.absmax2 is not None
    return nf4_dequantize(op.packed, op.absmax, buf.numel(), op.blocksize, BF16, op.code,
                          absmax2=op.absmax2 if nested else None, code2=op.code2 if nested else None,
                          offset=op.offset if nested else 0.0, nested_blocksize=op.nested_blocksize, config=cfg,
                          out=buf)


def time_dequant(rows):
    for K, N in SHAPES:
        x = torch.randn(N, K, dtype=BF16, device=DEV) * 0.02
        w = quantize_nf4(x)
        ms = bench(lambda: w.dequantize(BF16))
        row = {"shape": f"{N}x{K}", "fastft_ms": ms, "fastft_TBps": dequant_bytes(w, BF16) / ms / 1e9}
        row["fastft_of_copy"] = of_copy(row["fastft_TBps"])
        # device time alone (a CUDA graph replay: at 4096x4096 the ~10 us kernel is shorter than a launch's host
        # time), the selected config and each config forced, into one preallocated buffer as the QLoRA scratch
        op, buf = w.kernel_operand(), torch.empty(w.numel(), dtype=BF16, device=DEV)
        graph_cases = [("selected", None)] + [(config_label(c), c) for c in dequant_configs()] if DEV == "cuda" else []
        for label, cfg in graph_cases:
            ms_g = attempt(f"dequant {label} graph", lambda cfg=cfg: bench(graphed(
                lambda: dequant_into(op, buf, cfg))), optional=True)
            if ms_g:
                row[f"graph_{label}_ms"] = ms_g
                row[f"graph_{label}_of_copy"] = of_copy(dequant_bytes(w, BF16) / ms_g / 1e9)
        if DEV == "cuda":  # the floor at this size: 1 GiB's rate is out of reach of a ~40 MB transfer (launch, ramp)
            half = torch.empty(dequant_bytes(w, BF16) // 2, dtype=torch.uint8, device=DEV)
            twin = torch.empty_like(half)
            ms_c = attempt("same-bytes copy graph", lambda: bench(graphed(lambda: twin.copy_(half))), optional=True)
            if ms_c:
                row["graph_same_bytes_copy_ms"] = ms_c
                if row.get("graph_selected_ms"):
                    row["graph_selected_of_same_bytes_copy"] = ms_c / row["graph_selected_ms"]
            del half, twin
        if bnbf is not None:
            packed, state, ours = bnb_state(x)
            ms_b = bench(lambda: bnbf.dequantize_4bit(packed, state))
            row.update(bnb_ms=ms_b, bnb_TBps=dequant_bytes(ours, BF16) / ms_b / 1e9)
        rows.append(row)
        log(f"dequant {row}")
        save()


# ----------------------------------------------------------------------------------------------
# 4. QLoRA linear forward + backward at M = 8192

def _peft_bnb_layer(W: torch.Tensor):
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class One(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    N, K = W.shape
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=BF16, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(W.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                   blocksize=64)
    model = get_peft_model(One(lin).to(DEV), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                                        lora_dropout=0.0))
    for p in model.parameters():  # peft initializes B to zero; a random B times the real work
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _peak(fn, clear=()) -> float:
    for t in clear:  # gradients left by the timing runs would count as memory held before the call
        t.grad = None
    return peak_memory_mib(fn)


def forced_bench(path: str, step, grads) -> float:
    with qlora_path_forced(path):  # around the timing, not each call: no host time added to a host-bound call
        return bench(step, grads)


def retime_interleaved(row: dict, retimers: dict, rounds: int = 1 if SMOKE else 4) -> None:
    """Each headline timing again, `rounds` times, one case after another in each round, keeping the best and each
    round's time (KEY_rounds, for paired ratios). Timed once each, in order, the bf16 base ran first on a cool card
    and the later cases paid any clock drift: on 2026-12-04 two runs of one H200 read dequantize + cuBLAS without
    LoRA at 1.07 / 1.30 / 1.13 and 1.08 / 1.21 / 1.25 the base, and on 2026-12-05 an H100's base read 2.72 then
    2.42 ms at 4096->14336. The first reading of the base is kept as bf16_base_first_ms, to show the drift."""
    row["bf16_base_first_ms"] = row.get("bf16_base_ms")
    clocks = clock_log()  # the SM clock and power each round ran at (KEY_mhz_rounds, KEY_w_rounds): a ratio off by
    for _ in range(rounds):  # a clock drop is the card's power limit, not the kernels
        for key, timed in retimers.items():
            if row.get(key):
                ms, window = clocks.timed(lambda: attempt(f"{key} {row['shape']}, again", timed, optional=True))
                row[key] = min(row[key], ms) if ms else row[key]
                if ms:
                    row.setdefault(key.replace("_ms", "_rounds"), []).append(ms)
                    record_round(row, window, key.replace("_ms", "_mhz"), key.replace("_ms", "_w"))


def x_base(row: dict, key: str) -> float:
    """KEY ÷ the bf16 base: the median over the interleaved rounds of the two timed in the same round
    (harness.paired_ratio), or best ÷ best where no round holds both."""
    case, base = row.get(key.replace("_ms", "_rounds")), row.get("bf16_base_rounds")
    if case and base and len(case) == len(base):
        return paired_ratio({"ms_rounds": case}, {"ms_rounds": base})
    return row[key] / row["bf16_base_ms"]


def time_qlora(rows):
    for K, N in SHAPES[:1] if SMOKE else SHAPES:  # (the interpreter: one shape, one round, to check the script)
        W = torch.randn(N, K, dtype=BF16, device=DEV) * 0.02
        w = quantize_nf4(W)
        x = torch.randn(M_TRAIN, K, dtype=BF16, device=DEV, requires_grad=True)
        dy = torch.randn(M_TRAIN, N, dtype=BF16, device=DEV)
        A = (torch.randn(RANK, K, device=DEV) * 0.02).requires_grad_()
        B = (torch.randn(N, RANK, device=DEV) * 0.02).requires_grad_()
        s = ALPHA / RANK
        row = {"shape": f"{K}->{N}"}
        xd = x.detach()

        def base():
            (xd @ W.T, dy @ W)
        row["bf16_base_ms"] = attempt(f"bf16 base {K}->{N}", lambda: bench(base))
        retimers = {"bf16_base_ms": lambda: bench(base)}  # the headline timings, timed again interleaved below
        row["bf16_base_peak_MiB"] = attempt("peak", lambda: _peak(base))

        def step():
            fastft.qlora_linear(x, w, None, A, B, s, backend=BACKEND).backward(dy)

        def peak_with_scratch():  # the scratch freed first, so the peak counts the one buffer the call allocates
            qlora_path.release_dequant_scratch()
            return _peak(step, (x, A, B))
        for path in PATHS:  # auto last: the first call times both paths for this shape and caches the winner
            with qlora_path_forced(path):
                row[f"{path}_ms"] = attempt(f"fastft qlora {path} {K}->{N}",
                                            lambda: (step(), bench(step, [x, A, B]))[1])
                retimers[f"{path}_ms"] = lambda path=path, step=step: forced_bench(path, step, [x, A, B])
                row[f"{path}_peak_MiB"] = attempt("peak", peak_with_scratch)
        # where the dequant path's time goes beside the bf16 LoRA layer's (at 4096->4096 on an H200 it cost 1.86x the
        # base where dequantize + the base GEMM cost 1.07x): device time alone (a CUDA graph replay), host time per
        # call queued back to back, and the same call with bf16 adapters (A, B here are fp32, as peft keeps QLoRA's)
        with qlora_path_forced("dequant"):
            row["dequant_host_ms"] = attempt("host", lambda: host_ms(step, 1 if SMOKE else 20))
            if DEV == "cuda":
                row["dequant_graph_ms"] = attempt(f"fastft qlora dequant, CUDA graph {K}->{N}",
                                                  lambda: bench(graphed(step)), optional=True)
            A16, B16 = (t.detach().to(BF16).requires_grad_() for t in (A, B))

            def step_bf16_adapters():
                fastft.qlora_linear(x, w, None, A16, B16, s, backend=BACKEND).backward(dy)
            row["dequant_bf16_adapters_ms"] = attempt(
                f"fastft qlora dequant, bf16 adapters {K}->{N}",
                lambda: (step_bf16_adapters(), bench(step_bf16_adapters, [x, A16, B16]))[1])
        # the measured choice picked dequant at every shape on the H100 (2026-12-05) yet timed 2-9% slower than the
        # forced path (3.14 against 2.89 ms at 4096->14336, best of 3 interleaved): its device time alone says
        # whether the two launch other kernels or only the host differs
        if DEV == "cuda":
            with qlora_path_forced("auto"):
                row["auto_graph_ms"] = attempt(f"fastft qlora auto, CUDA graph {K}->{N}",
                                               lambda: bench(graphed(step)), optional=True)
        row["selected"] = "fwd {} / dx {}".format(
            qlora_path.chosen_path(qlora_path.path_key(M_TRAIN, N, K, rank_pad(RANK), BF16, "forward")),
            qlora_path.chosen_path(qlora_path.path_key(M_TRAIN, K, N, rank_pad(RANK), BF16, "dx")))
        row["scratch_MiB"] = N * K * 2 / 2**20
        qlora_path.release_dequant_scratch()

        def dequant_then_base():  # what a materialize-W design pays at least: two dequantizations + cuBLAS
            Wd = w.dequantize(BF16)
            xd @ Wd.T
            dy @ w.dequantize(BF16)
        row["dequant_base_ms"] = attempt(f"dequant+bf16 base {K}->{N}", lambda: bench(dequant_then_base))
        retimers["dequant_base_ms"] = lambda: bench(dequant_then_base)

        if bnb is not None:
            def setup_peft():
                model = _peft_bnb_layer(W)
                xp = x.detach().clone().requires_grad_()

                def step():
                    model(xp).backward(dy)
                step()
                return model, xp, step
            made = attempt(f"peft+bnb setup {K}->{N}", setup_peft, optional=True)
            if made is not None:
                model, xp, step = made
                grads = [xp] + [p for p in model.parameters() if p.requires_grad]
                row["peft_bnb_ms"] = attempt(f"peft+bnb {K}->{N}", lambda: bench(step, grads))
                row["peft_bnb_peak_MiB"] = attempt("peak", lambda: _peak(step, grads))
                retimers["peft_bnb_ms"] = lambda step=step, grads=grads: bench(step, grads)
        retime_interleaved(row, retimers)
        retimers.clear()
        made = model = step = grads = xp = None  # peft's layer and its gradients, before the next shape
        if row.get("bf16_base_ms"):
            for key in ("fused_ms", "dequant_ms", "auto_ms", "dequant_base_ms", "peft_bnb_ms"):
                if row.get(key):
                    row[key.replace("_ms", "_x_base")] = x_base(row, key)
        rows.append(row)
        log(f"qlora {row}")
        save()
        x.grad = A.grad = B.grad = None


# ----------------------------------------------------------------------------------------------
# 3. decode GEMV

def time_gemv(rows):
    nf4_cuda = cuda_gemv()
    for K, N in SHAPES:
        W = torch.randn(N, K, dtype=BF16, device=DEV) * 0.02
        w = quantize_nf4(W)
        op = w.kernel_operand()
        lin = None
        if bnb is not None:
            lin = attempt("bnb Linear4bit", lambda: bnb.nn.Linear4bit(
                K, N, bias=False, compute_dtype=BF16, compress_statistics=True, quant_type="nf4").to(DEV))
            if lin is not None:
                lin.weight = bnb.nn.Params4bit(W.cpu(), requires_grad=False, compress_statistics=True,
                                               quant_type="nf4", blocksize=64).to(DEV)
        for batch in BATCHES:
            x = torch.randn(batch, K, dtype=BF16, device=DEV)
            read = w.nbytes + x.numel() * 2 + batch * N * 2
            row = {"shape": f"{K}->{N}", "batch": batch}
            with torch.no_grad():
                if nf4_cuda is not None:
                    row["fastft_us"] = attempt(f"gemv {K}->{N} b{batch}",
                                               lambda: 1e3 * bench(lambda: nf4_cuda.nf4_gemv(x, op, None)))
                    # device time alone: a replay has no launch cost (what a decode loop under CUDA graphs pays)
                    row["fastft_graph_us"] = attempt(f"gemv {K}->{N} b{batch} graph", lambda: 1e3 * bench(
                        graphed(lambda: nf4_cuda.nf4_gemv(x, op, None))), optional=True)
                    for name, v in gemv_kernels(nf4_cuda):
                        if v == nf4_cuda.SCALED or nf4_cuda.table_supported(op):
                            row[f"{name}_us"] = attempt(
                                f"gemv {name} {K}->{N} b{batch}",
                                lambda v=v: 1e3 * bench(lambda: nf4_cuda.nf4_gemv(x, op, None, v)))
                row["bf16_us"] = attempt("bf16 gemv", lambda: 1e3 * bench(lambda: x @ W.T))
                if lin is not None:
                    row["bnb_us"] = attempt(f"bnb {K}->{N} b{batch}", lambda: 1e3 * bench(lambda: lin(x)))
            if row.get("fastft_us"):
                row["fastft_TBps"] = read / (row["fastft_us"] * 1e-6) / 1e12
                row["fastft_of_copy"] = of_copy(row["fastft_TBps"])
                spec = hbm_spec_tbps(card_name())  # the GEMV target's yardstick: >= 70% of it
                row["fastft_of_hbm_spec"] = row["fastft_TBps"] / spec if spec else None
            rows.append(row)
            log(f"gemv {row}")
            save()


def time_prefetch(rows):
    """FASTFT_QLORA_PREFETCH (fastft.ops.qlora_prefetch) on the dequant path: three QLoRA layers of each shape on one
    input (forward 1, 2, 3; backward 3, 2, 1), so the two buffers cycle as in a model (one layer alone would find its
    weight still decoded: a flattering cache hit), fwd+bwd without and with prefetch, beside the three bf16 layers,
    in interleaved rounds (ratios paired per round). The gradients with and without must be equal bit for bit."""
    from fastft.ops import qlora_prefetch

    for K, N in SHAPES[:1] if SMOKE else SHAPES:  # (the interpreter: one shape, one round, to check the script)
        torch.manual_seed(1)
        Ws = [torch.randn(N, K, dtype=BF16, device=DEV) * 0.02 for _ in range(3)]
        ws = [quantize_nf4(W) for W in Ws]
        x = torch.randn(M_TRAIN, K, dtype=BF16, device=DEV, requires_grad=True)
        dy = torch.randn(M_TRAIN, N, dtype=BF16, device=DEV)
        As = [(torch.randn(RANK, K, device=DEV) * 0.02).requires_grad_() for _ in range(3)]
        Bs = [(torch.randn(N, RANK, device=DEV) * 0.02).requires_grad_() for _ in range(3)]
        leaves = [x, *As, *Bs]
        row = {"shape": f"{K}->{N}", "layers": 3}
        xd = x.detach()

        def base():
            for W in Ws:
                (xd @ W.T, dy @ W)

        def step():
            ys = [fastft.qlora_linear(x, w, None, A, B, ALPHA / RANK, backend=BACKEND) for w, A, B in zip(ws, As, Bs)]
            return torch.autograd.grad(ys, leaves, [dy] * 3)

        def with_prefetch(on, fn):
            before = qlora_prefetch.enabled()
            qlora_prefetch.set_enabled(on)
            try:
                with qlora_path_forced("dequant"):
                    return fn()
            finally:
                qlora_prefetch.set_enabled(before)

        want = with_prefetch(False, step)

        def three_steps():  # with prefetch on throughout (turning it off frees the buffers and the order learned):
            for _ in range(2):  # the first learns the order, the later ones decode ahead of their calls
                step()
            return step(), sum(p.ahead for p in qlora_prefetch._PREFETCHERS.values())
        got, row["decodes_ahead"] = with_prefetch(True, three_steps)
        # identical, and the prefetch did run (a check that never decoded ahead would pass vacuously)
        row["prefetch_identical"] = all(torch.equal(g, w) for g, w in zip(got, want)) and row["decodes_ahead"] > 0
        cases = {"bf16_base": lambda: bench(base), "dequant": lambda: with_prefetch(False, lambda: bench(step, leaves)),
                 "prefetch": lambda: with_prefetch(True, lambda: bench(step, leaves))}
        for _ in range(1 if SMOKE else 4):
            for key, timed in cases.items():
                ms = attempt(f"prefetch rows {key} {K}->{N}", timed, optional=True)
                if ms:
                    row.setdefault(f"{key}_rounds", []).append(ms)
                    row[f"{key}_ms"] = min(ms, row.get(f"{key}_ms", ms))
        for key in ("dequant", "prefetch"):
            if row.get(f"{key}_rounds") and row.get("bf16_base_rounds"):
                row[f"{key}_x_base"] = paired_ratio({"ms_rounds": row[f"{key}_rounds"]},
                                                    {"ms_rounds": row["bf16_base_rounds"]})
        row["peak_MiB"] = attempt("prefetch peak", lambda: with_prefetch(True, lambda: _peak(step, leaves)))
        if DEV == "cuda":  # did the decodes run beside the GEMMs, or take turns with them on the SMs?
            row["decode_beside_gemm"] = attempt("prefetch concurrency", lambda: with_prefetch(True, lambda: (
                concurrency_share(step, ("_nf4_dequant_kernel",), ("_lora_gemm_kernel",)))), optional=True)
        qlora_path.release_dequant_scratch()
        rows.append(row)
        log(f"prefetch {row}")
        save()


def _fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def print_tables(failures: list[str]):
    print("\n## NF4 / QLoRA on", RESULTS["device"])
    for r in RESULTS.get("copy") or []:
        print(f"\ndevice-to-device copy_ of {r['bytes'] / 2**30:.3g} GiB: {_fmt(r['ms'])} ms, "
              f"{_fmt(r['TBps'], '.2f')} TB/s (read + write): the ÷ copy columns' yardstick")
    print("\n| dequant W | fastft ms | TB/s | ÷ copy | bnb ms | bnb TB/s |\n|---|---|---|---|---|---|")
    for r in RESULTS.get("dequant") or []:
        print(f"| {r['shape']} | {_fmt(r['fastft_ms'])} | {_fmt(r['fastft_TBps'], '.2f')} | "
              f"{_fmt(r.get('fastft_of_copy'), '.0%')} | {_fmt(r.get('bnb_ms'))} | "
              f"{_fmt(r.get('bnb_TBps'), '.2f')} |")
    graphs = [r for r in RESULTS.get("dequant") or [] if any(k.startswith("graph_") for k in r)]
    if graphs:
        print("\n| dequant W, CUDA graph | config: ms (÷ copy) | copy of the same bytes ms "
              "| selected, share of its rate |\n|---|---|---|---|")
        for r in graphs:
            cells = [f"{k[6:-3]}: {_fmt(v)} ({_fmt(r.get(k[:-3] + '_of_copy'), '.0%')})" for k, v in r.items()
                     if k.startswith("graph_") and k.endswith("_ms") and k != "graph_same_bytes_copy_ms"]
            print(f"| {r['shape']} | {'; '.join(cells)} | {_fmt(r.get('graph_same_bytes_copy_ms'))} | "
                  f"{_fmt(r.get('graph_selected_of_same_bytes_copy'), '.0%')} |")
    spec = hbm_spec_tbps(RESULTS["device"])
    print(f"\nGEMV target: ≥ 70% of the datasheet HBM bandwidth ({_fmt(spec, '.2f')} TB/s for {RESULTS['device']}; "
          "— : card not in fastft.apps.bench.harness.HBM_SPEC_TBPS)")
    print("\n| decode K->N | batch | fastft µs (TB/s) | CUDA graph µs | ÷ HBM spec | ÷ copy | scaled kernel µs "
          "| table kernel µs | table lean µs | table deep µs | deep K4 µs | deep K2 µs | bnb µs | bf16 µs |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS.get("gemv") or []:
        print(f"| {r['shape']} | {r['batch']} | {_fmt(r.get('fastft_us'), '.1f')} "
              f"({_fmt(r.get('fastft_TBps'), '.2f')}) | {_fmt(r.get('fastft_graph_us'), '.1f')} | "
              f"{_fmt(r.get('fastft_of_hbm_spec'), '.0%')} | "
              f"{_fmt(r.get('fastft_of_copy'), '.0%')} | "
              f"{_fmt(r.get('scaled_us'), '.1f')} | {_fmt(r.get('table_us'), '.1f')} | "
              f"{_fmt(r.get('table_lean_us'), '.1f')} | {_fmt(r.get('table_deep_us'), '.1f')} | "
              f"{_fmt(r.get('table_deep_k4_us'), '.1f')} | {_fmt(r.get('table_deep_k2_us'), '.1f')} | "
              f"{_fmt(r.get('bnb_us'), '.1f')} | {_fmt(r.get('bf16_us'), '.1f')} |")
    print(f"\n| QLoRA fwd+bwd M={M_TRAIN} r={RANK}: ms best of 5, ÷base the median of 4 interleaved rounds' ratios "
          "| bf16 base ms (first) | fused ms (÷base) "
          "| dequant ms (÷base) | selected ms (÷base), path | dequant+base, no LoRA (÷base) | peft+bnb ms (÷base) "
          "| peak MiB base / fused / dequant / selected / peft (scratch) |\n|---|---|---|---|---|---|---|---|")
    for r in RESULTS.get("qlora") or []:
        cells = [f"{_fmt(r.get(k + '_ms'))} ({_fmt(r.get(k + '_x_base'), '.2f')})"
                 for k in ("fused", "dequant", "auto", "dequant_base", "peft_bnb")]
        cells[2] += f", {r.get('selected')}"
        peaks = " / ".join(_fmt(r.get(k + "_peak_MiB"), ".0f") for k in ("bf16_base", "fused", "dequant", "auto",
                                                                          "peft_bnb"))
        print(f"| {r['shape']} | {_fmt(r.get('bf16_base_ms'))} ({_fmt(r.get('bf16_base_first_ms'))}) | " +
              " | ".join(cells) +
              f" | {peaks} ({_fmt(r.get('scratch_MiB'), '.0f')}) |")
    keys = ("bf16_base", "fused", "dequant", "auto", "dequant_base", "peft_bnb")
    print("\n| QLoRA: mean SM MHz / W over the interleaved rounds | " + " | ".join(keys) + " |\n|---"
          + "|---" * len(keys) + "|")
    for r in RESULTS.get("qlora") or []:
        print(f"| {r['shape']} | " + " | ".join(f"{_fmt(r.get(k + '_mhz'), 'd')} / {_fmt(r.get(k + '_w'), 'd')}"
                                                 for k in keys) + " |")
    print("\n| QLoRA dequant path | eager ms | CUDA graph ms (device only) | host ms a call | bf16 adapters ms "
          "| selected (auto): eager ms / CUDA graph ms |\n|---|---|---|---|---|---|")
    for r in RESULTS.get("qlora") or []:
        print(f"| {r['shape']} | {_fmt(r.get('dequant_ms'))} | {_fmt(r.get('dequant_graph_ms'))} | "
              f"{_fmt(r.get('dequant_host_ms'))} | {_fmt(r.get('dequant_bf16_adapters_ms'))} | "
              f"{_fmt(r.get('auto_ms'))} / {_fmt(r.get('auto_graph_ms'))} |")
    print("\n| QLoRA, 3 layers of a shape, fwd+bwd, dequant path | bf16 base ms | without prefetch ms (÷base) "
          "| FASTFT_QLORA_PREFETCH=1 ms (÷base) | bit-identical (decodes ahead in 3 steps) | decode time beside a GEMM "
          "| peak MiB with prefetch |"
          "\n|---|---|---|---|---|---|---|")
    for r in RESULTS.get("prefetch") or []:
        print(f"| {r['shape']} | {_fmt(r.get('bf16_base_ms'))} | {_fmt(r.get('dequant_ms'))} "
              f"({_fmt(r.get('dequant_x_base'), '.2f')}) | {_fmt(r.get('prefetch_ms'))} "
              f"({_fmt(r.get('prefetch_x_base'), '.2f')}) | {r.get('prefetch_identical')} ({r.get('decodes_ahead')}) | "
              f"{_fmt(r.get('decode_beside_gemm'), '.0%')} | {_fmt(r.get('peak_MiB'), '.0f')} |")
    checks = RESULTS.get("correctness")
    verdict = ("FAILED: " + "; ".join(failures) if failures else
               "all checks passed (dequant exact; QLoRA, GEMM configs and GEMV within 1e-2 of fp32)")
    print(f"\ncorrectness: {verdict}")
    for k, v in (checks or {}).items():
        if not isinstance(v, bool):
            print(f"- {k}: {v}")
    if RESULTS["errors"]:
        print("errors / skipped:\n- " + "\n- ".join(RESULTS["errors"]))


def main() -> int:
    """0 when every correctness check passed and every part ran; 1 otherwise."""
    if not torch.cuda.is_available() and not SMOKE:
        print("gpu_nf4: no CUDA device; nothing to do")
        return 1
    RESULTS["device"] = card_name()
    RESULTS["versions"] = dict(versions(), bitsandbytes=getattr(bnb, "__version__", None),
                               cuda_gemv=cuda_gemv() is not None)
    log(f"{RESULTS['device']} {RESULTS['versions']}")
    torch.manual_seed(0)
    RESULTS["correctness"] = attempt("correctness", check_correctness)
    log(f"correctness {RESULTS['correctness']}")
    save()
    # GEMV before QLoRA: the QLoRA part (compiles, tuning, the peft+bnb peer) is the longest, so a cut takes it
    crashed = [part for part, fn in (("copy", time_copy), ("dequant", time_dequant), ("gemv", time_gemv),
                                     ("qlora", time_qlora), ("prefetch", time_prefetch)) if not run_part(part, fn)]
    failures = failed_checks(RESULTS["correctness"]) + [f"{part} part crashed" for part in crashed]
    failures += [f"prefetch changed the gradients at {r['shape']}" for r in RESULTS.get("prefetch") or []
                 if r.get("prefetch_identical") is False]
    print_tables(failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
