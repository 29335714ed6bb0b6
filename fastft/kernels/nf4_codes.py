"""The 16 NF4 code values (quantiles of N(0, 1) scaled to [-1, 1], the QLoRA paper's table), as bitsandbytes
stores them. The single source for Python, C++ and CUDA: the Triton kernels and fastft.quant read them from
here, and csrc/nf4_codes.h (included by csrc/nf4_cpu.cpp and csrc/cuda/nf4_gemv.cu) is generated from this
file by `python -m fastft.kernels.nf4_codes csrc/nf4_codes.h`. The header is checked in so the C++ build
needs no Python step; tests/test_nf4_codes_header.py fails when it drifts from this table."""

import sys

from fastft.files import atomic_write

NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def c_header() -> str:
    """csrc/nf4_codes.h: the table as a brace initializer macro (usable for constexpr and __constant__ arrays)."""
    rows = [", ".join(f"{v!r}f" for v in NF4_CODE_VALUES[i:i + 4]) for i in range(0, 16, 4)]
    body = ", \\\n    ".join(rows)
    return ("// Generated from fastft/kernels/nf4_codes.py by `python -m fastft.kernels.nf4_codes csrc/nf4_codes.h`;\n"
            "// do not edit (tests/test_nf4_codes_header.py fails when this drifts from the Python table).\n"
            "#pragma once\n\n"
            "// The 16 NF4 code values, bitsandbytes' table: `float table[16] = FASTFT_NF4_CODE_VALUES;`\n"
            f"#define FASTFT_NF4_CODE_VALUES {{ \\\n    {body}}}\n")


def write_header(path: str) -> None:
    """Write c_header() to `path` atomically."""
    atomic_write(path, c_header())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fastft.kernels.nf4_codes PATH/nf4_codes.h")
    write_header(sys.argv[1])
