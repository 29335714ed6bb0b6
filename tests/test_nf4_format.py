"""NF4 format: bit-compatibility with bitsandbytes (CPU), the C++ host path, the NF4Weight value, bad inputs."""
import io

import pytest
import torch

from fastft.kernels import nf4_cpu
from fastft.quant import NF4Weight, quantize_nf4
from fastft.quant import nf4_format as fmt

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weights(shape, dtype):
    # Gaussian rows of different scales, an all-zero block and an outlier: every rounding branch is hit.
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3
    flat = x.view(-1)
    if flat.numel() > 200:
        flat[64:128] = 0
        flat[150] = 40.0
    return x.to(dtype)


def _bnb_quantize(x, blocksize, double_quant):
    packed, state = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return packed, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize,shape", [(64, (48, 128)), (32, (7, 96)), (128, (33, 256)), (4096, (3, 1000)),
                                             (256, (1, 4097))])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_and_values_match_bitsandbytes(dtype, blocksize, shape, double_quant):
    x = _weights(shape, dtype)
    w = quantize_nf4(x, blocksize=blocksize, double_quant=double_quant)
    packed, state = _bnb_quantize(x, blocksize, double_quant)
    assert torch.equal(w.packed, packed.view(-1))
    assert torch.equal(w.absmax, state.absmax)
    if double_quant:
        assert torch.equal(w.absmax2, state.state2.absmax)
        assert torch.equal(w.code2, state.state2.code)
        assert w.offset == state.offset.item()
    ref = bnbf.dequantize_4bit(packed, state)
    out = w.dequantize()
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, ref)


