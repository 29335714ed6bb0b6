"""Property-based fuzzing of NF4 quantization (`quantize_nf4`) and dequantization (`NF4Weight.dequantize`,
`dequantize_rows`) on every backend — C++ (CPU), torch, Triton (dequantize) — against references written here
from the format's definition (references.NF4_TABLE, the QLoRA paper's code values; nf4_dequantize_f64).

Quantization is checked by property, not against a copy of the algorithm: each block's absmax is max|x| of the
block (exact: a max of fp32 values); each element's code is a nearest NF4 value of x/absmax (ties and values
within fp32 rounding of a midpoint may go either way); with double quantization each stored 8-bit code is one
of the two codes of the nested table that bracket its target (absmax − offset)/absmax2, give or take the half
bin of bitsandbytes' rounding table, and absmax2 is the nested block's max |absmax − offset|. Dequantization is
compared with the fp64 value of the stored fields.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastft.kernels import nf4_cpu
from fastft.quant import nf4_format as fmt
from fastft.quant.nf4_weight import NF4Weight, quantize_nf4
from tests.fuzz import references as ref
from tests.fuzz.strategies import dim, float_dtypes, fuzz, tensor
from tests.utils import interpreter_only

U32 = ref.UNIT_ROUNDOFF[torch.float32]
QUANT_BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not nf4_cpu.available(), reason="no C++ build")),
                  "torch"]
DEQUANT_BACKENDS = QUANT_BACKENDS + [pytest.param("triton", marks=interpreter_only)]


def _draw_weight(data):
    dtype = data.draw(float_dtypes(), label="dtype")
    blocksize = data.draw(st.sampled_from([32, 64, 128, 256]), label="blocksize")
    shape = data.draw(st.sampled_from([(dim(data, 1, 40, label="rows"), dim(data, 1, 70, label="cols")),
                                       (dim(data, 1, 300, label="numel"),)]), label="shape")
    scale = data.draw(st.sampled_from([1.0, 1e-3, 300.0]), label="scale")
    x = tensor(data, shape, dtype, scale=scale, label="x")
    if data.draw(st.booleans(), label="zero block"):  # an all-zero block: absmax 0, every code the zero code
        keep = torch.ones(x.numel(), dtype=dtype)
        keep[:blocksize] = 0
        x = x * keep.view(x.shape)
    return x, dtype, blocksize


def _quantize(x, blocksize, backend):
    if backend == "cpp":
        return nf4_cpu.quantize(x.contiguous(), blocksize)
    return fmt.quantize_nf4_torch(x, blocksize)


def _codes(packed, n):
    p = packed.to(torch.int64)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
@fuzz(12)
@given(data=st.data())
def test_quantize_nf4_properties(data, backend):
    x, dtype, blocksize = _draw_weight(data)
    n = x.numel()
    packed, absmax = _quantize(x, blocksize, backend)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    nb = fmt.num_blocks(n, blocksize)
    flat = torch.zeros(nb * blocksize, dtype=torch.float64)
    flat[:n] = x.detach().double().reshape(-1)
    blocks = flat.view(nb, blocksize)
    want_absmax = blocks.abs().amax(1)
    if n % blocksize:  # bitsandbytes stores a ragged last block's absmax clamped to fp32(1e-38)
        want_absmax[-1] = want_absmax[-1].clamp(min=float(torch.tensor(1e-38, dtype=torch.float32)))
    assert torch.equal(absmax.double(), want_absmax), "absmax must be each block's max |x| (exact)"

    table = torch.tensor(ref.NF4_TABLE, dtype=torch.float64)
    scaled = (blocks / torch.where(want_absmax == 0, 1.0, want_absmax)[:, None]).reshape(-1)[:n]
    dist = (scaled[:, None] - table[None, :]).abs()
    got = _codes(packed, n)
    best = dist.min(1).values
    # x/absmax is formed in fp32 (≤ 2 roundings of |scaled| ≤ 1): a code within that of the nearest is right
    ok = dist.gather(1, got[:, None]).squeeze(1) <= best + 4 * U32
    bad = (~ok).nonzero()
    assert bad.numel() == 0, (f"{backend}: element {int(bad[0])} of x/absmax = {float(scaled[bad[0]]):.8f} got "
                              f"code {int(got[bad[0]])} ({float(table[got[bad[0]]]):.8f}), nearest is "
                              f"{float(table[dist[bad[0]].argmin()]):.8f}")
    ref.count_example(f"quantize_nf4[{backend}]")


@fuzz(12)
@given(data=st.data())
def test_double_quant_properties(data):
    x, dtype, blocksize = _draw_weight(data)
    qweight = quantize_nf4(x, blocksize, double_quant=True)
    _, absmax = _quantize(x, blocksize, "torch")
    q, absmax2, code2 = qweight.absmax.to(torch.int64), qweight.absmax2.double(), qweight.code2.double()
    offset = float(qweight.offset)
    target = absmax.double() - offset
    nbs = qweight.nested_blocksize
    groups = torch.arange(target.numel()) // nbs
    want_absmax2 = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).scatter_reduce(
        0, groups, target.abs(), "amax")
    # absmax − offset and its max are fp32 values: one rounding each way
    assert torch.allclose(absmax2, want_absmax2, rtol=2 * U32, atol=0), "absmax2 must be each group's max |absmax − mean|"
    t = target / torch.where(absmax2 == 0, 1.0, absmax2)[groups]
    sorted_code, _ = code2.sort()
    # bitsandbytes' host quantizer, which the format follows byte for byte, rounds t to one of 65536 bins over
    # [-1, 1] first (half a bin: 1/65535), then to the code nearest that bin; near 0 the map's codes are closer
    # together than the bins (fuzz: t = 0 stored as the code 2.1e-5, as bitsandbytes stores it)
    half_bin = 1.0 / 65535
    hi = torch.searchsorted(sorted_code, (t + half_bin).clamp(-1, 1)).clamp(max=code2.numel() - 1)
    lo = (torch.searchsorted(sorted_code, (t - half_bin).clamp(-1, 1)) - 1).clamp(min=0)
    got = code2[q]
    slack = 4 * U32
    ok = (got >= sorted_code[lo] - slack) & (got <= sorted_code[hi] + slack)
    ok |= absmax2[groups] == 0
    bad = (~ok).nonzero()
    assert bad.numel() == 0, (f"nested code {float(got[bad[0]]):.6f} does not bracket its target "
                              f"{float(t[bad[0]]):.6f}")
    ref.count_example("quantize_nf4[double quant]")


def _dequantize(qweight: NF4Weight, dtype, backend, config=None):
    n = qweight.numel()
    if backend == "triton":
        from fastft.kernels.nf4_dequant import nf4_dequantize

        nested = qweight.double_quant
        return nf4_dequantize(qweight.packed, qweight.absmax, n, qweight.blocksize, dtype, qweight.code,
                              absmax2=qweight.absmax2 if nested else None, code2=qweight.code2 if nested else None,
                              offset=float(qweight.offset) if nested else 0.0,
                              nested_blocksize=qweight.nested_blocksize, config=config).view(qweight.shape)
    scales = qweight.absmax if not qweight.double_quant else fmt.dequantize_blockwise8_torch(
        qweight.absmax, qweight.absmax2, qweight.code2, qweight.offset, qweight.nested_blocksize)
    if backend == "cpp":
        return nf4_cpu.dequantize(qweight.packed, scales, n, qweight.blocksize, dtype).view(qweight.shape)
    return fmt.dequantize_nf4_torch(qweight.packed, scales, n, qweight.blocksize, dtype).view(qweight.shape)


@pytest.mark.parametrize("backend", DEQUANT_BACKENDS)
@fuzz(12)
@given(data=st.data())
def test_dequantize_nf4(data, backend):
    x, dtype, blocksize = _draw_weight(data)
    out_dtype = data.draw(float_dtypes(), label="out dtype")
    qweight = quantize_nf4(x, blocksize, double_quant=data.draw(st.booleans(), label="double quant"))
    W, W_mag = ref.nf4_dequantize_f64(qweight)
    config = None  # Triton: the tuner's pick, or one config forced, the candidates' too (nf4_dequant)
    if backend == "triton":
        from fastft.kernels import nf4_dequant

        config = data.draw(st.sampled_from([None, *nf4_dequant._configs(), *nf4_dequant.candidate_configs()]),
                           label="config")
    out = _dequantize(qweight, out_dtype, backend, config)
    assert out.dtype == out_dtype and tuple(out.shape) == tuple(x.shape)
    # fp32: the nested scale's product and sum (2 roundings, relative to its magnitude), code·absmax (1); then one
    # rounding to out_dtype
    ref.check("nf4_dequantize", backend, out, W, W_mag, out_dtype, 1, (), extra_rel=3 * U32)
    if backend == "cpp" and len(qweight.shape) == 2:  # the public method and a row range agree with it exactly
        assert torch.equal(qweight.dequantize(out_dtype), out)
        rows = qweight.shape[0]
        start = data.draw(st.integers(0, rows), label="start")
        stop = data.draw(st.integers(start, rows), label="stop")
        assert torch.equal(qweight.dequantize_rows(start, stop, out_dtype), out[start:stop])
    ref.count_example(f"nf4_dequantize[{backend}]")


@pytest.mark.gpu
@fuzz(20)
@given(data=st.data())
def test_nf4_quant_roundtrip_gpu(data):
    """On the GPU: quantize_nf4 (torch on CUDA) matches the CPU quantizer bit for bit (codes and absmax), and
    dequantize (the Triton kernel) is within one rounding of the fp64 value, at sizes of many kernel blocks."""
    dtype = data.draw(float_dtypes(), label="dtype")
    blocksize = data.draw(st.sampled_from([64, 128, 256]), label="blocksize")
    shape = (dim(data, 1, 700, label="rows"), dim(data, 1, 900, label="cols"))
    x = tensor(data, shape, dtype, label="x")
    double = data.draw(st.booleans(), label="double quant")
    plain_gpu, plain_cpu = quantize_nf4(x.cuda(), blocksize, False), quantize_nf4(x, blocksize, False)
    assert torch.equal(plain_gpu.packed.cpu(), plain_cpu.packed) and torch.equal(plain_gpu.absmax.cpu(),
                                                                                 plain_cpu.absmax)
    q_gpu = quantize_nf4(x.cuda(), blocksize, double)  # the nested mean is a GPU reduction: not bit-compared
    out_dtype = data.draw(float_dtypes(), label="out dtype")
    W, W_mag = ref.nf4_dequantize_f64(q_gpu)
    ref.check("nf4_dequantize", "cuda", q_gpu.dequantize(out_dtype), W, W_mag, out_dtype, 1, (), extra_rel=3 * U32)
    ref.count_example("nf4_dequantize[cuda]")
