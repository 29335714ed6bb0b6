"""fastft.kernels.launch's direct launch path, checked against triton's own JITFunction.run on a machine without a
GPU: a faked driver (device 0, stream 0, an sm_90 target) and a faked compile (a recording stand-in per triton cache
key, so nothing is compiled) let triton's binder, specialization and cache keys run for real, as `python -m`
without TRITON_INTERPRET (tests/test_direct_launch.py starts it under both tritons). `--time` instead prints the
host time a call of each launcher with triton's run and with the direct path (the launcher a no-op).

Checks, printing one line each and exiting 1 on a failure:
1. classes: over fuzzed arguments of a kernel with every kind of parameter (pointers at aligned and unaligned
   addresses of several dtypes, ints around 1, 16, 2**31 and 2**63, negative ones, floats, bools, None, constexprs
   by keyword, by position and left to their defaults), two launches of one DirectLaunchJIT class always have one
   triton cache key — the direct path never launches a kernel specialized for other arguments.
2. launches: fastft's own launchers (LoRA GEMM, rank projection/reduction, RMSNorm, RoPE, GLU, cross-entropy rows,
   NF4 dequantize, attention forward and backward), each called three times on CPU tensors: every launch the direct
   path made hands the launcher exactly what triton's run hands it for those arguments (grid, stream, function,
   metadata, hooks and every bound argument, defaults filled in, the same objects), to the kernel triton's cache
   holds for them; and the repeat calls did take the direct path.
"""
import os
import random
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTFT_AUTOTUNE"] = "0"  # the first config, untimed: nothing here runs

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402
from triton.runtime.driver import driver as triton_driver  # noqa: E402
from triton.runtime.jit import compute_cache_key  # noqa: E402


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class RecordingKernel:
    """Stands in for a CompiledKernel: `run` records the launcher's arguments."""
    function, packed_metadata = "function", "packed"

    def __init__(self, key):
        self.key = key

    def launch_metadata(self, grid, stream, *args):
        return "triton's metadata"

    def run(self, *args):
        LAUNCHES.append((self, args))


LAUNCHES: list = []
triton_driver.set_active(FakeDriver())
triton_jit.JITFunction._do_compile = (
    lambda self, key, *args, **kwargs: self.device_caches[0][0].setdefault(key, RecordingKernel(key)))

from fastft.kernels import launch  # noqa: E402
from fastft.kernels.launch import DirectLaunchJIT, jit  # noqa: E402

FAILED: list[str] = []
DIRECT_TAKEN = 0
_direct_run = DirectLaunchJIT.run


def _counting_run(self, *args, grid, warmup, **kwargs):
    """DirectLaunchJIT.run, then the check of what a direct launch passed against what triton's run would pass."""
    global DIRECT_TAKEN
    before = len(LAUNCHES)
    slow = _SLOW_CALLS[0]
    kernel = _direct_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    if _SLOW_CALLS[0] == slow and len(LAUNCHES) == before + 1:  # the direct path launched
        DIRECT_TAKEN += 1
        _same_as_triton(self, args, kwargs, grid, *LAUNCHES[-1])
    return kernel


_SLOW_CALLS = [0]
_triton_run = triton_jit.JITFunction.run


def _slow_run(self, *args, **kwargs):
    _SLOW_CALLS[0] += 1
    return _triton_run(self, *args, **kwargs)


DirectLaunchJIT.run = _counting_run
triton_jit.JITFunction.run = _slow_run


def _triton_key(fn, args, kwargs):
    kernel_cache, key_cache, _, _, binder = fn.device_caches[0]
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kwargs)
    return compute_cache_key(key_cache, specialization, options), bound


def _same_as_triton(fn, args, kwargs, grid, kernel, passed):
    key, bound = _triton_key(fn, args, kwargs)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    expected = grid + (7, kernel.function, kernel.packed_metadata)
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    name = fn.fn.__name__
    if kernel.key != key:
        FAILED.append(f"{name}: launched the kernel of key {kernel.key[:80]}, triton's is {key[:80]}")
    elif passed[:6] != expected or passed[7:9] != hooks:
        FAILED.append(f"{name}: launcher head {passed[:9]} != {expected} + metadata + {hooks}")
    elif len(passed) - 9 != len(bound) or any(a is not b for a, b in zip(passed[9:], bound.values())):
        FAILED.append(f"{name}: bound arguments differ from triton's: {[_value(a) for a in passed[9:]]} != "
                      f"{[_value(a) for a in bound.values()]}")


# ---------------------------------------------------------------------------------------------------------------
# 1. classes


@jit
def _every_kind_kernel(x_ptr, y_ptr, n, stride, scale, flag, maybe, BLOCK: tl.constexpr, EVEN: tl.constexpr,
                       DEFAULTED: tl.constexpr = 4):
    pass


