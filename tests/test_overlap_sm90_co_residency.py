"""The side streams' kernels share the SMs: FASTFT_LORA_OVERLAP's (fastft.ops.overlap; every dx GEMM config that leaves
room and a block of each reduction launched beside it) and FASTFT_QLORA_PREFETCH's (fastft.ops.qlora_prefetch; the
NF4 dequantize beside every LoRA GEMM config) fit on one sm_90 SM together (tests/sm90_compile.py `overlap`),
compiled under the GPU machine's triton (3.6: what runs on the H100/H200; the venv's 3.7 compiles the same lists in
`lora`)."""
import pytest

from tests.sm90_runner import GPU_TRITON, run_sm90_compile

pytest.importorskip("triton")


def test_the_overlapped_kernels_fit_one_sm_together():
    out = run_sm90_compile("overlap", triton_path=GPU_TRITON, alone=True)
    assert "rank_reduce_pair beside the GEMM" in out and "dx GEMM (dora)" in out, out[-2000:]
    assert "nf4 dequantize beside the GEMM" in out and "GEMM b_nk=True" in out, out[-2000:]


def test_the_tuned_configs_left_no_room_and_the_roomy_ones_do():
    """The arithmetic, on the sm_90 compile's figures (triton 3.6): the tuned dx GEMM's first descriptor config
    (225 KB of shared memory) and the tuned pair reduction (51 KB) cannot share an SM; the roomy 128×256×64 3-stage
    config beside the BESIDE_GEMM pair at R = 64 can; registers count a warp at a time."""
    from tests.sm90_compile import co_resident

    tuned_gemm = dict(smem=225320, regs=163, threads=256)
    assert not co_resident(tuned_gemm, dict(smem=51200, regs=80, threads=128))
    roomy_gemm, beside_pair = dict(smem=213016, regs=154, threads=256), dict(smem=16384, regs=66, threads=128)
    assert co_resident(roomy_gemm, beside_pair)
    assert not co_resident(roomy_gemm, dict(beside_pair, smem=20000))  # shared memory: 1 KB a block reserved
    assert not co_resident(dict(roomy_gemm, regs=249), beside_pair)  # registers: 256·256 + 72·128 > 64 K
    assert not co_resident(*[dict(smem=0, regs=8, threads=1024)] * 3)  # threads
