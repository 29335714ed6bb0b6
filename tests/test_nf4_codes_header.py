"""The NF4 code table has one source (fastft/kernels/nf4_codes.py): the checked-in C/CUDA header is its
generated output, and no C++/CUDA source keeps a copy of its own."""
import pathlib
import re
import subprocess
import sys

from fastft.kernels.nf4_codes import NF4_CODE_VALUES, c_header

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_checked_in_header_is_the_generated_one():
    header = (ROOT / "csrc" / "nf4_codes.h").read_text()
    assert header == c_header(), ("csrc/nf4_codes.h drifted from fastft/kernels/nf4_codes.py; regenerate it with "
                                  "`python -m fastft.kernels.nf4_codes csrc/nf4_codes.h`")
    values = [float(v) for v in re.findall(r"(-?\d+\.\d+)f", header)]
    assert values == list(NF4_CODE_VALUES)  # the C literals parse back to the Python table exactly


def test_sources_include_the_header_and_keep_no_copy():
    for path in ("csrc/nf4_cpu.cpp", "csrc/cuda/nf4_gemv.cu"):
        text = (ROOT / path).read_text()
        assert "nf4_codes.h" in text and "FASTFT_NF4_CODE_VALUES" in text, path
        assert "0.6961928" not in text, f"{path} keeps its own NF4 table"


def test_generator_writes_the_header(tmp_path):
    out = tmp_path / "nf4_codes.h"
    subprocess.run([sys.executable, "-m", "fastft.kernels.nf4_codes", str(out)], check=True, cwd=ROOT)
    assert out.read_text() == c_header()