_INTS = [0, 1, 2, 15, 16, 17, 32, 48, 4096, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32 + 3,
         2**63 - 16, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 16]
_STORAGE = torch.zeros(256, dtype=torch.float32)


def _pointer(dtype: torch.dtype, offset_bytes: int) -> torch.Tensor:
    flat = _STORAGE.view(dtype)
    return flat[offset_bytes // flat.element_size():]


def _fuzzed_arguments(rng: random.Random):
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.int32])
    x = _pointer(dtype, rng.choice([0, 4, 8, 16, 32, 36]))
    y = _pointer(torch.float32, rng.choice([0, 8, 16, 48])) if rng.random() < 0.8 else None
    args = [x, y, rng.choice(_INTS), rng.choice(_INTS), rng.choice([0.5, 1.0, 2.0]), rng.choice([True, False]), None]
    kwargs = dict(BLOCK=rng.choice([1, 16, 32]), EVEN=rng.choice([True, False]))
    if rng.random() < 0.3:
        kwargs["DEFAULTED"] = rng.choice([1, 4, 16])
    if rng.random() < 0.3:  # constexprs by position
        args += [kwargs.pop("BLOCK"), kwargs.pop("EVEN")]
    if rng.random() < 0.3:
        kwargs["num_warps"] = rng.choice([4, 8])
    return args, kwargs


def _int_class(value: int):
    return _every_kind_kernel._key((value,), {})


def _same_class(rng: random.Random, args: list) -> list:
    """Other values of each runtime argument's DirectLaunchJIT class: other addresses of the alignment, other ints of
    the class, the other bool, another float (constexprs, past the seventh argument, as they are)."""
    out = []
    for i, arg in enumerate(args):
        if i >= 7 or arg is None:
            out.append(arg)
        elif isinstance(arg, torch.Tensor):
            offset = arg.data_ptr() - _STORAGE.data_ptr()
            choices = [o for o in range(0, 128, arg.element_size()) if (o % 16 == 0) == (offset % 16 == 0)]
            out.append(_pointer(arg.dtype, rng.choice(choices)))
        elif type(arg) is bool:
            out.append(not arg)
        elif type(arg) is float:
            out.append(rng.choice([0.25, 3.0, -1.0]))
        else:
            same = [v for v in _INTS if _int_class(v) == _int_class(arg)]
            out.append(rng.choice(same))
    return out


def _value(arg):
    return (arg.dtype, arg.data_ptr()) if isinstance(arg, torch.Tensor) else arg


def check_classes() -> None:
    """Each fuzzed launch beside one with other values of the same classes: one triton key for both."""
    rng = random.Random(0)
    merged, differing = [], 0
    for _ in range(2000):
        args, kwargs = _fuzzed_arguments(rng)
        other = _same_class(rng, args)
        differing += any(_value(a) != _value(b) for a, b in zip(args, other))
        if _every_kind_kernel._key(tuple(args), kwargs) != _every_kind_kernel._key(tuple(other), kwargs):
            FAILED.append(f"classes: {[_value(a) for a in args]} and {[_value(a) for a in other]}: two keys")
            break
        if _triton_key(_every_kind_kernel, args, kwargs)[0] != _triton_key(_every_kind_kernel, other, kwargs)[0]:
            merged.append((args, other, kwargs))
    if merged:
        args, other, kwargs = merged[0]
        FAILED.append(f"classes: {len(merged)} pairs of one class with two triton keys, e.g. "
                      f"{[_value(a) for a in args]} and {[_value(a) for a in other]}, {kwargs}")
    print(f"{'FAILED' if merged else 'ok'} classes: 2000 launches, {differing} with other values of the same "
          f"classes: {len(merged)} with another triton key")
    before = DIRECT_TAKEN
    pool = [_fuzzed_arguments(rng) for _ in range(20)]
    for _ in range(300):  # and launched: every repeat of a class goes direct and passes what triton's run would
        args, kwargs = rng.choice(pool)
        _every_kind_kernel[(3, 2)](*_same_class(rng, args), **kwargs)
    taken = DIRECT_TAKEN - before
    if taken < 250:
        FAILED.append(f"classes: only {taken} of 300 repeated launches direct")
    print(f"{'ok' if taken >= 250 else 'FAILED'} classes: {taken} of 300 launches of 20 argument sets direct")


# ---------------------------------------------------------------------------------------------------------------
# 2. fastft's launchers


