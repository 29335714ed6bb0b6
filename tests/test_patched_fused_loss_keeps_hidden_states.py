"""The fused-loss forward of a patched model returns the hidden states asked for with output_hidden_states=True
(mutation PT11: hidden_states=None in causal_lm._output survived)."""
import torch

import fastft
from tests.utils import tiny_llama


def test_output_hidden_states_with_the_fused_loss():
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    ref_model = tiny_llama().train()
    ref = ref_model(ids, labels=ids, output_hidden_states=True)
    m = tiny_llama().train()
    fastft.patch_model(m, backend="torch")
    out = m(ids, labels=ids, output_hidden_states=True)
    assert out.logits is None  # the fused path
    assert out.hidden_states is not None and len(out.hidden_states) == len(ref.hidden_states)
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
