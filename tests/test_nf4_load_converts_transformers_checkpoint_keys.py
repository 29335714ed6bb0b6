"""load_nf4_model reads a checkpoint as transformers 5 does: save_pretrained writes (and hub checkpoints hold) keys in
the model's original layout, which transformers' loader converts (transformers.conversion_mapping). GPT-NeoX's head
is stored as `embed_out`: it was dropped and the model's `lm_head` initialised at random, behind a warning (logits
off by ~4). Mixtral stores one weight per expert, which load merged into one fused tensor a layer: the load stopped
with a KeyError naming another architecture. Both now load as the same model quantized in memory, single-file or
sharded (the experts of one layer spread over several files)."""
import copy
import warnings

import pytest
import torch

import fastft

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping")


def _gpt_neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, tie_word_embeddings=False))


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


@pytest.mark.parametrize("build, stored, shard", [
    (_gpt_neox, "embed_out.weight", None),
    (_mixtral, "model.layers.0.block_sparse_moe.experts.3.w2.weight", None),
    (_mixtral, "model.layers.1.block_sparse_moe.experts.0.w1.weight", "20KB"),
])
def test_a_checkpoint_in_the_original_layout_loads_as_the_model(tmp_path, build, stored, shard):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # visible experts and heads: every fused slice differs from its neighbours
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    from safetensors import safe_open
    stored_keys = set()
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            stored_keys |= set(f.keys())
    assert stored in stored_keys and stored not in model.state_dict()  # the layout the loader converts
    assert not shard or len(list(tmp_path.glob("*.safetensors"))) > 1
    expected = fastft.quantize_model(copy.deepcopy(model), "nf4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fastft.load_nf4_model(str(tmp_path), dtype=torch.float32)
    assert not [w for w in caught if "load_nf4_model" in str(w.message)]  # nothing dropped, nothing initialised
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_tensors_transformers_keeps_in_fp32_load_in_fp32(tmp_path):
    """DeepSeek-V3 keeps its router's weight and score bias in fp32 (`_keep_in_fp32_modules_strict`) whatever the
    dtype it loads in: load_nf4_model cast them to bf16 (the router's scores rounded, experts picked otherwise)."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1, max_position_embeddings=64)
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path)
    ours = fastft.load_nf4_model(str(tmp_path), dtype=torch.bfloat16)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    kept = {n for n, t in theirs.state_dict().items() if t.dtype == torch.float32}
    # what the model keeps in fp32: the router's weight and score bias (5.24), the score bias alone (5.17)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in kept
    assert {n: ours.state_dict()[n].dtype for n in kept} == {n: torch.float32 for n in kept}


@pytest.mark.parametrize("build, stored", [(_gpt_neox, "embed_out.weight"),  # a renaming
                                           (_mixtral, "model.layers.0.block_sparse_moe.experts.3.w2.weight")])
def test_the_load_reads_the_keys_without_transformers_newer_helpers(tmp_path, monkeypatch, build, stored):
    """transformers 5.17 (the GPU machine's) has no `apply_renamings` / `apply_converters` in core_model_loading:
    importing them stopped every NF4 load of a model with checkpoint conversions there, and save_nf4_model too. The
    keys are now renamed through each transform's own rename_source_key, in 5.17 and 5.24 alike."""
    import sys
    import transformers.core_model_loading as loading

    def not_in_5_17(name, helper):  # transformers' own callers (5.24's save_pretrained) keep theirs
        def called(*args, **kwargs):
            assert not sys._getframe(1).f_globals["__name__"].startswith("fastft"), f"fastft called {name}"
            return helper(*args, **kwargs)
        return called
    for name in ("apply_renamings", "apply_converters"):
        if hasattr(loading, name):
            monkeypatch.setattr(loading, name, not_in_5_17(name, getattr(loading, name)))
    test_a_checkpoint_in_the_original_layout_loads_as_the_model(tmp_path / "load", build, stored, None)
    torch.manual_seed(0)
    model = fastft.quantize_model(build().eval(), "nf4")
    fastft.save_nf4_model(model, tmp_path / "saved")
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        again = fastft.load_nf4_model(str(tmp_path / "saved"), dtype=torch.float32)
        assert torch.equal(again(ids).logits, model(ids).logits)
