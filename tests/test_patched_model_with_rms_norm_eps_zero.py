"""A config with rms_norm_eps=0 (transformers runs it): patch_model accepted it, then every forward raised
"`eps` must be a positive number". eps = 0 is taken (a zero row gives NaN in both, as in transformers)."""
import copy

import pytest
import torch

import fastft
from fastft.ops import rms_norm
from fastft.ops.rms_norm import rms_norm_reference
from tests.utils import interpreter_only, tiny_llama


def test_a_patched_model_with_eps_zero_matches_the_unpatched_one():
    model = tiny_llama(rms_norm_eps=0.0).train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    patched = fastft.patch_model(copy.deepcopy(model))
    want, got = model(input_ids=ids, labels=ids).loss, patched(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_rms_norm_with_eps_zero_against_fp64(backend):
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(24, generator=torch.Generator().manual_seed(2))
    y = rms_norm(x, w, 0.0, backend=backend)
    (dx,) = torch.autograd.grad(y.sum(), x)
    xd = x.detach().double().requires_grad_()
    y64 = rms_norm_reference(xd, w.double(), 0.0)
    (dx64,) = torch.autograd.grad(y64.sum(), xd)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-4, atol=1e-4)
