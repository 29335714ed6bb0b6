"""bottleneck_adapter refuses a bias of the wrong shape: a (1,) bias broadcasts silently on the torch path (one
value added to every unit) and on the Triton path a (1,) down_bias is zero-padded to the rank (only unit 0 gets it)
and a short up_bias is read past its end. Nothing tested the shape check."""
import pytest
import torch

from fastft.ops.bottleneck_adapter import bottleneck_adapter
from tests.utils import interpreter_only


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
@pytest.mark.parametrize("which", ["down_bias", "up_bias"])
def test_a_broadcastable_bias_of_the_wrong_shape_is_refused(backend, which):
    N, r = 16, 4
    h = torch.randn(3, N)
    D, U = torch.randn(r, N), torch.randn(N, r)
    biases = {"down_bias": torch.randn(r), "up_bias": torch.randn(N)}
    biases[which] = torch.randn(1)
    with pytest.raises(ValueError, match=which):
        bottleneck_adapter(h, D, biases["down_bias"], U, biases["up_bias"], "relu", backend=backend)
