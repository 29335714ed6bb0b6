"""An NF4Weight held as a plain attribute (not a registered Parameter) by two modules is one stored weight:
parameter_counts counts it once."""
import torch
from torch import nn

from fastft.integration.parameter_count import parameter_counts
from fastft.quant.nf4_weight import quantize_nf4


def test_plain_nf4_weight_shared_by_two_modules_counts_once():
    w = quantize_nf4(torch.randn(16, 64))
    model = nn.Sequential(nn.Module(), nn.Module(), nn.Linear(4, 3))
    model[0].weight = w  # plain attributes: not in model.parameters()
    model[1].weight = w
    assert "weight" in vars(model[0]) and "weight" in vars(model[1])
    trainable, total = parameter_counts(model)
    assert trainable == 4 * 3 + 3
    assert total == 4 * 3 + 3 + 16 * 64
