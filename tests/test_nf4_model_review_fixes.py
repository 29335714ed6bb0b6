"""NF4 models, from a review: pre-quantized layers load as stored, default skips follow transformers, dense merges
in the model's dtype, peft's kbit preparation, memory footprint, GPT-2 Conv1D, a new head, skip typos."""
import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig
from torch import nn

import fastft
from fastft.modules.nf4_linear import NF4Linear
from tests.utils import randomize_lora_B, rel_err, tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

IDS = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))


def _bnb(**kw):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.bfloat16, **kw)


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, **kw).logits


def _saved_skip(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]


def test_a_prequantized_checkpoints_dense_layers_stay_dense(tmp_path):
    """fastft's own skip and bitsandbytes' llm_int8_skip_modules both survive save → load → save."""
    model = fastft.quantize_model(tiny_llama().to(torch.bfloat16), skip=["mlp.down_proj"])
    fastft.save_nf4_model(model, tmp_path / "own")
    loaded = fastft.load_nf4_model(str(tmp_path / "own")).to(torch.bfloat16)  # rotary buffers as the original's
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(_logits(loaded), _logits(model))
    fastft.save_nf4_model(loaded, tmp_path / "again")
    assert "model.layers.1.mlp.down_proj" in _saved_skip(tmp_path / "again")
    with pytest.raises(ValueError, match="q_proj.*stored NF4"):
        fastft.load_nf4_model(str(tmp_path / "own"), skip=["q_proj"])

    tiny_llama().save_pretrained(tmp_path / "dense")
    bnb = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=_bnb(llm_int8_skip_modules=["lm_head", "down_proj"]),
        device_map="cpu", dtype=torch.bfloat16)
    bnb.save_pretrained(tmp_path / "bnb")
    loaded = fastft.load_nf4_model(str(tmp_path / "bnb"))
    down = loaded.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear
    assert torch.equal(down.weight, bnb.model.layers[0].mlp.down_proj.weight)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, NF4Linear)


def test_default_skip_is_what_transformers_keeps_dense(tmp_path):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    seqcls = fastft.quantize_model(transformers.LlamaForSequenceClassification(config), skip=["o_proj"])
    assert type(seqcls.score) is nn.Linear  # transformers' last module; the explicit skip adds to it
    assert type(seqcls.model.layers[0].self_attn.o_proj) is nn.Linear
    peft_model = fastft.get_peft_model(seqcls, LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert any("score.modules_to_save" in n for n, p in peft_model.named_parameters() if p.requires_grad)

    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0))
    fastft.quantize_model(t5.to(torch.bfloat16))
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear  # _keep_in_fp32_modules
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q, NF4Linear)
    fastft.save_nf4_model(t5, tmp_path)
    transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, device_map="cpu")  # shapes match


def test_skip_entries_that_match_nothing_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'lmhead'.*did you mean 'lm_head'"):
        fastft.quantize_model(tiny_llama(), skip=["lmhead"])
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'down_prj'.*down_proj"):
        fastft.load_nf4_model(str(tmp_path), skip=["down_prj"])
    fastft.quantize_model(nn.Sequential(nn.Linear(8, 8)), skip=["lm_head"])  # the default entry is fine anywhere


def _merged_logits(model):
    peft_model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_lora_B(peft_model)
    before = _logits(peft_model)
    merged = fastft.merge_and_unload(peft_model)
    return _logits(merged), before, merged


def test_a_dense_merge_takes_the_models_dtype(tmp_path):
    cast = fastft.quantize_model(tiny_llama()).to(torch.bfloat16)  # NF4 weights stay fp32
    after, before, merged = _merged_logits(cast)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16 and rel_err(after, before) < 3e-2

    upcast = fastft.prepare_model_for_kbit_training(fastft.quantize_model(tiny_llama().to(torch.bfloat16)),
                                                    use_gradient_checkpointing=False)  # the rest now fp32
    after, before, merged = _merged_logits(upcast)
    # the NF4 layers computed in their weights' bf16 (bitsandbytes' compute dtype), the merged dense ones in fp32
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32 and rel_err(after, before) < 3e-2

    fastft.save_nf4_model(fastft.quantize_model(tiny_llama().to(torch.float16)), tmp_path)
    loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.bfloat16)  # NF4 weights stay fp16
    after, before, _ = _merged_logits(loaded)
    assert after.dtype == torch.bfloat16 and rel_err(after, before) < 3e-2


