"""Fixes from the review of fastft's methods on non-Llama families: prefix tuning places a padded row's real tokens
where the model itself (and peft) would — OPT counts positions over the attention mask, the Llama family (and
BioGPT, whose position embedding could read the mask but is handed positions) from the cache; the bottleneck adapter's wrapper exposes the wrapped layer's weight/bias (T5's MLP reads
`wo.weight`) and sizes transformers' Conv1D (GPT-2) by its `nf`."""
import copy

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from peft import PrefixTuningConfig

import fastft
from fastft.integration.methods.adapter import AdapterAfter, BottleneckAdapterConfig
from tests.methods_utils import copy_trainables, ids, perturb_trainables
from tests.utils import assert_close, cache_kwarg, tiny_llama

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _seeded(make):
    torch.manual_seed(0)
    return make().eval()


FAMILIES = {
    "llama": tiny_llama,
    "qwen2": lambda: _seeded(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**TINY, intermediate_size=96,
                                                                      num_key_value_heads=2))),
    "opt": lambda: _seeded(lambda: T.OPTForCausalLM(T.OPTConfig(**TINY, ffn_dim=96, word_embed_proj_dim=64,
                                                               dropout=0.0, attention_dropout=0.0))),
    "biogpt": lambda: _seeded(lambda: T.BioGptForCausalLM(T.BioGptConfig(
        **TINY, intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layerdrop=0.0))),
}


def _prefix_config():
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)


def _prefix_pair(family):
    ours = fastft.get_peft_model(FAMILIES[family](), _prefix_config())
    theirs = peft.get_peft_model(FAMILIES[family](), _prefix_config())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    return ours, theirs


def _padded(side, batch=2, seq=9, pad=3):
    """Random ids and a mask whose row 0 has `pad` pads on `side`."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad] = 0 if side == "left" else 1
    if side == "right":
        mask[0, -pad:] = 0
    return ids(batch=batch, seq=seq), mask


def _masked_step(model, batch, mask):
    """Logits at kept tokens and the trainable gradients of a loss on kept tokens predicted from kept tokens."""
    model.zero_grad(set_to_none=True)
    labels = batch.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    out = model(input_ids=batch, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach()[mask.bool()], grads


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "biogpt"])
def test_prefix_on_a_padded_batch_matches_peft(family, side):
    """OPT derives positions from the mask: fastft gave a left-padded row's real tokens P + pad + i (peft: P + i)."""
    ours, theirs = _prefix_pair(family)
    batch, mask = _padded(side)
    (got, got_grads), (want, want_grads) = _masked_step(ours, batch, mask), _masked_step(theirs, batch, mask)
    assert_close(got, want, torch.float32, f"{family} {side}-padded logits")
    assert set(got_grads) == set(want_grads) and got_grads
    for name in got_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, f"{family} {side}-padded grad {name}")


def test_prefix_left_padded_opt_row_equals_the_row_alone():
    family = "opt"
    ours, _ = _prefix_pair(family)
    ours.eval()
    batch, mask = _padded("left")
    with torch.no_grad():
        padded = ours(input_ids=batch, attention_mask=mask).logits[0, 3:]
        alone = ours(input_ids=batch[:1, 3:]).logits[0]
    assert_close(padded, alone, torch.float32, f"{family}: left-padded row vs the row alone")


def test_prefix_cached_forward_on_opt_counts_positions_over_the_mask():
    """Decoding with a cache and no position_ids: the mask covers the cached tokens too, positions continue from the
    row's kept tokens (cut to the new ones), as the whole forward."""
    ours, _ = _prefix_pair("opt")
    ours.eval()
    batch, mask = _padded("left")
    with torch.no_grad():
        whole = ours(input_ids=batch, attention_mask=mask).logits
        out = ours(input_ids=batch[:, :5], attention_mask=mask[:, :5], use_cache=True)
        parts, cache = [out.logits], out.past_key_values
        for t in range(5, 9):
            out = ours(input_ids=batch[:, t:t + 1], attention_mask=mask[:, :t + 1], **cache_kwarg(cache), use_cache=True)
            parts.append(out.logits)
    cached = torch.cat(parts, 1)
    assert_close(cached[mask.bool()], whole[mask.bool()], torch.float32, "OPT cached decoding with a prefix")


