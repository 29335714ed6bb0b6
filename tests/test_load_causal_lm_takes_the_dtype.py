"""load_causal_lm loads in the dtype asked for (`fastft bench --dtype bf16` goes through it), fp32 by default
(mutation MO3: the dtype argument ignored survived)."""
import torch

from fastft.apps.models import load_causal_lm


def test_dtype_reaches_the_weights():
    model, _ = load_causal_lm(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_causal_lm()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
