"""The C++ host NF4 loops run their blocks in parallel (OpenMP; the extension shares torch's libgomp, so
torch.set_num_threads sets their thread count). The suite runs with one thread (scripts/test.sh sets
OMP_NUM_THREADS=1), where a block partition or per-block state shared between threads cannot show. Here the same
quantize / dequantize run with several threads over many blocks of very different scales, and every byte, absmax
and output must still be the torch reference's (a block count no thread count divides: no block is left out)."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="fastft._C not built")

BLOCK = 64


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_threads_give_the_reference_bytes(four_threads, dtype):
    g = torch.Generator().manual_seed(0)
    blocks = 4099                                        # not a multiple of the thread count
    scale = torch.logspace(-3, 3, blocks)[torch.randperm(blocks, generator=g)]      # neighbours differ widely
    x = (torch.randn(blocks, BLOCK, generator=g) * scale[:, None]).view(-1)[:-5].to(dtype)  # and a short tail
    packed_ref, absmax_ref = fmt.quantize_nf4_torch(x, BLOCK)
    want = fmt.dequantize_nf4_torch(packed_ref, absmax_ref, x.numel(), BLOCK, dtype)
    for _ in range(5):
        packed, absmax = nf4_cpu.quantize(x, BLOCK)
        assert torch.equal(absmax, absmax_ref) and torch.equal(packed, packed_ref)
        assert torch.equal(nf4_cpu.dequantize(packed, absmax, x.numel(), BLOCK, dtype), want)