def _lora_grads(model):
    torch.manual_seed(0)  # the same lora_A on both models
    peft_model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(peft_model)
    peft_model.train()
    peft_model(IDS, labels=IDS).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def test_prepare_model_for_kbit_training_checkpoints_an_nf4_model():
    prepared = fastft.prepare_model_for_kbit_training(fastft.quantize_model(tiny_llama().to(torch.bfloat16)))
    assert prepared.is_gradient_checkpointing and prepared.model.norm.weight.dtype == torch.float32
    plain = fastft.prepare_model_for_kbit_training(fastft.quantize_model(tiny_llama().to(torch.bfloat16)),
                                                   use_gradient_checkpointing=False)
    assert not plain.is_gradient_checkpointing
    ours, want = _lora_grads(prepared), _lora_grads(plain)
    assert ours.keys() == want.keys() and all(torch.allclose(ours[k], want[k], atol=1e-6) for k in want)
    with pytest.raises(TypeError, match="use_gradient_checkpointing=False"):
        fastft.prepare_model_for_kbit_training(nn.Sequential(nn.Linear(8, 8)))


def test_memory_footprint_counts_nf4_bytes():
    dense = tiny_llama().to(torch.bfloat16)
    quantized = fastft.quantize_model(copy.deepcopy(dense))
    nf4 = [p for p in quantized.parameters() if isinstance(p, fastft.quant.NF4Weight)]
    rest = sum(p.nelement() * p.element_size() for p in quantized.parameters() if not isinstance(
        p, fastft.quant.NF4Weight))
    buffers = sum(b.nelement() * b.element_size() for b in quantized.buffers())
    assert quantized.get_memory_footprint() == rest + buffers + sum(p.nbytes for p in nf4)
    assert quantized.get_memory_footprint() < dense.get_memory_footprint()


def _tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_quantizes_loads_and_merges_as_bitsandbytes_does(tmp_path):
    dense = _tiny_gpt2()
    quantized = fastft.quantize_model(copy.deepcopy(dense))
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 4 and not any(type(m).__name__ == "Conv1D" for m in quantized.modules())
    twin = copy.deepcopy(dense)  # the dense model with the 4-bit weights: same function
    with torch.no_grad():
        for name, layer in layers.items():
            twin.get_submodule(name).weight.copy_(layer.weight.dequantize().t())
    assert torch.allclose(_logits(quantized), _logits(twin), atol=1e-4)

    dense.save_pretrained(tmp_path / "dense")
    bnb = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "dense", quantization_config=_bnb(),
                                                       device_map="cpu", dtype=torch.float32)
    bnb.save_pretrained(tmp_path / "bnb")
    from_bnb = fastft.load_nf4_model(str(tmp_path / "bnb"), dtype=torch.float32)
    from_dense = fastft.load_nf4_model(str(tmp_path / "dense"), dtype=torch.float32)
    for name, layer in layers.items():
        assert torch.equal(from_bnb.get_submodule(name).weight.packed, layer.weight.packed), name
        assert torch.equal(from_dense.get_submodule(name).weight.packed, layer.weight.packed), name

    after, before, merged = _merged_logits_gpt2(quantized)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D" and rel_err(after, before) < 1e-5
    merged.save_pretrained(tmp_path / "merged")  # GPT-2's own layout: transformers loads it
    assert torch.allclose(_logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")), after)


def _merged_logits_gpt2(model):
    peft_model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    randomize_lora_B(peft_model)
    before = _logits(peft_model)
    merged = fastft.merge_and_unload(peft_model)
    return _logits(merged), before, merged


def test_a_new_head_over_a_causal_lm_checkpoint_is_initialised_with_a_warning(tmp_path):
    tiny_llama(num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"lm_head\.weight.*score\.weight"):
        model = fastft.load_nf4_model(str(tmp_path), model_cls=transformers.LlamaForSequenceClassification)
    assert torch.isfinite(model.score.weight).all() and 0.005 < model.score.weight.std() < 0.05  # std 0.02
    # the body in the load's dtype too, not the fp32 the checkpoint's config records (transformers 5.6 built the
    # inner model in it: its forward stopped at the bf16 head)
    assert model.config.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(IDS).logits.shape == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching checkpoint loads without a warning
        fastft.load_nf4_model(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# found by a second review of the fixes above

def test_a_base_models_checkpoint_loads_by_prefix_and_a_foreign_one_is_refused(tmp_path):
    """transformers' base_model_prefix rule: a LlamaModel checkpoint ("layers.0...") loads into LlamaForCausalLM
    (it was loaded as nothing: every tensor dropped, every module random, none quantized); a checkpoint lacking the
    body's weights is refused rather than initialised at random."""
    full = tiny_llama(num_hidden_layers=1)
    full.model.save_pretrained(tmp_path / "base")
    loaded = fastft.load_nf4_model(str(tmp_path / "base"), dtype=torch.float32)
    assert sum(isinstance(m, NF4Linear) for m in loaded.modules()) == 7
    assert torch.equal(loaded.model.embed_tokens.weight, full.model.embed_tokens.weight)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4,
                                                         n_positions=32)).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    with pytest.raises(KeyError, match="lacks .*model.layers.0.* a checkpoint of LlamaForCausalLM's architecture"):
        fastft.load_nf4_model(str(tmp_path / "gpt2"))


