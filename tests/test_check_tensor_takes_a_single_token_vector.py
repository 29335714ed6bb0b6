"""check_tensor(dim=1) accepts a 1-D input (one token, (features,)), as torch's F.linear and F.rms_norm do: ia3_linear
and rms_norm take it. Mutation run 18: the check as dim > 1 refused it, and no test failed. Against plain torch."""
import torch
import torch.nn.functional as F

from fastft.ops.ia3 import ia3_linear
from fastft.ops.rms_norm import rms_norm


def test_a_single_token_vector_is_accepted():
    g = torch.Generator().manual_seed(0)
    x, W, ia3_l, w = (torch.randn(8, generator=g), torch.randn(6, 8, generator=g), torch.rand(6, generator=g),
                      torch.randn(8, generator=g))
    torch.testing.assert_close(ia3_linear(x, W, None, ia3_l, feedforward=False, backend="torch"), F.linear(x, W) * ia3_l)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, backend="torch"), F.rms_norm(x, (8,), w, 1e-6))
