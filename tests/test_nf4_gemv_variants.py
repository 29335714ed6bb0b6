"""The CUDA GEMV's kernels (SCALED, TABLE, TABLE_LEAN, TABLE_DEEP and the candidates TABLE_DEEP_K4/_K2), as far as a
machine without a GPU can check them: the extension's argument checks run before any CUDA call, so a bad `variant`
is refused here too (the kernels themselves run in tests/test_nf4_gpu.py::test_cuda_gemv and
::test_cuda_gemv_lean_loops_match_table)."""
import pytest

from fastft.kernels import nf4_cuda


def _launch(*, k=64, blocksize=64, variant=1, n=0):
    # null pointers are 16-byte aligned; n = 0 returns before any CUDA call
    nf4_cuda._C.nf4_gemv_cuda(0, 64, 0, 0, 0, 0, 0.0, 256, 0, 0, 64, 1, n, k, blocksize, 2, 0, variant)


@pytest.fixture
def extension():
    if not nf4_cuda.available():
        pytest.skip("fastft._C was built without CUDA (no nvcc)")


@pytest.mark.parametrize("bad", [dict(blocksize=32), dict(k=96), dict(variant=2, blocksize=32), dict(variant=2, k=96),
                                 dict(variant=2, k=320, blocksize=32), dict(variant=3, blocksize=32),
                                 dict(variant=3, k=96), dict(variant=4, blocksize=32), dict(variant=5, k=96),
                                 dict(variant=6), dict(variant=-1)])
def test_the_table_kernels_are_refused_where_a_half_step_would_straddle_an_absmax_block(extension, bad):
    with pytest.raises(RuntimeError, match=r"variant must be 0 .*, 1 .*, 2 .*, 3 .*, 4 or 5 .*; 1 to 5 need "
                                           r"blocksize >= 64 and k a multiple of 64"):
        _launch(**bad)


ALL_VARIANTS = [nf4_cuda.SCALED, nf4_cuda.TABLE, nf4_cuda.TABLE_LEAN, nf4_cuda.TABLE_DEEP, nf4_cuda.TABLE_DEEP_K4,
                nf4_cuda.TABLE_DEEP_K2]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("k", [128, 320])  # the lean loop's own kernel, and the table kernel it falls back to
def test_every_kernel_accepts_an_empty_weight(extension, variant, k):
    _launch(k=k, blocksize=64, variant=variant)


def test_the_split_k_kernels_are_candidates_only():
    """TABLE_DEEP_K4 / _K2 wait for a GPU run (forced by tests/test_nf4_gpu.py, timed by benchmarks/gpu_nf4.py)."""
    assert (nf4_cuda.TABLE_DEEP_K4, nf4_cuda.TABLE_DEEP_K2) == (4, 5)
    assert not {nf4_cuda.TABLE_DEEP_K4, nf4_cuda.TABLE_DEEP_K2} & {c["variant"] for c in nf4_cuda.TUNER.configs}


def test_the_tuner_times_every_kernel_with_scaled_as_the_untimed_default():
    """TABLE_LEAN and TABLE_DEEP joined the measured choice after the H100 run of 2026-12-05 (bit-identical to TABLE
    on the GPU, faster at batch 1); SCALED stays first: the untimed default (FASTFT_AUTOTUNE=0, CUDA-graph capture)."""
    assert (nf4_cuda.TABLE_LEAN, nf4_cuda.TABLE_DEEP) == (2, 3)
    assert [c["variant"] for c in nf4_cuda.TUNER.configs] == [nf4_cuda.SCALED, nf4_cuda.TABLE, nf4_cuda.TABLE_LEAN,
                                                               nf4_cuda.TABLE_DEEP]


@pytest.mark.parametrize("blocksize,cols,ok", [(64, 4096, True), (256, 14336, True), (32, 4096, False),
                                               (64, 96, False), (128, 320, True)])
def test_table_supported(blocksize, cols, ok):
    class W:
        pass
    w = W()
    w.blocksize, w.cols = blocksize, cols
    assert nf4_cuda.table_supported(w) is ok


def test_cuda_gemv_kernels_compile_for_sm90_without_spills():
    """Every kernel, both batch tiles, fp16 and bf16, as CMake builds them for Hopper: no register spills, no local
    memory (a runtime-indexed array would put one there: TABLE_DEEP's ring of fragments must stay unrolled), and the
    table kernels' shared memory under the 48 KB a block may declare statically; TABLE_LEAN's kernels use no more
    registers than the table kernel's batch-8 tile (rounded to the allocation unit of 8: the same 3 blocks an SM),
    TABLE_DEEP's at most 128 (2 blocks an SM of 256 threads)."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    src = Path(__file__).resolve().parents[1] / "csrc"
    run = subprocess.run([nvcc, "-arch=sm_90", "-O3", "--use_fast_math", "-std=c++17", "-Xptxas", "-v", "-c",
                          str(src / "cuda" / "nf4_gemv.cu"), "-I", str(src), "-o", "/dev/null"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = run.stderr.split("Compiling entry function")[1:]
    # {fp16, bf16} × ({1, 2 batch tiles} × {scaled, table} + {lean, deep, deep K4, deep K2} × {plain, nested absmax})
    assert len(kernels) == 24, run.stderr[-3000:]
    registers = {}
    for info in kernels:
        name = info.split("'")[1]
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
        smem = re.search(r"(\d+) bytes smem", info)
        assert frame and frame.groups() == ("0", "0", "0"), (name, info)
        assert smem and int(smem.group(1)) <= 48 * 1024, (name, info)
        registers[name] = int(re.search(r"Used (\d+) registers", info).group(1))
    table = max(r for name, r in registers.items() if "nf4_gemv_kernel" in name and "Li1ELb1E" in name)
    # the lean kernel's template arguments <T, kNested, kDepth, kSplitK> end its mangled name: ...ELi{depth}ELi{split}EE
    lean = {name: r for name, r in registers.items() if "nf4_gemv_lean_kernel" in name and "ELi2ELi8EE" in name}
    deep = {name: r for name, r in registers.items() if "nf4_gemv_lean_kernel" in name and "ELi4ELi" in name}
    assert len(lean) == 4 and all(-(-r // 8) <= -(-table // 8) for r in lean.values()), (table, lean)
    assert len(deep) == 12 and all(r <= 128 for r in deep.values()), deep  # TABLE_DEEP, _K4, _K2


def test_the_checks_random_weight_has_a_nested_absmax_for_every_block():
    """The once-per-device checks' weight: every block's code has its nested absmax (a short absmax2 would be read
    past its end on the GPU)."""
    import torch

    from fastft.kernels.nf4_gemm import random_nf4_operand

    for rows, cols in [(88, 320), (256, 256), (1, 64)]:
        w = random_nf4_operand(rows, cols, torch.device("cpu"), torch.Generator().manual_seed(0))
        blocks = rows * cols // 64
        assert w.absmax.numel() == blocks and w.packed.numel() == rows * cols // 2
        assert (blocks - 1) // w.nested_blocksize < w.absmax2.numel()
