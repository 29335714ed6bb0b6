"""Bottleneck adapters (Houlsby / Pfeiffer): the fused op (Triton through the interpreter) against an fp64
reference, the model against a plain-torch reference module (forward hooks adding h + up(act(down(h)))), the
near-identity init, safetensors + JSON save/load, and config errors naming the field."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

import fastft
from fastft.integration.methods import MethodOptions, apply_method
from fastft.integration.methods.adapter import AdapterAfter, BottleneckAdapterConfig, BottleneckAdapterModel
from fastft.ops.bottleneck_adapter import ACTIVATIONS, bottleneck_adapter, bottleneck_adapter_reference
from tests.methods_utils import ids, perturb_trainables
from tests.utils import INTERPRET, assert_close, interpreter_only, tiny_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@interpreter_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_op_forward_and_grads(dtype, activation):
    rng = random.Random(10 * DTYPES.index(dtype) + ACTIVATIONS.index(activation))
    M, N, r = rng.choice([1, 7, 37, 70]), rng.choice([16, 33, 64]), rng.choice([3, 8, 17])
    h = torch.randn(2, M, N).to(dtype)
    if activation == "tanh":
        h = h.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous leading dims
    h.requires_grad_()
    D, bd = (torch.randn(r, N) * 0.3).requires_grad_(), (torch.randn(r) * 0.1).requires_grad_()
    U, bu = (torch.randn(N, r) * 0.3).requires_grad_(), (torch.randn(N) * 0.1).requires_grad_()
    y = bottleneck_adapter(h, D, bd, U, bu, activation, backend="triton")
    assert y.dtype == dtype and y.shape == h.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    # fp64 reference on the operands the kernels see (adapter weights rounded to h's dtype): relu' is a step, so
    # unrounded weights would flip units whose pre-activation is within rounding of 0
    leaves = {k: v.detach().to(dtype).double().requires_grad_() for k, v in dict(h=h, D=D, bd=bd, U=U, bu=bu).items()}
    ref = bottleneck_adapter_reference(leaves["h"], leaves["D"], leaves["bd"], leaves["U"], leaves["bu"], activation)
    ref.backward(dy.double())
    assert_close(y, ref, dtype, "y")
    for name, t in dict(h=h, D=D, bd=bd, U=U, bu=bu).items():
        assert t.grad is not None and t.grad.dtype == t.dtype, f"d{name}"
        assert_close(t.grad, leaves[name].grad, dtype, f"d{name}")


def _reference_hooks(model, adapted, config):
    """Plain torch: a forward hook on each target adds h + up(act(down(h))) with the adapted model's weights."""
    act = {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh,
           "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[config.activation]
    params = {}
    for name, m in adapted.get_base_model().named_modules():
        if isinstance(m, AdapterAfter):
            w = {k: p.detach().clone().requires_grad_() for k, p in m.adapter.named_parameters()}
            params[name] = w

            def hook(module, inputs, h, w=w):
                return h + F.linear(act(F.linear(h, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])

            model.get_submodule(name).register_forward_hook(hook)
    return params


@pytest.mark.parametrize("placement, activation, backend", [("pfeiffer", "relu", "torch"),
                                                            ("houlsby", "silu", "torch"),
                                                            ("houlsby", "gelu_tanh", "triton")])
def test_model_matches_plain_torch_reference(placement, activation, backend, monkeypatch):
    if backend == "triton" and not INTERPRET:
        pytest.skip("Triton on CPU needs the interpreter")
    monkeypatch.setenv("FASTFT_LORA_BACKEND", backend)
    config = BottleneckAdapterConfig(size=8, placement=placement, activation=activation)
    ours = fastft.get_peft_model(tiny_llama(), config)
    assert isinstance(ours, BottleneckAdapterModel)
    n_adapters = sum(isinstance(m, AdapterAfter) for m in ours.modules())
    assert n_adapters == (4 if placement == "houlsby" else 2)
    batch = ids()
    with torch.no_grad():  # near identity at init: the model is unchanged
        assert_close(ours(input_ids=batch).logits, tiny_llama()(input_ids=batch).logits, torch.float32, "init")
    perturb_trainables(ours)
    reference = tiny_llama()
    params = _reference_hooks(reference, ours, config)
    out = ours(input_ids=batch, labels=batch)
    out.loss.backward()
    ref = reference(input_ids=batch, labels=batch)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, torch.float32, "logits")
    trainable = {n: p for n, p in ours.get_base_model().named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * n_adapters
    for name, p in trainable.items():
        module, _, key = name.partition(".adapter.")
        assert_close(p.grad, params[module][key].grad, torch.float32, f"grad {name}")


def test_save_load_round_trip(tmp_path):
    config = BottleneckAdapterConfig(size=8, placement="houlsby", activation="tanh")
    ours = fastft.get_peft_model(tiny_llama(), config)
    perturb_trainables(ours)
    batch = ids()
    with torch.no_grad():
        want = ours(input_ids=batch).logits
    fastft.save_adapter(ours, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FASTFT_BOTTLENECK_ADAPTER" and saved["placement"] == "houlsby"
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    loaded = fastft.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert_close(loaded(input_ids=batch).logits, want, torch.float32, "reloaded")
    trainable = fastft.load_adapter(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 16
    with pytest.raises(ValueError, match="has shape .* the adapter was trained for a different model"):
        fastft.load_adapter(tiny_llama(hidden_size=32, intermediate_size=48), tmp_path / "adapter")


def test_apply_method_and_peft_refusal():
    model = apply_method(tiny_llama(), "adapter", MethodOptions(adapter_size=4, adapter_placement="houlsby"))
    assert sum(isinstance(m, AdapterAfter) for m in model.modules()) == 4
    with pytest.raises(NotImplementedError, match="peft has no bottleneck adapters"):
        apply_method(tiny_llama(), "adapter", implementation="peft")


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=0), r"BottleneckAdapterConfig.size=0"),
    (dict(placement="after_everything"), r"BottleneckAdapterConfig.placement='after_everything'.*pfeiffer"),
    (dict(activation="gelu"), r"BottleneckAdapterConfig.activation='gelu'.*relu"),
    (dict(mlp_output_modules=()), r"BottleneckAdapterConfig.mlp_output_modules=\(\)"),
    (dict(init_std=0.0), r"BottleneckAdapterConfig.init_std=0.0.*\(0, 1\)"),  # both projections would stay 0
])
def test_bad_configs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckAdapterConfig(**kwargs)


