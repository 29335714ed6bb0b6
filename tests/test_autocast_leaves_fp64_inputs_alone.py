"""autocast_inputs leaves fp64 tensors alone under torch.autocast, as torch's own ops do (fp64 is not
autocast-eligible): an fp64 LoRA layer stays fp64 instead of being rounded to bf16. Mutation run 18: casting every
float tensor failed no test. Against plain torch."""
import torch
import torch.nn.functional as F

from fastft.ops.lora import lora_linear


def test_fp64_inputs_stay_fp64_under_autocast():
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    A, B = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    want = F.linear(x, W) + 0.5 * F.linear(F.linear(x, A), B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, W).dtype == torch.float64  # torch's own rule
        got = lora_linear(x, W, None, A, B, 0.5, backend="torch")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
