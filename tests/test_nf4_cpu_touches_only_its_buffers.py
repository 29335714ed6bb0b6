"""The C++ host NF4 loops (csrc/nf4_cpu.cpp) take raw pointers and trust `n`: they must read exactly n inputs and
write exactly (n + 1) // 2 packed bytes, ceil(n / blocksize) absmax values and n outputs. An odd n is the edge: the
last byte is half filled (its low nibble the zero code, whatever lies after x in memory) and the last output has no
partner. Pinned here with the tensors cut out of larger buffers, so one element too many would be read from, or
written over, a neighbour set to a loud value (an out-of-bounds access of one element is otherwise silent)."""
import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt

pytestmark = pytest.mark.skipif(not nf4_cpu.available(), reason="fastft._C not built")

BLOCK = 64
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [BLOCK + 3, 2 * BLOCK + 1, 5])
def test_an_odd_numel_reads_no_value_past_its_end(dtype, numel):
    buffer = torch.randn(numel + 1, generator=torch.Generator().manual_seed(0)).to(dtype)
    buffer[numel] = 1000.0                                  # the neighbour after x: code 15, were it read
    x = buffer[:numel]                                      # contiguous: its data_ptr goes to C++ as it is
    packed, absmax = nf4_cpu.quantize(x, BLOCK)
    packed_ref, absmax_ref = fmt.quantize_nf4_torch(x, BLOCK)
    assert packed[-1] & 0xF == fmt.NF4_ZERO_CODE
    assert torch.equal(packed, packed_ref) and torch.equal(absmax, absmax_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [BLOCK + 3, 2 * BLOCK + 1, 5, 2 * BLOCK])
def test_writes_stop_at_the_last_value(dtype, numel):
    sentinel = -7.0
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    blocks = fmt.num_blocks(numel, BLOCK)
    nbytes = (numel + 1) // 2
    packed = torch.full((nbytes + 8,), 0xAB, dtype=torch.uint8)
    absmax = torch.full((blocks + 2,), sentinel)
    nf4_cpu._C.nf4_quantize_cpu(x.data_ptr(), 0, numel, BLOCK, packed.data_ptr(), absmax.data_ptr())
    assert packed[nbytes:].tolist() == [0xAB] * 8 and absmax[blocks:].tolist() == [sentinel] * 2
    packed_ref, absmax_ref = fmt.quantize_nf4_torch(x, BLOCK)
    assert torch.equal(packed[:nbytes], packed_ref) and torch.equal(absmax[:blocks], absmax_ref)

    out = torch.full((numel + 4,), sentinel, dtype=dtype)
    nf4_cpu._C.nf4_dequantize_cpu(packed.data_ptr(), absmax.data_ptr(), numel, BLOCK, out.data_ptr(),
                                  DTYPE_CODES[dtype])
    assert out[numel:].tolist() == [sentinel] * 4
    assert torch.equal(out[:numel], fmt.dequantize_nf4_torch(packed_ref, absmax_ref, numel, BLOCK, dtype))
