"""GPU benchmark of the layer ops (one run, one card): RMSNorm (+ residual), RoPE on q and k, SwiGLU/GeGLU,
forward and forward+backward, bf16, against torch eager (the references, as transformers writes them) and
Liger-Kernel when importable (`.peers`). Sizes of a B4 × S2048 step: 8192 tokens, hidden 4096, 32/8 heads of
128, intermediate 14336.

Correctness first (fp64 references, outputs allocated over NaN-poisoned memory), then medians of do_bench.
Bandwidth counts the bytes each op must move (inputs read once, outputs written once) and is compared with a
device-to-device copy of the same size measured in the same run; the target is ≥ 85% of copy bandwidth.
Run: python benchmarks/gpu_layers.py   (FASTFT_BENCH_SMOKE=1: a CPU dry run of the script at toy sizes)
"""
from __future__ import annotations

import sys
import time

from smoke_mode import BACKEND, DEVICE, SMOKE  # first: the interpreter before triton loads

import torch

from fastft.apps.bench import card_name, markdown_table, time_ms, write_results
from fastft import ops
from fastft.ops import geglu_reference, rms_norm_reference, rope_cos_sin, rope_reference, swiglu_reference


def _on_backend(name: str):
    """fastft.ops.<name> on the benchmark's backend: the kernels on the GPU, and forced (interpreted) in the smoke
    run, whose CPU "auto" would take the torch path and leave every kernel unexercised."""
    op = getattr(ops, name)
    return lambda *args, **kwargs: op(*args, backend=BACKEND, **kwargs)


rms_norm, rope, rope_, swiglu, geglu = (_on_backend(name) for name in ("rms_norm", "rope", "rope_", "swiglu", "geglu"))

B, S, HIDDEN, HQ, HK, D, INTER = (2, 16, 64, 4, 2, 16, 96) if SMOKE else (4, 2048, 4096, 32, 8, 128, 14336)
T = B * S
DTYPE = torch.bfloat16


