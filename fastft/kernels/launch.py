"""`jit`: triton.jit for the kernels fastft launches, with a shorter host path on a launch triton has seen before.

Why: a fused LoRA forward+backward launches 5 kernels, and at 4096→4096 the H100 run (docs/gpu-results.md,
2026-12-05) found the call host-bound: 706 µs a call with real launches against 253 with the launches stubbed.
Most of a cache-hit `JITFunction.run` is Python that gives the same answer every time: binding the arguments with
their defaults, specializing each one, building the cache key from them and the options (~44 µs a launch of
`_lora_gemm_kernel` under triton 3.6 on the 2-core CPU machine, the C launcher stubbed, ~22 through this path:
`python -m tests.direct_launch_check --time` prints what each launcher's call costs either way).

`DirectLaunchJIT.run` keeps, per kernel, the compiled kernel of every argument *class* it has launched: each
positional argument reduced to what triton specializes on (a tensor's dtype and 16-byte alignment; an int's being 1,
its divisibility by 16 and its width; floats, bools and None as such), plus the keyword arguments themselves
(constexprs and launch options) and the device. That class is at least as fine as triton's own specialization
(tests/test_direct_launch.py checks, on a faked driver, that two launches of one class always share triton's key),
so the kernel it finds is the one triton's run would have found, and it is launched with the very arguments triton's
run passes (same test). Anything else — a first launch, an argument of another type, a callable grid, a warmup,
pre-run or launch-enter hooks (profilers read the launch metadata this path does not build) — goes through
triton's own run. FASTFT_DIRECT_LAUNCH=0 turns it off (read at import; `DIRECT` for tests and benchmarks).

Under the interpreter `jit` is triton.jit itself (nothing to save, and nothing compiled to keep).
"""
from __future__ import annotations

import operator
import os

import torch

from fastft.kernels.runtime import HAS_TRITON, INTERPRET, triton

DIRECT = os.environ.get("FASTFT_DIRECT_LAUNCH", "1") != "0"

_I32_MIN, _I32_END, _U64 = -(2**31), 2**31, 2**63
_Tensor = torch.Tensor


if HAS_TRITON and not INTERPRET:
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    def _hooks_idle() -> bool:
        """No launch-enter hook registered (triton 3.6+ keeps an empty HookChain): the metadata triton builds for
        such hooks would be read by no one."""
        hook = knobs.runtime.launch_enter_hook
        return hook is None or not getattr(hook, "calls", True)

    class DirectLaunchJIT(JITFunction):
        """A JITFunction whose repeat launches skip triton's argument binding and specialization (module doc)."""

        def __init__(self, fn):
            super().__init__(fn)
            self._launches: dict = {}
            self._names = tuple(self.arg_names)
            self._defaults = {p.name: p.default for p in self.params if p.has_default}
            # a constexpr passed by position is classified by its value, as triton's specialization does
            self._constexprs = frozenset(p.num for p in self.params if p.is_constexpr)
            self._first_constexpr = min(self._constexprs, default=len(self._names))

        def run(self, *args, grid, warmup, **kwargs):
            if warmup or not DIRECT or self.pre_run_hooks or type(grid) is not tuple or not _hooks_idle():
                return super().run(*args, grid=grid, warmup=warmup, **kwargs)
            key = self._key(args, kwargs)
            try:
                found = None if key is None else self._launches.get(key)
            except TypeError:  # an unhashable keyword value
                key = found = None
            if found is None:
                kernel = super().run(*args, grid=grid, warmup=warmup, **kwargs)
                if key is not None and kernel is not None and not hasattr(kernel, "result"):  # (an async compile)
                    self._launches[key] = self._entry(kernel, len(args), kwargs)
                return kernel
            kernel, launcher, function, metadata, tail, defaults = found
            if defaults:
                kwargs = {**defaults, **kwargs}
            n = len(grid)
            launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                     driver.active.get_current_stream(key[0]), function, metadata, None,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args, *tail(kwargs))
            return kernel

        def _key(self, args: tuple, kwargs: dict) -> tuple | None:
            """(device, debug, each positional argument's class, the keyword arguments); None where an argument is
            of a type not classified here. Flat, and written out rather than a call per argument: it runs on every
            launch. A tensor adds its dtype and then its alignment (a bool); every other kind adds one item, and
            only a tensor adds a dtype, so two equal keys read back into the same classes one way only."""
            key = [driver.active.get_current_device(), knobs.runtime.debug]
            add = key.append
            first_constexpr = self._first_constexpr
            for i, a in enumerate(args):
                kind = type(a)
                if i >= first_constexpr and i in self._constexprs:
                    add(("constexpr", a))  # triton specializes a constexpr on its value
                elif kind is int:  # 1, a multiple of 16, other; past int32: 4 + that, past 2**63 (u64): 8 + that
                    if _I32_MIN <= a < _I32_END:
                        add(1 if a == 1 else 2 if not a & 15 else 0)
                    else:
                        add((2 if not a & 15 else 0) + (4 if a < _U64 else 8))
                elif kind is _Tensor or isinstance(a, _Tensor):
                    add(a.dtype)
                    add(not a.data_ptr() & 15)
                elif kind is float or kind is bool or a is None:
                    add(kind)
                else:
                    return None
            key += kwargs.items()
            return tuple(key)

        def _entry(self, kernel, n_args: int, kwargs: dict) -> tuple:
            """What a direct launch of `kernel` needs: its launcher, function and metadata, and how to read the
            arguments after the positional ones (keyword, else default) in parameter order."""
            names = self._names[n_args:]
            defaults = {n: self._defaults[n] for n in names if n not in kwargs}
            tail = (lambda kw: ()) if not names else (lambda kw, name=names[0]: (kw[name],)) if len(names) == 1 \
                else operator.itemgetter(*names)
            return kernel, kernel.run, kernel.function, kernel.packed_metadata, tail, defaults


def jit(fn):
    """triton.jit for a kernel fastft launches: DirectLaunchJIT on a GPU, triton's own under the interpreter."""
    if not HAS_TRITON:
        return fn
    if INTERPRET:
        return triton.jit(fn)
    return DirectLaunchJIT(fn)
