"""Host time of the fused ops' eager calls: the Python fastft runs around its kernels, with every Triton launch
replaced by a no-op, so what is left is validation, dispatch, allocation, tuner lookups and autograd.

On a GPU this time is hidden only when each kernel runs longer than the host needs to queue the next one; at
4096→4096 the H100 run (docs/gpu-results.md) found the LoRA call host-bound. Runs anywhere: on a machine without
CUDA the inputs live on the CPU and the launches that are stubbed are the interpreter's (nothing is computed, so
the figure is the host path alone). Triton's own launch cost (argument binding, the driver call) is not in it.

    python benchmarks/host_overhead.py [--ops lora,qlora,...] [--calls 200] [--rounds 7]

Prints µs per forward+backward (launches stubbed), best of the rounds, beside the floor (a trivial
autograd.Function with the same inputs: what any custom op pays) and peft's layer or model where there is one (its
torch ops compute, but at these tiny sizes they are host-bound too); on a GPU also fastft's time with real launches
(kernels shorter than the host's work: still host time), whose gap to the stubbed figure is Triton's launch path,
and the same through triton's own JITFunction.run (fastft.kernels.launch's direct path off: what it saves).
Writes $OUT/host_overhead.json when OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from fastft.apps.bench.harness import write_json  # noqa: E402


@contextlib.contextmanager
def benchmark_settings():
    """One thread (host time is one thread's work; torch's CPU ops must not fight other processes for cores),
    denormals flushed (stubbed kernels leave their outputs uninitialised: torch's ops on such garbage stay fast), no
    tuning (a stubbed launch takes no time) and the LoRA/attention backends the cases pick: all restored after,
    since tests call main() in their own process."""
    saved_env = {key: os.environ.get(key) for key in ("FASTFT_AUTOTUNE", "FASTFT_LORA_BACKEND")}
    threads = torch.get_num_threads()
    os.environ.setdefault("FASTFT_AUTOTUNE", "0")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if "fastft.integration.attention" in sys.modules:
            sys.modules["fastft.integration.attention"].register_attention("auto")


@contextlib.contextmanager
def direct_launch(enabled: bool):
    """fastft.kernels.launch.DIRECT set for the block: False launches through triton's own JITFunction.run."""
    from fastft.kernels import launch

    saved, launch.DIRECT = launch.DIRECT, enabled
    try:
        yield
    finally:
        launch.DIRECT = saved


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
    layer = _peft_lora_layer(K, N, r)
    return {"fastft": lambda: lora_linear(x, W, None, A, B, 2.0, backend="triton").backward(dy),
           "floor": lambda: _Floor.apply(x, A, B).backward(torch.empty_like(x)),
            "peft": lambda: layer(x).backward(dy)}


def dora_case(M=64, K=128, N=128, r=16):
    from fastft.ops import dora_linear

    x, W, A, B, m = _leaf(M, K), _leaf(N, K, grad=False), _leaf(r, K), _leaf(N, r), _leaf(N)
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    layer = _peft_lora_layer(K, N, r, use_dora=True)
    return {"fastft": lambda: dora_linear(x, W, None, A, B, m, 2.0, backend="triton").backward(dy),
            "floor": lambda: _Floor.apply(x, A, B, m).backward(torch.empty_like(x)),
            "peft": lambda: layer(x).backward(dy)}


def _peft_lora_layer(K: int, N: int, r: int, use_dora: bool = False):
    """peft's LoRA layer over a frozen nn.Linear: its torch ops compute for real, but at these sizes they are
    host-bound too, so its time is its host time."""
    import peft

    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(K, N, bias=False, device=device(), dtype=dtype()))
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                        use_dora=use_dora), autocast_adapter_dtype=False)
    return model.base_model.model.proj