def test_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match=r"BottleneckAdapterConfig.mlp_output_modules=\('fc2',\) matches no module"):
        fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(mlp_output_modules=("fc2",)))
    with pytest.raises(ValueError, match=r"attn_output_modules=\('oproj',\) matches no module"):  # houlsby: each
        fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(placement="houlsby", attn_output_modules=("oproj",)))
    with pytest.raises(ValueError, match=r"mlp_output_modules='\(': a string is a regex"):
        BottleneckAdapterConfig(mlp_output_modules="(")


def test_bert_outputs_are_told_apart_by_dotted_suffix_or_regex():
    """BERT names its attention output and its feed-forward output both `...output.dense`: a last-name match put
    adapters after both, or after neither; entries match as peft's target_modules do (a name or a dotted suffix;
    one string: a regex over the whole name), and a module both fields match is refused."""
    from transformers import BertConfig, BertModel

    def bert():
        return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=48))

    def adapted(**kwargs):
        model = fastft.get_peft_model(bert(), BottleneckAdapterConfig(size=4, **kwargs))
        return [n for n, m in model.named_modules() if isinstance(m, AdapterAfter)]

    ffn = r".*[.]layer[.][0-9]+[.]output[.]dense"
    after_ffn = adapted(mlp_output_modules=ffn)
    assert len(after_ffn) == 2 and all(n.endswith(".output.dense") and ".attention." not in n for n in after_ffn)
    both = adapted(placement="houlsby", attn_output_modules=("attention.output.dense",), mlp_output_modules=ffn)
    assert len(both) == 4 and sum(".attention.output.dense" in n for n in both) == 2
    with pytest.raises(ValueError, match="mlp_output_modules also matches .*two adapters"):
        adapted(placement="houlsby", attn_output_modules=("attention.output.dense",),
                mlp_output_modules=("output.dense",))


def test_hooked_or_offloaded_adapter_layers_are_called():
    """The fused op reads down/up's weights: a hook on them was skipped (logits 4.4e-3 off a model that calls
    them), and accelerate's cpu_offload (weights on meta until the hook loads them) crashed deep inside. Hooked
    layers are called."""
    from accelerate import cpu_offload

    def build():
        model = apply_method(tiny_llama(), "adapter", MethodOptions(adapter_size=4, adapter_placement="houlsby"))
        perturb_trainables(model, seed=3)
        return model.eval()

    x = ids()
    model = build()
    adapters = [m for m in model.modules() if type(m).__name__ == "BottleneckAdapter"]
    want = model(input_ids=x).logits
    calls = []
    handle = adapters[0].down.register_forward_hook(lambda m, a, out: (calls.append(1), out * 2.0)[1])
    got = model(input_ids=x).logits
    handle.remove()
    # what the hook does, done by hand: the first adapter's down projection doubled
    with torch.no_grad():
        adapters[0].down.weight.mul_(2.0)
        adapters[0].down.bias.mul_(2.0)
    doubled = model(input_ids=x).logits
    assert calls == [1] and not torch.allclose(got, want)
    torch.testing.assert_close(got, doubled, rtol=1e-5, atol=1e-5)

    model = build()
    want = model(input_ids=x).logits
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert adapters and [m for m in model.modules() if type(m).__name__ == "BottleneckAdapter"][0].down.weight.is_meta
    torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
