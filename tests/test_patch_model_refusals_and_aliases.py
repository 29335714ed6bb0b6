"""patch_model's refusals for a transformers version its table does not describe (attention that does not call
apply_rotary_pos_emb, an MLP keeping its activation under another name, a role with no module of the table's class):
each is refused by name with the model left as it was, never patched with the summary claiming fused layers. And what
it must accept: hidden_act "swish" (ACT2FN's SiLU) and a caller's ignore_index through the fused loss."""
import pytest
import torch
from transformers.models.llama import modeling_llama

import fastft
from tests.utils import tiny_llama


def _classes(model):
    return [type(m) for m in model.modules()]


def test_attention_that_does_not_call_rope_itself_is_refused(monkeypatch):
    original = modeling_llama.LlamaAttention.forward

    def forward(self, *args, **kwargs):  # RoPE now applied somewhere fastft's binding does not reach
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    model = tiny_llama()
    before = _classes(model)
    with pytest.raises(ValueError, match="LlamaAttention.forward does not call apply_rotary_pos_emb"):
        fastft.patch_model(model)
    assert _classes(model) == before and getattr(model, "_fastft_patch", None) is None


def test_mlp_keeping_its_activation_under_another_name_is_refused(monkeypatch):
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward",
                        lambda self, x: self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))
    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp.act = layer.mlp.act_fn
        del layer.mlp.act_fn
    before = _classes(model)
    with pytest.raises(ValueError, match=r"LlamaMLP keeps its activation under no name fastft knows \(act_fn, "
                                         r"activation_fn\)"):
        fastft.patch_model(model)
    assert _classes(model) == before and getattr(model, "_fastft_patch", None) is None


def test_a_role_with_no_module_of_the_tables_class_is_refused_untouched():
    class OwnFeedForward(torch.nn.Module):  # a user's own MLP: the table's LlamaMLP appears nowhere
        def __init__(self, hidden):
            super().__init__()
            self.proj = torch.nn.Linear(hidden, hidden)

        def forward(self, x):
            return self.proj(x)

    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp = OwnFeedForward(model.config.hidden_size)
    before = _classes(model)
    with pytest.raises(ValueError, match="found no LlamaMLP module to patch; nothing was changed"):
        fastft.patch_model(model)
    assert _classes(model) == before and getattr(model, "_fastft_patch", None) is None


def _loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _matches(got, want):
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6), (got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for name, grad in got[1].items():
        assert torch.allclose(grad, want[1][name], rtol=1e-4, atol=1e-6), name


def test_hidden_act_swish_is_silu_and_patched():
    ref = tiny_llama(hidden_act="swish").train()
    model = tiny_llama(hidden_act="swish").train()
    fastft.patch_model(model)
    assert model._fastft_patch.summary["glu_mlp"] == 2
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    _matches(_loss_and_grads(model, ids, ids), _loss_and_grads(ref, ids, ids))
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, atol=1e-5)


def test_a_callers_ignore_index_reaches_the_fused_loss():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :6] = -1  # this caller marks positions not trained with -1
    labels[1, 9:] = -1
    ref = tiny_llama().train()
    model = fastft.patch_model(tiny_llama().train())
    want = _loss_and_grads(ref, ids, labels, ignore_index=-1)
    got = _loss_and_grads(model, ids, labels, ignore_index=-1)
    _matches(got, want)
    # and -1 really was left out: every position counted gives another loss
    assert not torch.allclose(want[0], _loss_and_grads(ref, ids, ids)[0])
