"""The dequant path decodes W into the scratch buffer of the input's dtype: a bf16 (or fp16) QLoRA layer holds one
bf16 copy of its largest weight, forward and dx both, not an fp32 one (twice the memory the path promises: at most
the bf16 LoRA model plus one bf16 weight), and the nf4_linear door (no rank tail) alike."""
import pytest
import torch

from fastft.ops import nf4_linear, qlora_linear, qlora_path
from fastft.quant import quantize_nf4
from tests.utils import interpreter_only


@pytest.fixture(autouse=True)
def _dequant_path(monkeypatch):
    monkeypatch.setenv(qlora_path.ENV, "dequant")
    qlora_path.release_dequant_scratch()
    yield
    qlora_path.release_dequant_scratch()


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("door", ["qlora", "nf4_linear"])
def test_the_scratch_holds_the_weight_in_the_inputs_dtype(dtype, door):
    N, K = 48, 64
    g = torch.Generator().manual_seed(0)
    w = quantize_nf4((torch.randn(N, K, generator=g) * 0.05).to(dtype))
    x = torch.randn(20, K, generator=g).to(dtype).requires_grad_()
    if door == "qlora":
        A, B = torch.randn(4, K, generator=g) * 0.1, torch.randn(N, 4, generator=g) * 0.1
        y = qlora_linear(x, w, None, A, B, 2.0, 0.0, backend="triton")
    else:
        y = nf4_linear(x, w, None, backend="triton")
    y.sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert {slot[1] for slot in qlora_path._SCRATCH} == {dtype}
    assert qlora_path.dequant_scratch_bytes() == N * K * 2