def timed(fn) -> float:
    if not SMOKE:
        return time_ms(fn)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def poison():
    """Fill free cached memory with NaN so outputs a kernel forgets to write show up as NaN."""
    if SMOKE:
        return
    free = torch.cuda.mem_get_info()[0]
    junk = torch.full((min(free // 4, 8 << 30) // 2,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    del junk


def rel(a, b):
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(B, S, HIDDEN, device=DEVICE, dtype=DTYPE, generator=g)
    res = torch.randn_like(x)
    w = (torch.randn(HIDDEN, device=DEVICE, generator=g) * 0.1 + 1).to(DTYPE)
    q = torch.randn(B, S, HQ * D, device=DEVICE, dtype=DTYPE, generator=g).view(B, S, HQ, D).transpose(1, 2)
    k = torch.randn(B, S, HK * D, device=DEVICE, dtype=DTYPE, generator=g).view(B, S, HK, D).transpose(1, 2)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D))
    cos, sin = rope_cos_sin(torch.arange(S, device=DEVICE)[None], inv_freq, 1.0, DTYPE)
    gate = torch.randn(T, INTER, device=DEVICE, dtype=DTYPE, generator=g)
    up = torch.randn_like(gate)
    return dict(x=x, res=res, w=w, q=q, k=k, cos=cos, sin=sin, gate=gate, up=up)


def check(t) -> list[str]:
    failures = []

    def expect(name, got, ref, tol=2e-2):
        err = rel(got, ref)
        if not err < tol:
            failures.append(f"{name}: rel err {err:.2e}")

    for offset in (0.0, 1.0):
        x, res, w = (t[n].clone().requires_grad_() for n in ("x", "res", "w"))
        poison()
        y, h = rms_norm(x, w, 1e-5, offset=offset, residual=res)
        leaves = [v.detach().double().requires_grad_() for v in (x, w, res)]
        ry, rh = rms_norm_reference(leaves[0], leaves[1], 1e-5, offset=offset, residual=leaves[2])
        expect(f"rms_norm+residual y offset={offset}", y, ry)
        expect(f"rms_norm+residual h offset={offset}", h, rh)
        dy, dh = torch.randn_like(y), torch.randn_like(h)
        got = torch.autograd.grad((y, h), (x, w, res), (dy, dh))
        want = torch.autograd.grad((ry, rh), leaves, (dy.double(), dh.double()))
        for name, a, b in zip(("dx", "dw", "dres"), got, want):
            expect(f"rms_norm+residual {name} offset={offset}", a, b)
        poison()  # the timed plain RMSNorm (no residual) too
        y = rms_norm(x, w, 1e-5, offset=offset)
        ry = rms_norm_reference(leaves[0], leaves[1], 1e-5, offset=offset)
        expect(f"rms_norm y offset={offset}", y, ry)
        for name, a, b in zip(("dx", "dw"), torch.autograd.grad(y, (x, w), dy),
                              torch.autograd.grad(ry, leaves[:2], dy.double())):
            expect(f"rms_norm {name} offset={offset}", a, b)
    q, k = t["q"].clone().requires_grad_(), t["k"].clone().requires_grad_()
    poison()
    qo, ko = rope(q, k, t["cos"], t["sin"])
    qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qr, kr = rope_reference(qd, kd, t["cos"].double(), t["sin"].double())
    expect("rope q", qo, qr)
    expect("rope k", ko, kr)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    for name, a, b in zip(("dq", "dk"), torch.autograd.grad((qo, ko), (q, k), (gq, gk)),
                          torch.autograd.grad((qr, kr), (qd, kd), (gq.double(), gk.double()))):
        expect(f"rope {name}", a, b)
    q_in_place, k_in_place = t["q"].clone(), t["k"].clone()  # the timed in-place rope_ too
    rope_(q_in_place, k_in_place, t["cos"], t["sin"])
    expect("rope_ q (in place)", q_in_place, qr)
    expect("rope_ k (in place)", k_in_place, kr)
    for name, op, ref in (("swiglu", swiglu, swiglu_reference), ("geglu", geglu, geglu_reference)):
        gate, up = t["gate"][:1031 if not SMOKE else 7].clone().requires_grad_(), t["up"][:1031 if not SMOKE else 7].clone().requires_grad_()
        poison()
        y = op(gate, up)
        gd, ud = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
        yr = ref(gd, ud)
        expect(f"{name} y", y, yr)
        dy = torch.randn_like(y)
        for gname, a, b in zip(("dgate", "dup"), torch.autograd.grad(y, (gate, up), dy),
                               torch.autograd.grad(yr, (gd, ud), dy.double())):
            expect(f"{name} {gname}", a, b)
    return failures


def liger():
    """Liger's functional ops, or None when liger_kernel is not importable."""
    try:
        from liger_kernel.transformers import functional as lf
    except Exception:  # noqa: BLE001 - any import failure means "no peer"
        return None
    return lf


def cases(t, lf):
    """(op, pass, bytes moved, {method: fn})"""
    e = DTYPE.itemsize
    x, res, w, q, k, cos, sin, gate, up = (t[n] for n in ("x", "res", "w", "q", "k", "cos", "sin", "gate", "up"))
    dy_x, dy_g = torch.randn_like(x), torch.randn_like(gate)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    n_x, n_qk, n_g = x.numel(), q.numel() + k.numel(), gate.numel()
    out = []

    # Every row runs on its own copies of the inputs and output gradients: peers write into theirs (Liger's
    # RMSNorm backward, in_place=True by default, writes dx into dy; its SwiGLU/GeGLU backward writes into gate and
    # up; its rope and fastft's rope_ rotate q and k in place), which shared tensors would carry into the next rows
    # (an all-NaN dy after ~300 calls).
    def fwd(fn, inputs):
        own = [t.clone() for t in inputs]
        return lambda: fn(*own)

    def fwd_bwd(fn, inputs, grads):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grads = [g.clone() for g in grads]

        def run():
            outs = fn(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.grad(outs, leaves, grads[: len(outs)])
        return run

    rms_ops = {"fastft": rms_norm, "torch": rms_norm_reference}
    rms = {n: fwd(lambda x, w, op=op: op(x, w, 1e-5), (x, w)) for n, op in rms_ops.items()}
    rms_bwd = {n: fwd_bwd(lambda x, w, op=op: op(x, w, 1e-5), (x, w), (dy_x,)) for n, op in rms_ops.items()}
    res_fwd = {n: fwd(lambda x, w, r, op=op: op(x, w, 1e-5, residual=r), (x, w, res)) for n, op in rms_ops.items()}
    res_bwd = {n: fwd_bwd(lambda x, w, r, op=op: op(x, w, 1e-5, residual=r), (x, w, res), (dy_x, dy_x))
               for n, op in rms_ops.items()}
    rope_fwd = {n: fwd(lambda q, k, op=op: op(q, k, cos, sin), (q, k))
                for n, op in (("fastft", rope), ("fastft in place", rope_), ("torch", rope_reference))}
    rope_bwd = {n: fwd_bwd(lambda q, k, op=op: op(q, k, cos, sin), (q, k), (dq, dk))
                for n, op in (("fastft", rope), ("torch", rope_reference))}
    glu = {}
    for name, op, ref in (("swiglu", swiglu, swiglu_reference), ("geglu", geglu, geglu_reference)):
        ops = {"fastft": op, "torch": ref}
        glu[name] = ({n: fwd(fn, (gate, up)) for n, fn in ops.items()},
                     {n: fwd_bwd(fn, (gate, up), (dy_g,)) for n, fn in ops.items()})
    if lf is not None:
        if hasattr(lf, "liger_rms_norm"):
            rms["liger"] = fwd(lambda x, w: lf.liger_rms_norm(x, w, eps=1e-5), (x, w))
            rms_bwd["liger"] = fwd_bwd(lambda x, w: lf.liger_rms_norm(x, w, eps=1e-5), (x, w), (dy_x,))
        if hasattr(lf, "liger_rope"):
            rope_fwd["liger"] = fwd(lambda q, k: lf.liger_rope(q, k, cos, sin), (q, k))
            rope_bwd["liger"] = fwd_bwd(lambda q, k: lf.liger_rope(q, k, cos, sin), (q, k), (dq, dk))
        for name, attr in (("swiglu", "liger_swiglu"), ("geglu", "liger_geglu")):
            if hasattr(lf, attr):
                fn = getattr(lf, attr)
                glu[name][0]["liger"] = fwd(fn, (gate, up))
                glu[name][1]["liger"] = fwd_bwd(fn, (gate, up), (dy_g,))
    # bytes: RMSNorm fwd reads x, writes y; bwd (fwd+bwd here) adds reading dy and x again, writing dx
    out.append(("rms_norm", "fwd", 2 * n_x * e, rms))
    out.append(("rms_norm", "fwd+bwd", 5 * n_x * e, rms_bwd))
    out.append(("rms_norm+residual", "fwd", 4 * n_x * e, res_fwd))
    # + backward: reads dy, dh and h, writes dx (which is d(residual) too)
    out.append(("rms_norm+residual", "fwd+bwd", 8 * n_x * e, res_bwd))
    out.append(("rope q,k", "fwd", 2 * n_qk * e, rope_fwd))
    out.append(("rope q,k", "fwd+bwd", 4 * n_qk * e, rope_bwd))
    for name, (f, fb) in glu.items():
        out.append((name, "fwd", 3 * n_g * e, f))
        out.append((name, "fwd+bwd", 8 * n_g * e, fb))
    return out


def copy_gbps(nbytes: int) -> float:
    """GB/s of a device-to-device copy that moves `nbytes` in all (half read, half written)."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return nbytes / ms / 1e6


def main() -> int:
    card = card_name()
    print(f"card: {card}; torch {torch.__version__}", flush=True)
    t = inputs()
    failures = check(t)
    print("correctness:", "ok" if not failures else failures, flush=True)
    lf = liger()
    print("liger:", "importable" if lf is not None else "not importable (peer rows missing)", flush=True)
    rows = []

    def save(complete: bool):  # after every op: a section cut short keeps the rows it measured
        write_results("layers", dict(card=card, torch=torch.__version__, tokens=T, dtype=str(DTYPE), rows=rows,
                                     correctness_failures=failures, liger=lf is not None, complete=complete))

    for op, what, nbytes, methods in cases(t, lf):
        copy = copy_gbps(nbytes)
        for method, fn in methods.items():
            try:
                fn()
                ms = timed(fn)
                gbps = nbytes / ms / 1e6
                rows.append(dict(op=op, pass_=what, method=method, ms=ms, GBps=gbps, copy_frac=gbps / copy))
            except Exception as err:  # noqa: BLE001 - report, keep measuring
                rows.append(dict(op=op, pass_=what, method=f"{method} FAILED: {type(err).__name__}: {err}"[:160]))
        print(markdown_table(rows[-len(methods):], ["op", "pass_", "method", "ms", "GBps", "copy_frac"]), flush=True)
        save(complete=False)
    save(complete=True)
    print(f"\n## layer ops, {T} tokens, bf16, on {card} (copy_frac = GB/s ÷ device copy of the same bytes)")
    print(markdown_table(rows, ["op", "pass_", "method", "ms", "GBps", "copy_frac"]))
    # the verdict last, where summary.md's log tail shows it: timings of a failed check are not results
    print("correctness:", "ok" if not failures else f"FAILED, the timings above are not results: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
