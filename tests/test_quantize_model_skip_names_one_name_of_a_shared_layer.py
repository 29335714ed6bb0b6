"""quantize_model gives a layer registered under two names one NF4Linear at both; a `skip` entry (or a default_skip
name) matching only one of its names left that name holding the dense layer whose weight the walk then dropped
(`linear.weight = None`): its forward failed (linear(): weight must be Tensor, not NoneType). Found by the
seventeenth mutation run; the layer is now kept dense at every name."""
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


def test_a_skip_matching_one_name_of_a_shared_layer_keeps_it_dense_at_both():
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    fastft.quantize_model(model, "nf4", skip=["mix"])
    assert model.mix is model.mix_again and type(model.mix) is nn.Linear and model.mix.weight is not None
    with torch.no_grad():
        assert torch.equal(model(x), expected)
