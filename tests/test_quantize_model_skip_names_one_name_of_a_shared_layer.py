"""KNOWN BUG (xfail, found by the seventeenth mutation run): quantize_model gives a layer registered under two names
one NF4Linear at both, but a `skip` entry (or a default_skip name) that matches only one of its names leaves that
name holding the dense layer whose weight the walk then drops (`linear.weight = None`): the forward through the
skipped name fails (linear(): weight must be Tensor, not NoneType), and the layer is NF4 under one name and
weightless under the other. Strict: passes once fixed (the layer kept dense at every name, or NF4 at every name)."""
import pytest
import torch
from torch import nn

import fastft


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(64, 64)
        self.mix_again = self.mix

    def forward(self, x):
        return self.mix_again(self.mix(x))


@pytest.mark.xfail(strict=True, reason="a skip naming one name of a shared layer leaves it weightless there")
def test_a_skip_matching_one_name_of_a_shared_layer_keeps_one_layer():
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    fastft.quantize_model(model, "nf4", skip=["mix"])
    assert model.mix is model.mix_again
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected.shape and torch.isfinite(out).all()