def test_without_the_extension_the_torch_path_matches(monkeypatch):
    monkeypatch.setattr(nf4_cpu, "_C", None)  # as if fastft._C were not built
    assert not nf4_cpu.available()
    x = _weights((40, 256), torch.bfloat16)
    w = quantize_nf4(x, blocksize=128)
    packed, state = _bnb_quantize(x, 128, True)
    assert torch.equal(w.packed, packed.view(-1)) and torch.equal(w.absmax, state.absmax)
    assert torch.equal(w.dequantize(), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("numel", [1, 7, 65])
def test_odd_numel_matches_bitsandbytes(numel):
    x = torch.randn(numel)
    w = quantize_nf4(x, blocksize=64, double_quant=True)
    packed, state = _bnb_quantize(x, 64, True)
    assert torch.equal(w.packed, packed.view(-1)) and torch.equal(w.absmax, state.absmax)
    assert torch.equal(w.dequantize(), fmt.dequantize_nf4_torch(packed.view(-1), fmt.dequantize_blockwise8_torch(
        state.absmax, state.state2.absmax, state.state2.code, state.offset.item()), numel, 64, torch.float32))


def test_dynamic_map_and_nested_quantizer_match_bitsandbytes():
    assert torch.equal(fmt.dynamic_code(), bnbf.create_dynamic_map())
    v = torch.randn(3 * 256 + 17) * 0.1
    q, absmax2 = fmt.quantize_blockwise8_torch(v)
    q_ref, state = bnbf.quantize_blockwise(v, blocksize=256)
    assert torch.equal(q, q_ref) and torch.equal(absmax2, state.absmax)


def test_dequantized_values_are_the_nf4_grid():
    x = torch.randn(16, 64, dtype=torch.float64)
    w = quantize_nf4(x.float(), blocksize=64, double_quant=False)
    out = w.dequantize().double()
    scale = x.abs().amax(dim=1, keepdim=True)
    code = torch.tensor(fmt.NF4_CODE_VALUES, dtype=torch.float64)
    nearest = code[(x / scale).unsqueeze(-1).sub(code).abs().argmin(-1)] * scale  # fp64 nearest-code reference
    assert (out - nearest).abs().max() <= 1e-6 * scale.max()


@pytest.mark.skipif(not nf4_cpu.available(), reason="fastft._C not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize,numel", [(64, 64 * 37), (32, 1001), (4096, 9000)])
def test_cpp_path_matches_torch_reference(dtype, blocksize, numel):
    x = _weights((numel,), dtype)
    packed, absmax = nf4_cpu.quantize(x, blocksize)
    packed_ref, absmax_ref = fmt.quantize_nf4_torch(x, blocksize)
    assert torch.equal(packed, packed_ref) and torch.equal(absmax, absmax_ref)
    for out_dtype in DTYPES:
        assert torch.equal(nf4_cpu.dequantize(packed, absmax, numel, blocksize, out_dtype),
                           fmt.dequantize_nf4_torch(packed, absmax, numel, blocksize, out_dtype))


@pytest.mark.skipif(not nf4_cpu.available(), reason="fastft._C not built")
def test_cpp_rounding_of_tiny_and_huge_values():
    # fp16 subnormals and values near the fp16 limit go through the C++ float conversions
    for scale in (1e-6, 3e-5, 6.0e4):
        x = torch.randn(4096) * scale
        packed, absmax = nf4_cpu.quantize(x, 64)
        for out_dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(nf4_cpu.dequantize(packed, absmax, 4096, 64, out_dtype),
                               fmt.dequantize_nf4_torch(packed, absmax, 4096, 64, out_dtype))


def test_weight_value_api():
    x = torch.randn(40, 96, dtype=torch.bfloat16)
    w = quantize_nf4(x)
    assert w.shape == (40, 96) and w.dtype == torch.bfloat16 and w.blocksize == 64 and w.double_quant
    assert w.packed.dtype == torch.uint8 and w.packed.numel() == 40 * 96 // 2
    assert w.numel() == 40 * 96 and w.ndim == 2 and w.size(1) == 96 and w.device.type == "cpu"
    blocks = 40 * 96 // 64
    assert w.nbytes == 40 * 96 // 2 + blocks + 4 * 1 + 4 * 16 + 4 * 256  # codes, 8-bit scales, nested, tables
    assert w.dequantize(torch.float32).dtype == torch.float32
    assert w.to("cpu") is w
    assert "NF4Weight" in repr(w)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_through_safetensors(double_quant):
    from safetensors.torch import load, save

    w = quantize_nf4(torch.randn(24, 64), blocksize=32, double_quant=double_quant)
    state = w.bnb_state_dict("layer.weight")
    expected = {"layer.weight", "layer.weight.absmax", "layer.weight.quant_map",
                "layer.weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        expected |= {"layer.weight.nested_absmax", "layer.weight.nested_quant_map"}
    assert set(state) == expected
    back = NF4Weight.from_bnb_state_dict(load(save(state)), "layer.weight")
    assert torch.equal(back.dequantize(), w.dequantize()) and back.blocksize == 32
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.equal(NF4Weight.from_bnb_state_dict(torch.load(buffer), "layer.weight").packed, w.packed)


def test_state_dict_matches_bitsandbytes_quant_state():
    x = torch.randn(32, 128)
    packed, state = _bnb_quantize(x, 64, True)
    ours = quantize_nf4(x).bnb_state_dict("w")
    theirs = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    theirs["w"] = packed
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    back = NF4Weight.from_bnb_state_dict(theirs, "w")
    assert torch.equal(back.dequantize(), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 64.0, True])
def test_bad_blocksize_is_named(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(8, 64), blocksize=blocksize)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    w = quantize_nf4(torch.randn(8, 64), double_quant=False)
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight(w.packed, w.absmax[:-1], w.shape, w.dtype, 64)
    with pytest.raises(ValueError, match="packed"):
        NF4Weight(w.packed[:-1], w.absmax, w.shape, w.dtype, 64)


@pytest.mark.parametrize("missing", ["w.absmax", "w.quant_map", "w.nested_absmax", "w.nested_quant_map",
                                     "w.quant_state.bitsandbytes__nf4", "w"])
def test_missing_checkpoint_key_is_named(missing):
    state = quantize_nf4(torch.randn(8, 64)).bnb_state_dict("w")
    del state[missing]
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        NF4Weight.from_bnb_state_dict(state, "w")


def test_fp4_checkpoint_is_refused():
    packed, state = bnbf.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    sd = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    sd["w"] = packed
    with pytest.raises(ValueError, match="nf4"):
        NF4Weight.from_bnb_state_dict(sd, "w")
