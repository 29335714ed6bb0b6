"""Which integer arguments the ops' kernel launches pass as 1 (a real launch compiles those as the constexpr 1) or as
multiples of 16 (compiled with the tt.divisibility 16 hint): what tests/sm90_compile.py must compile to check what
runs. Runs the given pytest files (default: the op tests of each kernel family) under the CPU interpreter with every
@triton.jit launch recorded, then prints per kernel and combination of its bool constexprs the arguments that were 1
in every launch, in some, and those that were always multiples of 16 (tensors: 16-byte aligned addresses). The
tests' shapes are small and odd on purpose (a size of 1 or 40 is a test case, not a model's): what follows from the
layout (a unit stride) carries over to real launches, the divisibility of sizes does not (model widths are multiples
of 16, token counts are not). A developer tool, not a test (~10 min on 1 core):

    OMP_NUM_THREADS=1 TRITON_INTERPRET=1 python -m tests.launch_specializations [pytest files or args ...]

Triton's JIT (runtime/jit.py, native_specialize_impl, 3.6 and 3.7 alike) turns an int argument equal to 1 into a
constexpr and marks one divisible by 16 (0 included) with tt.divisibility 16, unless the kernel's
do_not_specialize names it (no fastft kernel does); bools and floats are not specialized.
"""
import collections
import inspect
import os
import sys

DEFAULT_TESTS = ["tests/test_lora_linear_op.py", "tests/test_lora_fold.py", "tests/test_methods_dora.py",
                 "tests/test_methods_ia3.py", "tests/test_qlora_op.py", "tests/test_layer_ops.py",
                 "tests/test_attention_op.py", "tests/test_linear_losses.py", "tests/test_methods_adapter.py",
                 "tests/test_nf4_kernels.py"]


def _kind(value) -> str | None:
    """"1", "16k" (a multiple of 16; a tensor: its address) or "int" for what the JIT specializes, else None."""
    if hasattr(value, "data_ptr"):
        return "16k" if value.data_ptr() % 16 == 0 else "int"
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return "1" if value == 1 else "16k" if value % 16 == 0 else "int"


def main(argv: list[str]) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    import pytest
    from triton.runtime.interpreter import InterpretedFunction

    # kernel -> its bool constexprs (the variant) -> argument -> Counter of kinds
    seen = collections.defaultdict(
        lambda: collections.defaultdict(lambda: collections.defaultdict(collections.Counter)))
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        bound = dict(zip((p.name for p in params), args), **kwargs)
        flags = tuple(f"{p.name}={bound[p.name]}" for p in params
                      if "constexpr" in str(p.annotation) and isinstance(bound.get(p.name), bool))
        record = seen[self.fn.__name__][flags]
        record["(launches)"][""] += 1
        for p in params:
            kind = _kind(bound.get(p.name)) if "constexpr" not in str(p.annotation) else None
            if kind is not None:
                record[p.name][kind] += 1
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    code = pytest.main(["-q", "-p", "no:cacheprovider", *(argv or DEFAULT_TESTS)])
    InterpretedFunction.run = run
    for name in sorted(seen):
        print(f"\n{name}")
        for flags, record in sorted(seen[name].items()):
            n = record.pop("(launches)")[""]
            always = [a for a, k in record.items() if k["1"] == n]
            some = [f"{a} ({k['1']}/{n})" for a, k in record.items() if 0 < k["1"] < n]
            aligned = [a for a, k in record.items() if k["16k"] == n]
            print(f"  {' '.join(flags) or '-'}: {n} launches\n    always 1: {', '.join(always) or '-'}")
            print(f"    sometimes 1: {', '.join(some) or '-'}")
            print(f"    always a multiple of 16: {', '.join(aligned) or '-'}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
