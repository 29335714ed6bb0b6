"""The attention forward/backward Triton kernels (tests/sm90_compile.py `attention`) compile for sm_90 (H100/H200)
on this CPU-only machine at their main launch configs, head_dim 64 and 128, bf16, within shared memory and
without register spills beyond KNOWN_ATTENTION_SPILLS (none under triton 3.7; a few bytes in the varlen dK/dV
under 3.6), under the venv's triton and the GPU machine's (tests/sm90_runner.py)."""
import pytest

from tests.sm90_runner import TRITONS, run_sm90_compile

pytest.importorskip("triton")


@pytest.mark.parametrize("triton_path", TRITONS)
def test_attention_kernels_compile_for_sm90(triton_path):
    out = run_sm90_compile("attention", triton_path=triton_path)
    compiled = [line for line in out.splitlines() if line.startswith("ok attention")]
    # fwd, dkdv, dq x (batch, varlen+prefix), the prefix keys' dkdv and delta, for D = 64 and 128
    assert len(compiled) == 16, out


@pytest.mark.parametrize("triton_path", TRITONS)
def test_attention_dq_reduce_candidates_compile_for_sm90(triton_path):
    """The backward candidates that add dQ by TMA reduce-adds (attention_bwd DQ_REDUCE, never run on a GPU yet) keep
    their point: warpgroup MMA, a TMA reduce-add (not per-element atomics, which spilled at D = 128), and no spills
    on 1 stage — so a later edit of the dK/dV kernel cannot leave the GPU run a candidate that lost it."""
    out = run_sm90_compile("attention-dq-reduce", triton_path=triton_path)
    compiled = [line for line in out.splitlines() if line.startswith("ok attention bwd dkdv dq-reduce")]
    # two configs x (batch, varlen+prefix, the prefix keys' launch)
    assert len(compiled) == 6 and all("mma=wgmma" in line for line in compiled), out
