"""NF4Linear, quantize_model, and NF4 checkpoints: bitsandbytes' format in and out, quantize-while-loading."""
import json
import weakref

import pytest
import torch
from torch import nn

import fastft
from fastft.integration import nf4_files, nf4_model
from fastft.modules.nf4_linear import NF4Linear
from fastft.quant import NF4Weight, quantize_nf4

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def _tiny_llama(tie_word_embeddings=False):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      tie_word_embeddings=tie_word_embeddings)
    return transformers.LlamaForCausalLM(config)


def _bnb_config(double_quant=True):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A dense fp32 tiny Llama, and the same saved 4-bit NF4 by transformers + bitsandbytes (on the CPU)."""
    root = tmp_path_factory.mktemp("nf4ckpt")
    torch.manual_seed(0)
    _tiny_llama().save_pretrained(root / "dense")
    bnb_model = transformers.LlamaForCausalLM.from_pretrained(root / "dense", quantization_config=_bnb_config(),
                                                              device_map="cpu", dtype=torch.bfloat16)
    bnb_model.save_pretrained(root / "bnb")
    return root, bnb_model


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and n != "lm_head"]


def test_nf4_linear_module():
    linear = nn.Linear(64, 24)
    layer = NF4Linear.from_linear(linear, blocksize=32)
    assert isinstance(layer.weight, NF4Weight) and layer.in_features == 64 and layer.out_features == 24
    assert layer.bias is linear.bias
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), x @ layer.weight.dequantize().T + linear.bias, atol=1e-5)
    keys = set(layer.state_dict())
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "bias"} == keys
    fresh = NF4Linear(64, 24)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight.packed, layer.weight.packed) and fresh.weight.blocksize == 32
    dense = NF4Linear(64, 24, blocksize=128, double_quant=False)
    dense.load_state_dict(linear.state_dict())  # a dense weight is quantized on load
    assert torch.equal(dense.weight.packed, quantize_nf4(linear.weight.detach(), 128, False).packed)
    assert dense.to(torch.bfloat16).weight.dtype == torch.float32 and dense.bias.dtype == torch.bfloat16
    assert torch.allclose(layer.to_linear()(x), layer(x), atol=1e-5)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(24, 64\)"):  # as torch reports one
        NF4Linear(64, 24).load_state_dict(NF4Linear.from_linear(nn.Linear(32, 24)).state_dict())
    with pytest.raises(RuntimeError, match="no weight"):
        NF4Linear(64, 24)(x)


def test_quantize_model_in_memory():
    torch.manual_seed(0)
    model = _tiny_llama().eval()
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        dense_logits = model(ids).logits
    fastft.quantize_model(model, "nf4", skip=["lm_head", "mlp.down_proj"])
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, NF4Linear)
    assert not isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, NF4Linear)
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - dense_logits).norm() / dense_logits.norm() < 0.2  # 4-bit weights, same function
    with pytest.raises(ValueError, match="nf4"):
        fastft.quantize_model(model, "fp4")


def test_load_bitsandbytes_checkpoint(checkpoints):
    from safetensors.torch import load_file
    root, bnb_model = checkpoints
    model = fastft.load_nf4_model(str(root / "bnb"), dtype=torch.bfloat16)
    stored = load_file(root / "bnb" / "model.safetensors")
    for name in _linear_names(model):
        layer = model.get_submodule(name)
        assert isinstance(layer, NF4Linear), name
        assert torch.equal(layer.weight.packed, stored[f"{name}.weight"].view(-1)), name
        ref = bnb_model.get_submodule(name).weight
        import bitsandbytes.functional as bnbf
        assert torch.equal(layer.weight.dequantize(), bnbf.dequantize_4bit(ref.data, ref.quant_state)), name
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), bnb_model(ids).logits.float()
    assert (ours - theirs).norm() / theirs.norm() < 2e-2


def test_quantize_while_loading_matches_bitsandbytes_and_holds_one_layer(checkpoints, monkeypatch):
    root, _ = checkpoints
    alive = []
    quantize = nf4_files.quantize_nf4

    def watched(tensor, *args, **kwargs):
        # every dense weight handed over earlier must be freed by now: one dense layer at a time
        assert all(ref() is None for ref in alive), "a dense layer outlived its quantization"
        alive.append(weakref.ref(tensor))
        return quantize(tensor, *args, **kwargs)

    monkeypatch.setattr(nf4_files, "quantize_nf4", watched)
    model = fastft.load_nf4_model(str(root / "dense"), dtype=torch.bfloat16)
    assert len(alive) == len(_linear_names(model))
    # Compare with the bytes bitsandbytes saved, not the live bnb model: its CPU forward (run by an earlier
    # test) may repack its weights in place for its own kernels.
    from safetensors.torch import load_file
    stored = load_file(root / "bnb" / "model.safetensors")
    for name in _linear_names(model):
        ours = model.get_submodule(name).weight
        assert torch.equal(ours.packed, stored[f"{name}.weight"].view(-1)), name
        assert torch.equal(ours.absmax, stored[f"{name}.weight.absmax"]), name
    assert not isinstance(model.lm_head, NF4Linear)


def test_save_over_a_sharded_checkpoint_replaces_its_weights(tmp_path):
    """save_nf4_model into the folder of a sharded save: the old index and shards stayed beside the new
    model.safetensors, and load_nf4_model, which reads the index first, returned the old weights. A file of
    another kind there (a tokenizer's) stays."""
    dense = _tiny_llama()
    dense.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    model = nf4_model.quantize_model(_tiny_llama(), "nf4")
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # unlike the dense checkpoint's
    fastft.save_nf4_model(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "tokenizer_config.json"]
    again = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_save_loads_back_in_bitsandbytes(checkpoints, tmp_path):
    root, _ = checkpoints
    model = fastft.load_nf4_model(str(root / "dense"), dtype=torch.bfloat16)
    fastft.save_nf4_model(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] is True
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    for name in _linear_names(model):
        assert torch.equal(reloaded.get_submodule(name).weight.data.view(-1), model.get_submodule(name).weight.packed)
    again = fastft.load_nf4_model(str(tmp_path), dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert not list(tmp_path.glob(".*.tmp-*"))  # atomic writes leave no temporaries


def test_checkpoint_missing_a_quant_state_key_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    root, _ = checkpoints
    (tmp_path / "config.json").write_text((root / "bnb" / "config.json").read_text())
    state = load_file(root / "bnb" / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight.nested_absmax"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight\.nested_absmax"):
        fastft.load_nf4_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        fastft.load_nf4_model(str(root / "missing"))


def test_non_finite_dense_weight_is_named_while_loading(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    root, _ = checkpoints
    (tmp_path / "config.json").write_text((root / "dense" / "config.json").read_text())
    state = load_file(root / "dense" / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][2, 3] = float("inf")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"`model\.layers\.1\.mlp\.up_proj\.weight`.*non-finite"):
        fastft.load_nf4_model(str(tmp_path))


def _round_trip(model, tmp_path, **load_kw):
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    nf4_files.save_nf4_model(model, tmp_path)
    loaded = nf4_files.load_nf4_model(tmp_path, **load_kw).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    return loaded


def test_views_of_one_quantized_storage_are_all_saved(tmp_path):
    """A fused QKV quantized once and split into q/k/v: three views of one storage at other offsets are three
    weights (only the very same tensor is a tied one)."""
    model = nf4_model.quantize_model(_tiny_llama().to(torch.bfloat16), double_quant=False).eval()
    attn = model.model.layers[0].self_attn
    rows = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    qkv = quantize_nf4(torch.randn(sum(rows), 64, dtype=torch.bfloat16) * 0.05, double_quant=False)
    attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight = qkv.split(rows)
    _round_trip(model, tmp_path)


def test_a_quantized_tied_lm_head_keeps_its_nf4_weight(tmp_path):
    model = nf4_model.quantize_model(_tiny_llama(tie_word_embeddings=True).to(torch.bfloat16),
                                     use_default_skip=False).eval()
    assert isinstance(model.lm_head, NF4Linear)
    loaded = _round_trip(model, tmp_path)
    assert isinstance(loaded.lm_head.weight, NF4Weight)


def test_a_module_name_part_starting_with_weight_loads(tmp_path):
    """`conv.weight_proj.weight`: the module is conv.weight_proj, not conv."""
    from transformers import LlamaForCausalLM

    class WithWeightProj(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.conv = nn.Module()
            self.conv.weight_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        def forward(self, input_ids, **kw):
            return self.lm_head(self.conv.weight_proj(self.model(input_ids).last_hidden_state))

    dense = WithWeightProj(_tiny_llama().config).to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense")
    # conv is the model's last module, which transformers (so default_skip) keeps dense: ask for it quantized
    only_lm_head = {"skip": ["lm_head"], "use_default_skip": False}
    for folder in (tmp_path / "dense", tmp_path / "nf4"):
        if folder.name == "nf4":
            nf4_files.save_nf4_model(nf4_model.quantize_model(WithWeightProj(dense.config).to(torch.bfloat16),
                                                              **only_lm_head), folder)
        loaded = nf4_files.load_nf4_model(folder, model_cls=WithWeightProj, **only_lm_head)
        assert isinstance(loaded.conv.weight_proj, NF4Linear) and isinstance(loaded.conv.weight_proj.weight, NF4Weight)
        loaded(torch.randint(0, 96, (1, 5)))
