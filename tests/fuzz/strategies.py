"""Shared hypothesis strategies of the fuzz suite: sizes, dtypes and tensor arguments in every layout.

Fuzzing a new op (fused losses, RMSNorm, RoPE, SwiGLU, ...) takes four steps:
  1. Its fp64 reference goes in tests/fuzz/references.py, written from the math (never call fastft's own
     `*_reference`), returning the result, the gradients and their magnitudes (the same sums over |terms|);
     the tolerance rule is in that module's docstring.
  2. tests/fuzz/test_<family>.py draws a problem inside `@given(data=st.data())`: sizes with `dim(data, ...)`
     (reaches 0, 1 and odd sizes), a dtype with `data.draw(float_dtypes())`, and each tensor argument with
     `tensor(data, shape, dtype)`, which picks its layout: contiguous, last two dims transposed, dims -3/-2
     swapped (attention's (B, H, S, D) storage), row-sliced, strided last dim, stride-0 expanded, or at a
     storage offset (`layouts=` narrows the choice where the op documents a restriction). Values are seeded
     N(0, 1)·scale, exact in the dtype; `windows()`, `doc_lengths()` and INT32_EDGES cover integer arguments.
  3. Forward and every gradient are compared with `references.check(op, what, out, ref, mag, dtype,
     n_round, lengths)`, n_round and lengths stated from the op's arithmetic at the call site (extra_rel /
     abs_floor where the op has further error sources), and `references.count_example(op)` counts the
     example for the report.
  4. Decorate with `@fuzz(n)`: n examples in the CI profile (tests/fuzz/conftest.py: fixed seed, the example
     database in tests/fuzz/.hypothesis-examples), FASTFT_FUZZ_EXAMPLES=N for long runs. A GPU variant carries
     `@pytest.mark.gpu`, passes device="cuda" and larger size limits (see test_lora_linear.py).
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "transposed", "swap_leading", "row_sliced", "last_strided", "expanded", "offset")
INT32_EDGES = (2**30, 2**30 + 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**62)


FUZZ_SEED = 20261130


def fuzz(ci_examples: int, *, deadline=None):
    """Decorator (above @given): `ci_examples` examples by default, FASTFT_FUZZ_EXAMPLES=N overrides; in the ci
    profile also the fixed seed FUZZ_SEED. The database and the rest come from tests/fuzz/conftest.py."""
    n = int(os.environ.get("FASTFT_FUZZ_EXAMPLES", ci_examples))
    fixed = os.environ.get("FASTFT_FUZZ_PROFILE", "ci") == "ci"

    def wrap(test):
        # seed first: hypothesis' @seed also sets database=None, and settings applied after it put the profile's
        # database back (applied the other way round, CI never replayed the saved failures)
        if fixed:
            test = seed(FUZZ_SEED)(test)
        return settings(max_examples=n, deadline=deadline,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                               HealthCheck.function_scoped_fixture])(test)

    return wrap


def float_dtypes(allowed=FLOAT_DTYPES):
    return st.sampled_from(allowed)


def dim(data, lo: int, hi: int, *, label: str = "") -> int:
    """A size in [lo, hi] that reaches lo, 1 and the odd sizes near small powers of two often (ragged tiles)."""
    edges = sorted({v for v in (lo, 1, 2, 15, 17, 31, 33, 63, 65, hi) if lo <= v <= hi})
    return data.draw(st.one_of(st.sampled_from(edges), st.integers(lo, hi)), label=label or None)


def _applicable(layout: str, shape) -> bool:
    n = len(shape)
    if layout == "transposed":
        return n >= 2 and shape[-1] > 1 and shape[-2] > 1
    if layout == "swap_leading":
        return n >= 3 and shape[-2] > 1 and shape[-3] > 1
    if layout in ("row_sliced", "last_strided"):
        return n >= 1
    if layout == "expanded":
        return n >= 1 and any(s > 1 for s in shape)
    return True


def tensor(data, shape, dtype, *, layouts=LAYOUTS, scale: float = 1.0, device="cpu", requires_grad=False,
           label: str = "") -> torch.Tensor:
    """A tensor of logical `shape` whose memory layout hypothesis picks from `layouts` (those that apply).

    requires_grad: the *view* takes part in autograd (its base is the leaf), so gradients with respect to it
    come back in its own shape, strides aside, as an op's caller would see them.
    """
    shape = tuple(int(s) for s in shape)
    choices = [lay for lay in layouts if _applicable(lay, shape)] or ["contiguous"]
    layout = data.draw(st.sampled_from(choices), label=f"{label} layout" if label else None)
    seed = data.draw(st.integers(0, 2**32 - 1), label=f"{label} seed" if label else None)
    gen = torch.Generator().manual_seed(seed)

    def rand(base_shape):
        vals = (torch.randn(base_shape, generator=gen) * scale).to(dtype)  # exact in dtype before any view
        return vals.to(device).requires_grad_(requires_grad)

    if layout == "transposed":
        t = rand(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    elif layout == "swap_leading":  # dims -3 and -2 swapped in storage, e.g. (B, H, S, D) seen as (B, S, H, D)
        t = rand(shape[:-3] + (shape[-2], shape[-3], shape[-1])).transpose(-3, -2)
    elif layout == "row_sliced":  # every other row of a taller tensor: a larger leading stride
        t = rand((2 * shape[0] + 1,) + shape[1:])[1::2]
    elif layout == "last_strided":  # every other element of the last dimension: last stride 2
        t = rand(shape[:-1] + (2 * shape[-1],))[..., ::2]
    elif layout == "expanded":  # one dimension broadcast with stride 0
        dims = [i for i, s in enumerate(shape) if s > 1]
        d = data.draw(st.sampled_from(dims), label=f"{label} expanded dim" if label else None)
        t = rand(shape[:d] + (1,) + shape[d + 1:]).expand(shape)
    elif layout == "offset":  # a view that starts inside its storage
        n = 1
        for s in shape:
            n *= s
        t = rand((n + 3,))[3:].view(shape)
    else:
        t = rand(shape)
    assert tuple(t.shape) == shape
    return t


def windows():
    """Sliding windows: none, small ones, and the int32 edges ("no limit" spellings and overflow traps)."""
    return st.one_of(st.none(), st.integers(1, 48), st.sampled_from(INT32_EDGES))


def doc_lengths(max_docs: int = 4, max_len: int = 24):
    """Packed document lengths, zero-length documents included."""
    return st.lists(st.one_of(st.just(0), st.integers(1, max_len)), min_size=1, max_size=max_docs)
