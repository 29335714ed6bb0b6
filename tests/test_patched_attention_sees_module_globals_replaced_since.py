"""The RoPE binding's copy of a modeling module's globals was made once per process (the first patch_model): a
global replaced afterwards — another library's or a test's wrapper of eager_attention_forward — was called by
unpatched models but never by patched ones, even those patched after the change. The copy is refreshed at every
patch."""
import torch
import transformers.models.llama.modeling_llama as modeling_llama

import fastft
from tests.utils import tiny_llama


def test_a_model_patched_after_a_global_was_replaced_calls_the_replacement(monkeypatch):
    fastft.patch_model(tiny_llama(), attention=False)  # the shadow copy exists before the change
    calls = []
    original = modeling_llama.eager_attention_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", counted)
    model = tiny_llama()
    model.set_attn_implementation("eager")
    fastft.patch_model(model, attention=False)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 6)))
    assert len(calls) == model.config.num_hidden_layers
