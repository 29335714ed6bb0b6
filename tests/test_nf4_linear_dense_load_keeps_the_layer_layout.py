"""A dense checkpoint loaded into an NF4Linear is quantized with the layer's own blocksize and double_quant
(a double_quant=False layer stays so), bit for bit quantize_nf4 of the dense weight."""
import torch
from torch import nn

from fastft.modules.nf4_linear import NF4Linear
from fastft.quant import quantize_nf4


def test_dense_checkpoint_is_quantized_with_the_layers_settings():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32), blocksize=128, double_quant=False)
    dense = torch.randn(32, 64)
    layer.load_state_dict({"weight": dense, "bias": torch.zeros(32)})
    w = layer.weight
    assert (w.blocksize, w.double_quant) == (128, False)
    want = quantize_nf4(dense, blocksize=128, double_quant=False)
    assert torch.equal(w.packed, want.packed) and torch.equal(w.absmax, want.absmax)