def _launcher_calls():
    from fastft.kernels import attention_bwd, attention_fwd, cross_entropy, glu, lora_gemm, nf4_dequant, rank_ops
    from fastft.kernels import rms_norm, rope
    from fastft.kernels.host import UNBOUNDED
    from fastft.quant.nf4_weight import quantize_nf4

    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16

    def r(*shape, dtype=bf16):
        return torch.randn(*shape, generator=g).to(dtype)

    M, K, N, R = 40, 64, 48, 16
    x, w, lo, t = r(M, K), r(N, K), r(M, R), r(N, R)
    yield "lora_gemm", lambda: lora_gemm.lora_gemm(x, w, lo, t, None, b_nk=True)
    yield "lora_gemm dx, unaligned rows", lambda: lora_gemm.lora_gemm(r(M, N + 1)[:, :N], w, lo, r(R, K), None,
                                                                      b_nk=False)
    yield "rank_project", lambda: rank_ops.rank_project(x, r(R, K), scale=0.5)
    yield "rank_project dropout", lambda: rank_ops.rank_project(x, r(R, K), scale=0.5, p_drop=0.1, seed=3)
    yield "rank_reduce", lambda: rank_ops.rank_reduce(lo, r(M, N))
    h = r(M, K)
    yield "rms_norm", lambda: rms_norm.rms_norm_forward(h, r(K), 1e-6, 0.0, False, bf16)
    yield "rms_norm residual", lambda: rms_norm.rms_norm_forward(h, r(K), 1e-6, 1.0, False, bf16, residual=r(M, K))
    q, k = r(2, 5, 4, 32), r(2, 5, 2, 32)
    cos, sin = r(1, 5, 32, dtype=torch.float32), r(1, 5, 32, dtype=torch.float32)
    yield "rope", lambda: rope.rope_rotate(q, k, cos, sin, torch.empty_like(q), torch.empty_like(k))
    yield "glu", lambda: glu.glu_forward(r(M, N), r(M, N), False)
    logits, labels = r(6, 50, dtype=torch.float32), torch.randint(0, 50, (6,), generator=g)
    yield "cross_entropy rows", lambda: cross_entropy.ce_rows(logits.clone(), labels, torch.ones(1), ignore_index=-100,
                                                              label_smoothing=0.0, softcap=None, compute_grad=True)
    w4 = quantize_nf4(r(64, 128), blocksize=64).kernel_operand()
    yield "nf4_dequantize", lambda: nf4_dequant.nf4_dequantize(
        w4.packed, w4.absmax, 64 * 128, w4.blocksize, bf16, w4.code, absmax2=w4.absmax2, code2=w4.code2,
        offset=w4.offset, nested_blocksize=w4.nested_blocksize)
    B, S, H, D = 1, 40, 2, 32
    aq, ak, av = r(B, S, H, D), r(B, S, H, D), r(B, S, H, D)
    common = dict(sm_scale=D ** -0.5, left=UNBOUNDED, right=0)
    yield "attention forward", lambda: attention_fwd.attention_forward(aq, ak, av, **common)
    o, lse = attention_fwd.attention_forward(aq, ak, av, **common)
    yield "attention backward", lambda: attention_bwd.attention_backward(r(B, S, H, D), aq, ak, av, o, lse, **common)


def check_launchers() -> None:
    for name, call in _launcher_calls():
        before, taken = len(LAUNCHES), DIRECT_TAKEN
        try:
            for _ in range(3):
                call()
        except Exception as err:  # noqa: BLE001 - reported as a failure of this launcher
            FAILED.append(f"{name}: {type(err).__name__}: {err}")
            print(f"FAILED {name}: {type(err).__name__}: {err}")
            continue
        launches, direct = len(LAUNCHES) - before, DIRECT_TAKEN - taken
        ok = launches > 0 and direct >= launches * 2 // 3
        if not ok:
            FAILED.append(f"{name}: {direct} of {launches} launches direct")
        print(f"{'ok' if ok else 'FAILED'} {name}: {direct} of {launches} launches direct")


def time_launchers(calls: int = 300) -> None:
    """µs a call of each launcher (fastft's Python and triton's launch path; the launcher itself a recording no-op)
    through triton's run and through the direct path, best of 5 rounds: the host time the direct path saves here."""
    DirectLaunchJIT.run = _direct_run  # no checking: the plain paths
    for name, call in _launcher_calls():
        row = {}
        for path in (False, True):
            launch.DIRECT = path
            call()
            best = float("inf")
            for _ in range(5):
                LAUNCHES.clear()
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                best = min(best, (time.perf_counter() - start) / calls)
            row[path] = best * 1e6
        print(f"{name:32s} triton's run {row[False]:7.1f} µs   direct {row[True]:7.1f} µs   "
              f"saved {row[False] - row[True]:6.1f} µs a call")
    LAUNCHES.clear()


def main() -> int:
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    if "--time" in sys.argv:
        torch.set_num_threads(1)
        time_launchers()
        return 0
    check_classes()
    check_launchers()
    for failure in FAILED:
        print("FAILED", failure)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