def test_an_nf4_model_pickles_and_merges_without_embeddings():
    import io

    model = fastft.quantize_model(tiny_llama())
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the footprint override is picklable (a bound method was not)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).get_memory_footprint() == model.get_memory_footprint()

    layers = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)).to(torch.bfloat16)
    plain = fastft.quantize_model(layers, use_default_skip=False)
    peft_model = fastft.get_peft_model(plain, LoraConfig(r=4, target_modules=["0", "1"]))  # fp32 adapters
    merged = fastft.merge_and_unload(peft_model)  # no embeddings, no frozen dense parameter: the NF4 weights' dtype
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert merged[0].weight.dtype == torch.bfloat16 and merged(x).dtype == torch.bfloat16  # not the adapters' fp32


def test_a_gpt2_adapter_trained_on_the_dense_model_loads_onto_its_nf4_twin(tmp_path):
    """peft writes fan_in_fan_out=True for GPT-2's Conv1D; an NF4Linear holds the weight (out, in), so the adapter
    fits as it is (it was refused): the same outputs as peft on the dense model with the 4-bit values."""
    import peft

    dense = _tiny_gpt2()
    quantized = fastft.quantize_model(copy.deepcopy(dense))
    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, NF4Linear):
                twin.get_submodule(name).weight.copy_(layer.weight.dequantize().t())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = peft.get_peft_model(copy.deepcopy(dense), LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                                       init_lora_weights=False))
    assert trained.peft_config["default"].fan_in_fan_out
    trained.save_pretrained(tmp_path)
    loaded = fastft.load_adapter(quantized, tmp_path)
    want = _logits(peft.PeftModel.from_pretrained(twin, tmp_path))
    assert torch.allclose(_logits(loaded), want, atol=1e-5)
    assert torch.allclose(_logits(fastft.merge_and_unload(loaded)), want, atol=1e-4)


def test_quantize_model_refuses_a_model_with_peft_adapters():
    """Its lora_A / lora_B are nn.Linear too: they became frozen NF4Linear layers (0 trainable parameters, an error
    only at backward)."""
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(TypeError, match="holds peft adapters.*quantize the base model first"):
        fastft.quantize_model(model, "nf4")
    assert any(p.requires_grad for p in model.parameters())


def test_quantize_model_gives_a_shared_layer_one_nf4_layer_at_every_name():
    """named_modules() names a shared module once: the other name kept the dense layer, its weight set to None."""
    shared = nn.Linear(64, 64)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    fastft.quantize_model(model, "nf4", use_default_skip=False)
    assert isinstance(model[0][0], NF4Linear) and model[1][0] is model[0][0]
    assert torch.isfinite(model(torch.randn(2, 64))).all()


