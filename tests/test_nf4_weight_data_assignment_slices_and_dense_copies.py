"""Three NF4Weight operations that went wrong silently or with a stray error:
- `layer.weight.data = x` swapped only the tensor's shape (torch's set_data), not the codes and scales the weight's
  Python fields hold: the layer kept computing with the old weight (99 off), a dense x was dropped, another shape
  left the old bytes under the new shape. x's values are now written into the weight; another shape is refused.
- a row slice of a double-quantized weight that does not hold whole groups of nested scales shared the weight's codes
  but copied its scales: after a write into the weight (copy_, load_state_dict) it read the new codes under the old
  scales (5 off both the old rows and the new). It is a copy of both.
- dense.copy_(nf4) and dense[:n] = nf4 (transformers' resize of a head) raised "'Tensor' object has no attribute
  'double_quant'"; they write the dequantized values."""
import pytest
import torch
from torch import nn

from fastft.modules.nf4_linear import NF4Linear
from fastft.quant import quantize_nf4


def _layer():
    torch.manual_seed(0)
    return NF4Linear.from_linear(nn.Linear(128, 40, bias=False))


def test_data_assignment_writes_the_values_into_the_weight():
    layer, x = _layer(), torch.randn(3, 128)
    new = quantize_nf4(torch.randn(40, 128) * 3)
    layer.weight.data = new
    assert torch.equal(layer.weight.dequantize(), new.dequantize())
    torch.testing.assert_close(layer(x), x @ new.dequantize().t())
    dense = torch.randn(40, 128)
    layer.weight.data = dense  # quantized in the weight's own layout
    assert torch.equal(layer.weight.dequantize(), quantize_nf4(dense).dequantize())
    with pytest.raises(ValueError, match=r"NF4Weight.data = NF4Weight of shape \(20, 64\): expected .* \(40, 128\)"):
        layer.weight.data = quantize_nf4(torch.randn(20, 64))
    assert layer.weight.dequantize().shape == (40, 128) and layer.weight.packed.numel() == 40 * 128 // 2


def test_an_un_nested_slice_does_not_mix_later_codes_with_its_scales():
    torch.manual_seed(1)
    w = quantize_nf4(torch.randn(40, 128))
    part = w[2:4]  # 4 blocks of 64: not a whole group of 256 nested scales
    before = part.dequantize().clone()
    w.copy_(quantize_nf4(torch.randn(40, 128) * 4))
    assert torch.equal(part.dequantize(), before)  # a copy: the rows as they were when sliced
    assert torch.equal(w[2:4].dequantize(), w.dequantize()[2:4])  # sliced again: the new rows


def test_a_dense_tensor_takes_an_nf4_weight_s_values():
    w = quantize_nf4(torch.randn(40, 128))
    dense = torch.empty(40, 128)
    dense.copy_(w)
    assert torch.equal(dense, w.dequantize())
    bigger = torch.zeros(48, 128, dtype=torch.bfloat16)
    bigger[:40] = w
    assert torch.equal(bigger[:40], w.dequantize(torch.bfloat16)) and not bigger[40:].any()
    linear = nn.Linear(128, 40, bias=False)
    linear.load_state_dict({"weight": w})
    assert torch.equal(linear.weight.detach(), w.dequantize())


def test_accelerate_offload_of_an_nf4_layer_says_it_is_not_taken():
    """accelerate's cpu/disk offload rebuilds each parameter as type(param)(value, requires_grad=...): an NF4Weight
    raised "unexpected keyword argument 'requires_grad'"; it now says offload is not taken and what to do."""
    import accelerate

    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(128, 64)), nn.ReLU())
    with pytest.raises(TypeError, match=r"do not take accelerate's cpu/disk offload; keep them on the execution"):
        accelerate.cpu_offload(model, execution_device="cpu")
        model(torch.randn(2, 128))