def test_prefix_on_gpt2_is_refused():
    gpt2 = _seeded(lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=64)))
    with pytest.raises(ValueError, match="self_attn modules carry layer_idx"):
        fastft.get_peft_model(gpt2, _prefix_config())


# --- bottleneck adapters -----------------------------------------------------------------------------------------

def _reference_adapters(reference, adapted):
    """Plain torch on a copy of the base model: a forward hook on each target adds h + up(relu(down(h))) with the
    adapted model's weights (leaf copies, for their gradients)."""
    params = {}
    for name, m in adapted.get_base_model().named_modules():
        if isinstance(m, AdapterAfter):
            w = params[name] = {k: p.detach().clone().requires_grad_() for k, p in m.adapter.named_parameters()}

            def hook(module, inputs, h, w=w):
                return h + F.linear(F.relu(F.linear(h, w["down.weight"], w["down.bias"])), w["up.weight"],
                                    w["up.bias"])

            reference.get_submodule(name).register_forward_hook(hook)
    return params


def _check_against_reference(base, config, n_adapters, inputs, generate_inputs):
    ours = fastft.get_peft_model(copy.deepcopy(base), config)
    assert sum(isinstance(m, AdapterAfter) for m in ours.modules()) == n_adapters
    with torch.no_grad():  # near identity at init
        assert_close(ours(**inputs).logits, base(**inputs).logits, torch.float32, "init")
    perturb_trainables(ours)
    reference = copy.deepcopy(base)
    params = _reference_adapters(reference, ours)
    out, ref = ours(**inputs), reference(**inputs)
    out.loss.backward()
    ref.loss.backward()
    assert_close(out.logits, ref.logits, torch.float32, "logits")
    for name, p in ours.get_base_model().named_parameters():
        if p.requires_grad:
            module, _, key = name.partition(".adapter.")
            assert_close(p.grad, params[module][key].grad, torch.float32, f"grad {name}")
    with torch.no_grad():
        got = ours.generate(**generate_inputs, max_new_tokens=5, do_sample=False)
        want = reference.generate(**generate_inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want), (got, want)
    return ours


def test_adapter_after_t5_mlp_output():
    """T5's MLP casts its input to `wo.weight.dtype`: the wrapper exposes the wrapped layer's weight and bias."""
    t5 = _seeded(lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)))
    config = BottleneckAdapterConfig(size=8, placement="houlsby", attn_output_modules=("SelfAttention.o",),
                                     mlp_output_modules=("DenseReluDense.wo",))
    source, target = ids(seed=1), ids(seq=5, seed=2)
    ours = _check_against_reference(t5, config, n_adapters=8, inputs=dict(input_ids=source, labels=target),
                                    generate_inputs=dict(input_ids=source))
    wo = ours.get_base_model().encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, AdapterAfter) and wo.weight is wo.base_layer.weight and wo.bias is None


def test_adapter_after_gpt2_conv1d(tmp_path):
    """GPT-2's output projections are transformers' Conv1D: their width is `nf`."""
    gpt2 = _seeded(lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                                         attn_pdrop=0.0)))
    config = BottleneckAdapterConfig(size=8, placement="houlsby", attn_output_modules=("attn.c_proj",),
                                     mlp_output_modules=("mlp.c_proj",))
    batch = ids()
    ours = _check_against_reference(gpt2, config, n_adapters=4, inputs=dict(input_ids=batch, labels=batch),
                                    generate_inputs=dict(input_ids=batch[:1]))
    proj = ours.get_base_model().transformer.h[0].mlp.c_proj
    assert proj.adapter.up.weight.shape == (64, 8) and proj.bias is proj.base_layer.bias
    fastft.save_adapter(ours, tmp_path / "adapter")
    loaded = fastft.load_adapter(copy.deepcopy(gpt2), tmp_path / "adapter")
    with torch.no_grad():
        assert_close(loaded(input_ids=batch).logits, ours(input_ids=batch).logits, torch.float32, "reloaded")


def test_adapter_on_a_layer_without_output_width_is_refused_by_name():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"target 'model.layers.0.mlp.act_fn' \(.*\) is not a linear layer"):
        fastft.get_peft_model(model, BottleneckAdapterConfig(mlp_output_modules=("act_fn",)))
    assert all(p.requires_grad for p in model.parameters()) and not any(
        isinstance(m, AdapterAfter) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
