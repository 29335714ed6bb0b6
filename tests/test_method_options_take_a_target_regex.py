"""MethodOptions.target_modules (and IA3's two lists) given as one string: peft's configs read a string as a regex
over full module names, but apply_method passed list("q_proj") on — one-letter names that matched nothing, and peft
refused the config (fuzz-found, 2026-12-06). A string now reaches peft as it is: the same modules as peft's own
config with that string for a regex, and for a bare name ("q_proj", which as a regex matches no whole name, as in
peft) an error that says so."""
import peft
import pytest
import torch
import transformers as T

from fastft.integration.methods import MethodOptions, apply_method


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))


def _adapted(model, kind: str) -> set[str]:
    return {name.rsplit(f".{kind}", 1)[0] for name, _ in model.named_parameters() if f".{kind}" in name}


@pytest.mark.parametrize("targets", [r".*\.(q|v)_proj", r".*layers\.1\.mlp\.down_proj",
                                     "model.layers.0.self_attn.q_proj"])
def test_a_lora_target_string_matches_what_peft_matches(targets):
    ours = apply_method(_llama(), "lora", MethodOptions(target_modules=targets))
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                           task_type="CAUSAL_LM"))
    want = _adapted(theirs, "lora_A")
    assert want and _adapted(ours, "lora_A") == want
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules


def test_a_bare_name_as_a_string_is_refused_as_peft_refuses_it_saying_why():
    with pytest.raises(ValueError, match="no LoRA|not found|Target modules"):
        peft.get_peft_model(_llama(), peft.LoraConfig(target_modules="q_proj", task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"a string is a regex that must match a whole module name.*\['q_proj'\]"):
        apply_method(_llama(), "lora", MethodOptions(target_modules="q_proj"))


def test_ia3_target_and_feedforward_strings_match_what_peft_matches():
    options = MethodOptions(ia3_target_modules=r".*\.(k_proj|down_proj)", ia3_feedforward_modules=r".*\.down_proj")
    ours = apply_method(_llama(), "ia3", options)
    theirs = peft.get_peft_model(_llama(), peft.IA3Config(target_modules=options.ia3_target_modules,
                                                          feedforward_modules=options.ia3_feedforward_modules,
                                                          task_type="CAUSAL_LM"))
    want = _adapted(theirs, "ia3_l")
    assert want and _adapted(ours, "ia3_l") == want
    assert {n for n in want if n.endswith("down_proj")}  # the feed-forward ones too