def qlora_case(M=64, K=128, N=128, r=16):
    from fastft.ops import qlora_linear
    from fastft.quant.nf4_weight import quantize_nf4

    x, A, B = _leaf(M, K), _leaf(r, K), _leaf(N, r)
    qweight = quantize_nf4(torch.randn(N, K, device=device(), dtype=dtype()))
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    return {"fastft": lambda: qlora_linear(x, qweight, None, A, B, 2.0, backend="triton").backward(dy),
           "floor": lambda: _Floor.apply(x, A, B).backward(torch.empty_like(x))}


def rms_norm_case(M=64, N=128, residual=False):
    from fastft.ops import rms_norm

    x, w = _leaf(M, N), _leaf(N)
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    if not residual:
        return {"fastft": lambda: rms_norm(x, w, backend="triton").backward(dy),
                "floor": lambda: _Floor.apply(x, w).backward(dy)}
    r = _leaf(M, N)

    def call():
        y, h = rms_norm(x, w, residual=r, backend="triton")
        torch.autograd.backward((y, h), (dy, dy))

    return {"fastft": call, "floor": lambda: _Floor.apply(x, w, r).backward(dy)}


def rope_case(B=1, H=4, S=32, D=64, in_place=False):
    from fastft.ops import rope, rope_

    q0, k0 = _leaf(B, H, S, D), _leaf(B, H, S, D)
    cos, sin = _leaf(1, S, D, grad=False), _leaf(1, S, D, grad=False)
    dq = torch.randn(B, H, S, D, device=device(), dtype=dtype())
    if not in_place:
        return {"fastft": lambda: torch.autograd.backward(rope(q0, k0, cos, sin, backend="triton"), (dq, dq)),
                "floor": lambda: _Floor.apply(q0, k0, cos, sin).backward(dq)}

    def call():  # rope_ rotates a non-leaf (a projection's output): clones, as the floor's
        q, k = rope_(q0.clone(), k0.clone(), cos, sin, backend="triton")
        torch.autograd.backward((q, k), (dq, dq))

    return {"fastft": call, "floor": lambda: _Floor.apply(q0.clone(), k0.clone(), cos, sin).backward(dq)}


def swiglu_case(M=64, N=128):
    from fastft.ops import swiglu

    gate, up = _leaf(M, N), _leaf(M, N)
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    return {"fastft": lambda: swiglu(gate, up, backend="triton").backward(dy),
            "floor": lambda: _Floor.apply(gate, up).backward(dy)}


