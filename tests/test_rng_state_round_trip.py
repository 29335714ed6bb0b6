"""A checkpoint's RNG state restores every generator it holds (the module's docstring: "every RNG of every
process"): python's, numpy's and torch's CPU generator each continue where they were saved."""
import random

import numpy as np
import torch

from fastft.apps.training.checkpoints import rng_state, set_rng_state


def _draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1))


def test_set_rng_state_restores_python_numpy_and_torch():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian (has_gauss) in numpy's state
    state = rng_state()
    want = _draws()
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    _draws()
    set_rng_state(state)
    assert _draws() == want  # (python, numpy uniform, numpy's cached gaussian, torch)
