"""The fused linear losses take a bias of any float dtype (HeadArgs.validate casts it to hidden's dtype, as the
reference's F.linear needs): an fp32 bias beside bf16 hidden states and weight (a head whose bias was kept in fp32)
gives the reference's loss, on a dense head, not torch.addmm's dtype error."""
import pytest
import torch

from fastft.ops import linear_cross_entropy, linear_cross_entropy_reference
from tests.utils import INTERPRET

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_fp32_bias_beside_bf16_hidden(backend):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 32, generator=g).bfloat16()
    W = (torch.randn(48, 32, generator=g) / 4).bfloat16()
    b = torch.randn(48, generator=g) * 3
    labels = torch.randint(0, 48, (6,), generator=g)
    got = linear_cross_entropy(h, W, labels, bias=b, backend=backend)
    ref = linear_cross_entropy_reference(h.double(), W.double(), labels, bias=b.bfloat16().double())
    assert abs(float(got) - float(ref)) < 2e-3