def attention_case(B=1, S=64, H=2, D=32, varlen=False):
    from fastft.ops import flash_attention

    if not varlen:
        q, k, v = _leaf(B, S, H, D), _leaf(B, S, H, D), _leaf(B, S, H, D)
        kwargs = {}
    else:  # two packed documents, max_seqlen given (as transformers passes it: no device read)
        q, k, v = _leaf(B * S, H, D), _leaf(B * S, H, D), _leaf(B * S, H, D)
        cu = torch.tensor([0, S // 3, B * S], dtype=torch.int32, device=device())
        kwargs = dict(cu_seqlens=cu, max_seqlen=B * S - S // 3)
    do = torch.randn(q.shape, device=device(), dtype=dtype())
    return {"fastft": lambda: flash_attention(q, k, v, causal=True, backend="triton", **kwargs).backward(do),
            "floor": lambda: _Floor.apply(q, k, v).backward(do)}


def linear_cross_entropy_case(M=64, H=64, V=128):
    from fastft.ops import linear_cross_entropy

    hidden, weight = _leaf(M, H), _leaf(V, H)
    labels = torch.randint(0, V, (M,), device=device())
    return {"fastft": lambda: linear_cross_entropy(hidden, weight, labels, backend="triton").backward(),
            "floor": lambda: _Floor.apply(hidden, weight).backward(hidden.detach())}


def ia3_case(M=64, K=128, N=128):
    from fastft.ops import ia3_linear

    x, W, l = _leaf(M, K), _leaf(N, K, grad=False), _leaf(N, 1)
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    return {"fastft": lambda: ia3_linear(x, W, None, l, feedforward=False, backend="triton").backward(dy),
            "floor": lambda: _Floor.apply(x, l).backward(torch.empty_like(x))}


def bottleneck_adapter_case(M=64, N=128, r=16):
    from fastft.ops.bottleneck_adapter import bottleneck_adapter

    h, D, bd, U, bu = _leaf(M, N), _leaf(r, N), _leaf(r), _leaf(N, r), _leaf(N)
    dy = torch.randn(M, N, device=device(), dtype=dtype())
    return {"fastft": lambda: bottleneck_adapter(h, D, bd, U, bu, "relu", backend="triton").backward(dy),
            "floor": lambda: _Floor.apply(h, D, bd, U, bu).backward(dy)}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(device=device(), dtype=dtype())


LAYERS = 2


def llama_step_case():
    """A whole LoRA training step of a tiny patched Llama (every fused op: norms, RoPE, GLU, attention, LoRA on all
    seven projections, the fused loss) beside peft's unpatched model doing the same step in torch at these tiny
    sizes, where torch's own ops are host-bound too: the host time per step of each."""
    import peft

    import fastft
    from fastft.integration.attention import register_attention
    from fastft.integration.peft_lora import get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    os.environ.setdefault("FASTFT_LORA_BACKEND", "triton")
    register_attention("triton")
    ours = _tiny_llama()
    fastft.patch_model(ours, backend="triton")
    ours = get_peft_model(ours, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    theirs = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    ids = torch.randint(0, 128, (2, 64), device=device())
    return {"fastft": lambda: ours(input_ids=ids, labels=ids).loss.backward(),
            "peft": lambda: theirs(input_ids=ids, labels=ids).loss.backward()}


# name -> a function building the calls to time: {"fastft": fwd+bwd, "floor": a trivial autograd.Function with the
# same inputs (what any custom op pays), "peft": the peer's layer or model where one exists}
CASES = {"lora": lora_case, "qlora": qlora_case, "dora": dora_case,
         "rms_norm": rms_norm_case, "rms_norm_residual": lambda: rms_norm_case(residual=True),
         "rope": rope_case, "rope_": lambda: rope_case(in_place=True), "swiglu": swiglu_case,
         "attention": attention_case, "attention_varlen": lambda: attention_case(B=2, varlen=True),
         "linear_ce": linear_cross_entropy_case, "ia3": ia3_case, "adapter": bottleneck_adapter_case,
         "llama-step": llama_step_case}



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
    for name in ("calls", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {', '.join(CASES)}")
    with benchmark_settings():
        real = torch.cuda.is_available()  # on a GPU also with real launches: the difference is Triton's launch path
        rows = []
        for op in ops:
            calls = CASES[op]()
            row = {"op": op, "device": str(device())}
            # real launches first (tiny shapes: the kernels finish before the host queues the next, so this is host
            # time too): a once-per-device check that launches kernels (the NF4 byte-permute decode's) must compare
            # real outputs and cache its verdict before the stub leaves every output unwritten
            real_us = per_call_us(calls["fastft"], args.calls, args.rounds, sync=True) if real else None
            if real:  # and through triton's own JITFunction.run (fastft.kernels.launch's direct path off)
                with direct_launch(False):
                    triton_run_us = per_call_us(calls["fastft"], args.calls, args.rounds, sync=True)
            with launches_stubbed():
                for name, fn in calls.items():
                    row[f"{name}_us"] = round(per_call_us(fn, args.calls, args.rounds), 1)
            if real:
                row["fastft_real_launches_us"] = round(real_us, 1)
                row["fastft_real_launches_triton_run_us"] = round(triton_run_us, 1)
            rows.append(row)
            print(f"{op:18s} " + "   ".join(f"{k.removesuffix('_us')} {v:.1f} µs" for k, v in row.items()
                                            if k.endswith("_us")))
            if os.environ.get("OUT"):  # after each op, atomically: a run stopped part-way keeps the finished rows
                write_json(Path(os.environ["OUT"], "host_overhead.json"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
