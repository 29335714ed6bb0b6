"""Every fused op once, forward and backward, at small ragged shapes: a workload for compute-sanitizer's memcheck.

Triton's interpreter does not catch an unmasked load past a tensor's end (a mutation run left six such mutants of
the NF4 GEMM, the dequantize, the bottleneck kernels and an attention tile alive on the CPU), and on the GPU the
caching allocator hides one inside its segment. So `gpu_check.sh sanitize` runs this script under

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASTFT_AUTOTUNE=0 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python3 benchmarks/gpu_sanitize.py

where every tensor is its own allocation and memcheck reports any access outside it, kernel and line named. The
first tuner config runs (no timing under the sanitizer). Sizes are odd on purpose (ragged tiles in every
dimension); values are not checked here (the GPU test suites do that), only that each call completes.
`--device cpu` makes the same calls under TRITON_INTERPRET=1 (the CPU suite's smoke check of this script).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

DEVICE = "cuda"
BACKEND = "auto"  # "triton" with --device cpu: the kernels on the interpreter, not the torch fallbacks


def _t(*shape, dtype=torch.bfloat16, grad=True, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _backward(*outs):
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def case_lora():
    from fastft.ops import lora_linear
    x, w = _t(3, 37, 200), _t(129, 200, grad=False)
    a, b = _t(8, 200, scale=0.1), _t(129, 8, scale=0.1)
    _backward(lora_linear(x, w, _t(129), a, b, 2.0, 0.0, backend=BACKEND))
    _backward(lora_linear(x, w, None, a, b, 0.5, 0.1, backend=BACKEND))  # the dropout tail


def case_qlora_and_nf4():
    from fastft.ops import nf4_linear, qlora_linear
    from fastft.quant import quantize_nf4
    for double_quant in (False, True):
        q = quantize_nf4(torch.randn(131, 320, device=DEVICE, dtype=torch.bfloat16), 64, double_quant)
        x = _t(2, 45, 320)
        a, b = _t(16, 320, scale=0.1), _t(131, 16, scale=0.1)
        _backward(qlora_linear(x, q, _t(131), a, b, 2.0, 0.1, backend=BACKEND))
        _backward(nf4_linear(x, q, None, backend=BACKEND))
        with torch.no_grad():
            for batch in (1, 3, 9):  # decode: the CUDA GEMV where fastft._C was built, else Triton
                nf4_linear(_t(batch, 320, grad=False), q, None, backend=BACKEND)
            q.dequantize()


def case_dora():
    from fastft.ops import dora_linear
    x, w = _t(2, 21, 96), _t(75, 96, grad=False)
    _backward(dora_linear(x, w, None, _t(8, 96, scale=0.1), _t(75, 8, scale=0.1), _t(75), 2.0, 0.0, backend=BACKEND))


def case_attention():
    from fastft.ops import flash_attention
    for kw in (dict(causal=True), dict(causal=True, window=17), dict(causal=False)):
        q, k, v = _t(2, 77, 8, 64), _t(2, 77, 2, 64), _t(2, 77, 2, 64)
        _backward(flash_attention(q, k, v, **kw, backend=BACKEND))
    q, k, v = _t(2, 33, 4, 128), _t(2, 90, 4, 128), _t(2, 90, 4, 128)  # KV-cache shape: more keys than queries
    _backward(flash_attention(q, k, v, causal=True, backend=BACKEND))
    cu = torch.tensor([0, 5, 70, 71, 150], device=DEVICE, dtype=torch.int32)  # varlen, a 1-token document
    q, k, v = _t(150, 8, 64), _t(150, 2, 64), _t(150, 2, 64)
    pk, pv = _t(1, 7, 2, 64), _t(1, 7, 2, 64)
    _backward(flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=79, prefix_k=pk, prefix_v=pv, backend=BACKEND))


def case_losses():
    from fastft.ops import linear_cross_entropy, linear_distill_loss, linear_dpo_loss
    h, w = _t(53, 96), _t(301, 96, scale=0.1)
    labels = torch.randint(0, 301, (53,), device=DEVICE)
    labels[::7] = -100
    _backward(linear_cross_entropy(h, w, labels, backend=BACKEND))
    _backward(linear_cross_entropy(h, w, labels, softcap=30.0, label_smoothing=0.1, backend=BACKEND))
    _backward(linear_distill_loss(h, w, _t(53, 96, grad=False), _t(301, 96, grad=False, scale=0.1), labels,
                                  ce_weight=0.5, reverse_kl_weight=0.5, backend=BACKEND))
    chosen, rejected = _t(3, 11, 96), _t(3, 11, 96)
    lab = torch.randint(0, 301, (3, 11), device=DEVICE)
    ref = torch.zeros(3, device=DEVICE)
    _backward(linear_dpo_loss(chosen, rejected, w, lab, lab.flip(-1), ref_chosen_logps=ref,
                              ref_rejected_logps=ref, backend=BACKEND)[0])


def case_layers():
    from fastft.ops import geglu, rms_norm, rope, swiglu
    from fastft.ops.bottleneck_adapter import bottleneck_adapter
    from fastft.ops.ia3 import ia3_linear
    x = _t(3, 29, 200)
    _backward(rms_norm(x, _t(200), 1e-6, backend=BACKEND))
    _backward(*rms_norm(x, _t(200), 1e-6, residual=_t(3, 29, 200), backend=BACKEND))
    _backward(swiglu(_t(3, 29, 173), _t(3, 29, 173), backend=BACKEND))
    _backward(geglu(_t(3, 29, 173), _t(3, 29, 173), backend=BACKEND))
    q, k = _t(2, 6, 29, 96), _t(2, 2, 29, 96)
    cos, sin = _t(2, 29, 96, grad=False), _t(2, 29, 96, grad=False)
    _backward(*rope(q, k, cos, sin, backend=BACKEND))
    h = _t(3, 29, 200)
    _backward(bottleneck_adapter(h, _t(24, 200, scale=0.1), _t(24), _t(200, 24, scale=0.1), _t(200), "gelu_tanh", backend=BACKEND))
    _backward(ia3_linear(_t(3, 29, 200), _t(131, 200, grad=False), None, _t(200), feedforward=True, backend=BACKEND))
    _backward(ia3_linear(_t(3, 29, 200), _t(131, 200, grad=False), None, _t(131), feedforward=False, backend=BACKEND))


CASES = {"lora": case_lora, "qlora": case_qlora_and_nf4, "dora": case_dora, "attention": case_attention,
         "losses": case_losses, "layers": case_layers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: the same calls on the Triton interpreter (set TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    global DEVICE, BACKEND
    DEVICE, BACKEND = args.device, ("auto" if args.device == "cuda" else "triton")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)} (choose from {', '.join(CASES)})")
    torch.manual_seed(0)
    failed = 0
    for name in names:
        start = time.perf_counter()
        try:
            CASES[name]()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            print(f"{name}: ok ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception as e:  # keep going: memcheck's report names the kernel, this names the case
            failed += 1
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
