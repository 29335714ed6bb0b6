"""At widths that are not multiples of 16 a launch compiles its pointer loads without the JIT's divisibility hint, and
the pointer-load LoRA GEMM's (plain and dx with a dropout tail at R = 64) and the adapter's down projection's usual
configs spill in their main loops on sm_90
(tests/sm90_compile.py `lora`, docs/gpu-results.md): the launchers take another list there. Checked: which list the
launchers ask for, and that the lists differ only where they should (the GPU lists, built with INTERPRET off and
dropped from the caches after)."""
import pytest
import torch

from fastft.kernels import bottleneck_adapter, lora_gemm
from tests.utils import interpreter_only


@pytest.fixture
def gpu_lists(monkeypatch):
    """The lists a GPU gets (INTERPRET off), not left cached for later interpreter tests."""
    cached = (lora_gemm._gemm_configs, lora_gemm._fold_configs, lora_gemm.dropout_dx_configs,
              lora_gemm._roomy_configs, bottleneck_adapter._down_configs)
    for fn in cached:
        fn.cache_clear()
    monkeypatch.setattr(lora_gemm, "INTERPRET", False)
    monkeypatch.setattr(bottleneck_adapter, "INTERPRET", False)
    yield
    for fn in cached:
        fn.cache_clear()


def test_only_the_plain_pointer_list_and_the_down_projection_change(gpu_lists):
    odd, aligned = lora_gemm.gemm_configs(False, 2, aligned=False), lora_gemm.gemm_configs(False, 2)
    assert odd != aligned and odd[0]["BLOCK_K"] == 32 and aligned[0]["BLOCK_K"] == 64
    assert lora_gemm.gemm_configs(True, 2, aligned=False) == lora_gemm.gemm_configs(True, 2)  # descriptors
    assert lora_gemm.gemm_configs(False, 2, 16, aligned=False) == lora_gemm.gemm_configs(False, 2, 16)  # fold
    # dx with a dropout tail: another list at R = 64 only
    assert lora_gemm.gemm_configs(False, 2, 0, True, 16, aligned=False) == lora_gemm.gemm_configs(False, 2, 0, True, 16)
    assert lora_gemm.gemm_configs(False, 2, 0, True, 64, aligned=False) != lora_gemm.gemm_configs(False, 2, 0, True, 64)
    assert lora_gemm.gemm_configs(True, 2, 0, True, 64, aligned=False) == lora_gemm.gemm_configs(True, 2, 0, True, 64)
    assert lora_gemm.gemm_configs(False, 4, aligned=False) == lora_gemm.gemm_configs(False, 4)  # fp32
    down_odd, down = bottleneck_adapter._down_configs(False), bottleneck_adapter._down_configs()
    assert [c["num_warps"] for c in down_odd[:2]] == [8, 8] and [c["num_warps"] for c in down[:2]] == [4, 4]
    assert down_odd[2:] == down[2:]


@interpreter_only
@pytest.mark.parametrize("K, N, expected", [(32, 48, True), (40, 48, False), (32, 24, False)])
def test_the_lora_gemm_asks_for_the_list_of_its_widths(monkeypatch, K, N, expected):
    asked = []
    configs = lora_gemm.gemm_configs
    monkeypatch.setattr(lora_gemm, "gemm_configs", lambda *args: asked.append(args[5]) or configs(*args))  # aligned
    x, w = torch.randn(5, K), torch.randn(N, K)
    torch.testing.assert_close(lora_gemm.lora_gemm(x, w, None, None, None, b_nk=True), x @ w.t())
    assert asked == [expected]


@interpreter_only
@pytest.mark.parametrize("N, expected", [(32, True), (40, False)])
def test_the_down_projection_asks_for_the_list_of_its_width(monkeypatch, N, expected):
    asked = []
    configs = bottleneck_adapter._down_configs
    monkeypatch.setattr(bottleneck_adapter, "_down_configs", lambda aligned: asked.append(aligned) or configs(aligned))
    h, d = torch.randn(5, N), torch.randn(16, N)
    z, p = bottleneck_adapter.down_act(h, d, None, "relu")
    torch.testing.assert_close(p, h @ d.t())
    assert asked == [expected]
