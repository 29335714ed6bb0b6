"""The host checks that choose a kernel's addressing, at their edges: `wide_offsets` (int64 offsets once the largest
element offset reaches 2**31, the first one int32 cannot hold) and `tma_compatible` (a descriptor needs a 16-byte
aligned base and a row stride of a multiple of 16 *bytes*, whatever the element size). Only shapes and strides are
read, so the 2**31-element views live on the meta device and cost nothing."""
import torch

from fastft.kernels.runtime import tma_compatible, wide_offsets

INT32_MAX = 2**31 - 1


def _meta(shape, stride, dtype=torch.float16):
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def test_wide_offsets_starts_at_the_first_offset_int32_cannot_hold():
    # two rows: the second row's first element sits at offset `stride`
    assert not wide_offsets(_meta((2, 1), (INT32_MAX, 1)))      # 2**31 - 1: still an int32
    assert wide_offsets(_meta((2, 1), (INT32_MAX + 1, 1)))      # 2**31: wraps in int32
    # the offset sums every dim's (size - 1) * stride: two dims each below the edge reach it together
    assert wide_offsets(_meta((2, 2), (2**30, 2**30)))
    assert not wide_offsets(_meta((1, 2**20), (2**40, 1)))      # a size-1 dim's stride is never multiplied
    assert wide_offsets(_meta((1, 1), (1, 1)), _meta((2, 1), (2**31, 1)))  # any of the tensors


def test_tma_compatible_needs_an_aligned_base():
    base = torch.zeros(4, 64, dtype=torch.float16)
    assert tma_compatible(base)
    shifted = base.view(-1)[1:1 + 3 * 64].view(3, 64)          # 2 bytes past a 16-byte boundary
    assert shifted.data_ptr() % 16 != 0 and shifted.stride() == (64, 1)
    assert not tma_compatible(shifted)
    aligned = base.view(-1)[8:8 + 3 * 64].view(3, 64)          # 8 fp16 = 16 bytes: aligned again
    assert tma_compatible(aligned)


def test_tma_compatible_counts_the_row_stride_in_bytes():
    # 4 fp32 = 16 bytes: a descriptor can step rows of it although 4 elements is no multiple of 16
    assert tma_compatible(torch.zeros(8, 4, dtype=torch.float32))
    assert tma_compatible(torch.zeros(8, 8, dtype=torch.float16))   # 8 fp16 = 16 bytes
    assert not tma_compatible(torch.zeros(8, 4, dtype=torch.float16))  # 8 bytes
    assert not tma_compatible(torch.zeros(8, 12, dtype=torch.float16))  # 24 bytes
    assert not tma_compatible(torch.zeros(8, 8, dtype=torch.float16).t())  # last stride 8, not 1
    assert not tma_compatible(torch.zeros(2, 8, 8, dtype=torch.float16))   # 3-D


def test_descriptors_leave_expanded_rows_to_the_pointer_loads():
    """A zero stride over a dimension of size > 1 (`expand`) is never given to a descriptor: the interpreter's
    emulation reads through pointers and cannot show what TMA does with one (an attention fuzz question,
    2026-12-06). A size-1 dimension's stride is never stepped: any stride is fine there."""
    from fastft.kernels.attention import tma_eligible

    row = torch.zeros(1, 64, dtype=torch.float16)
    assert tma_compatible(row) and tma_compatible(row.expand(1, 64))
    assert not tma_compatible(row.expand(8, 64))
    q = torch.zeros(2, 16, 4, 64, dtype=torch.float16)  # (batch, tokens, heads, D)
    assert tma_eligible(64, q, q, q)
    assert not tma_eligible(64, q, q[:, :1].expand(2, 16, 4, 64), q)  # one token's keys for all
    assert not tma_eligible(64, q, q[:, :, :1].expand(2, 16, 4, 64), q)  # one KV head expanded over four
    assert tma_eligible(64, q, q[:1], q[:1])  # batch of 1: its stride is never stepped