def test_quantize_model_leaves_linears_it_cannot_stand_in_for_dense():
    """An nn.Linear subclass with its own forward (silently replaced: 0.9 off) and nn.MultiheadAttention's
    out_proj, whose weight the attention reads directly (NotImplementedError from NF4Weight), stay dense, named in
    a warning."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 10

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaled, self.plain = Scaled(64, 64), nn.Linear(64, 64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            return self.attn(self.plain(self.scaled(x)), x, x)[0]

    model = Net()
    x = torch.randn(2, 3, 64)
    with pytest.warns(UserWarning, match=r"left 2 layer\(s\) dense \(scaled, attn.out_proj\)"):
        fastft.quantize_model(model, "nf4", use_default_skip=False)
    assert type(model.scaled) is Scaled and type(model.attn.out_proj) is not NF4Linear
    assert isinstance(model.plain, NF4Linear)
    assert model(x).shape == (2, 3, 64)


@pytest.mark.parametrize("method", ["nf4", "qlora", "qdora"])
def test_an_upcast_model_computes_its_nf4_layers_in_their_weights_dtype(method, monkeypatch):
    """After prepare_model_for_kbit_training's fp32 upcast, NF4, QLoRA and QDoRA layers on bf16-quantized weights
    compute in bf16 (bitsandbytes' compute dtype: fp32 GEMMs would run without tensor cores) and return fp32, with
    fp32 gradients; under autocast, and on weights quantized from fp32 or fp16 (no GradScaler would keep fp16
    gradients from underflowing), they compute as before."""
    import fastft.integration.methods.dora as dora_module
    import fastft.modules.nf4_linear as nf4_module
    import fastft.modules.qlora as qlora_module

    computed = []
    for module, name in ((nf4_module, "nf4_linear"), (qlora_module, "qlora_linear"), (dora_module, "dora_linear")):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda x, *a, _op=op, **k: (computed.append(x.dtype), _op(x, *a, **k))[1])

    def adapted(model):
        if method == "nf4":
            return model
        return fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        use_dora=method == "qdora"))

    def run(model):
        model = adapted(model)
        if method != "nf4":
            randomize_lora_B(model)
        computed.clear()
        loss = model(IDS, labels=IDS).loss
        if loss.requires_grad:  # (NF4 alone: prepare froze every weight)
            loss.backward()
        grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
        return set(computed), loss.dtype, grads

    def upcast(dtype):
        return fastft.prepare_model_for_kbit_training(fastft.quantize_model(tiny_llama().to(dtype)),
                                                      use_gradient_checkpointing=False)

    trained = set() if method == "nf4" else {torch.float32}
    assert run(upcast(torch.bfloat16)) == ({torch.bfloat16}, torch.float32, trained)
    assert run(upcast(torch.float32))[0] == {torch.float32}
    assert run(upcast(torch.float16))[0] == {torch.float32}

    def autocast_loss():  # the op casts x to autocast's dtype itself (autocast_inputs)
        torch.manual_seed(0)
        model = adapted(upcast(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(IDS, labels=IDS).loss

    with_cast = autocast_loss()
    monkeypatch.setattr(fastft.ops.shared, "compute_input", lambda x, weight: x)
    assert torch.equal(with_cast, autocast_loss())  # under autocast nothing changes


@pytest.mark.parametrize("adapted", [False, True], ids=["nf4-head", "qlora-head"])
def test_the_fused_loss_computes_an_upcast_models_nf4_head_in_bf16(adapted):
    """An NF4 lm_head (quantized with use_default_skip=False) in the fused loss computes an fp32 input in bf16, as
    the NF4 layers do after prepare_model_for_kbit_training's upcast: the loss and gradients are those of the input
    cast to bf16 first (the loss fp32, dh fp32 through the cast), a LoRA head's factors fp32 with fp32 gradients."""
    model = fastft.quantize_model(tiny_llama().to(torch.bfloat16), use_default_skip=False)
    model = fastft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapted:
        model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"]))
        randomize_lora_B(model)
    head = model.get_output_embeddings()
    assert type(head.get_base_layer() if adapted else head) is NF4Linear
    hidden = torch.randn(2, 5, head.in_features, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, head.out_features, (2, 5), generator=torch.Generator().manual_seed(4))
    factors = [p for n, p in head.named_parameters() if "lora_" in n]

    def run(h):
        h = h.clone().requires_grad_()
        loss = fastft.ops.lm_head_cross_entropy(h, head, labels)
        grads = torch.autograd.grad(loss, [h, *factors])
        return loss, grads

    loss, grads = run(hidden)
    cast_loss, cast_grads = run(hidden.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.equal(loss, cast_loss)
    assert grads[0].dtype == torch.float32 and torch.equal(grads[0], cast_grads[0].float())
    for got, want, factor in zip(grads[1:], cast_grads[1:], factors):
        assert got.dtype == factor.dtype == torch.float32 and torch.equal(got, want)
    assert len(factors) == (2 if adapted else 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides as before
        assert torch.equal(run(hidden)[0], cast_loss)
