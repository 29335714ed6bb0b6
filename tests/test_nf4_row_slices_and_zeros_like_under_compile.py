"""torch.compile through two NF4Weight ops that failed to trace: a row slice that is not whole groups of nested
scales (un-nested: its scales decoded, which read the nested offset as a Python float — a data-dependent host read
under tracing) and zeros_like (it copied bitsandbytes' cached code table, a real tensor, inside fake mode)."""
import pytest
import torch

from fastft.quant import quantize_nf4
from fastft.quant.nf4_weight import NF4Weight


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("rows", [(0, 8), (8, 24), (40, 96)])
def test_an_un_nested_row_slice_traces_and_matches_eager(backend, rows):
    torch._dynamo.reset()
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(96, 128), blocksize=64, double_quant=True)
    w.nested_offset.add_(0.125)  # a nonzero offset, which the decoded scales must carry
    r0, r1 = rows

    def piece(w, x):
        return x @ w[r0:r1].dequantize(torch.float32).t()

    x = torch.randn(3, 128)
    want = piece(w, x)
    assert torch.equal(want, x @ w.dequantize(torch.float32)[r0:r1].t())
    assert torch.equal(torch.compile(piece, backend=backend, fullgraph=True)(w, x), want)


@pytest.mark.parametrize("double_quant", [False, True])
def test_zeros_like_traces(double_quant):
    torch._dynamo.reset()
    w = quantize_nf4(torch.randn(64, 96), blocksize=64, double_quant=double_quant)

    def zeros(w):
        return torch.zeros_like(w)

    z = torch.compile(zeros, backend="eager", fullgraph=True)(w)
    assert isinstance(z, NF4Weight) and z.shape == w.shape and z.double_quant == double_quant
    assert torch.equal(z.dequantize(torch.float32), torch.zeros(64, 96))
    eager = zeros(w)  # the cached code tables stayed real tensors
    assert torch.equal(eager.dequantize(torch.float32), torch.zeros(64, 96))
