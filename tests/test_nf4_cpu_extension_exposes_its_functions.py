"""fastft._C is optional, and fastft.kernels.nf4_cpu.available() is False both where it was not built and where it
was built without the host NF4 functions (`hasattr(_C, "nf4_quantize_cpu")`); every C++ test then skips and the
torch fallback passes the rest, so an extension that lost its NF4 registration (csrc/registry.cpp) would go unseen.
Where the module imports, it must carry both functions, and its build_info must say truly whether OpenMP is in."""
import pytest


def test_a_built_extension_registers_the_host_nf4_functions():
    _C = pytest.importorskip("fastft._C")
    from fastft.kernels import nf4_cpu

    assert callable(getattr(_C, "nf4_quantize_cpu", None)) and callable(getattr(_C, "nf4_dequantize_cpu", None))
    assert nf4_cpu.available()
    assert set(_C.build_info) == {"cuda", "openmp"}
    with open(_C.__file__, "rb") as f:                       # OpenMP's runtime entry (GNU or LLVM) is in the binary
        binary = f.read()
    assert _C.build_info["openmp"] == (b"GOMP_parallel" in binary or b"__kmpc_fork_call" in binary)
