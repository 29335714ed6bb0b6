"""fastft accepts what peft accepts where its layers fall back to peft's exact path, follows one rule when creating,
saving and loading (onto a plain model or into a PeftModel), and names options that would silently do nothing."""
import copy

import peft
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from torch import nn

import fastft
from tests.utils import tiny_llama

IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_gpt2():
    """GPT-2's attention and MLP layers are transformers' Conv1D (weight stored (in, out): fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((-1, -2)))


def perturb(model):
    """Non-zero adapter weights (LoRA B starts at zero, IA3 vectors at one), so the adapters change the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(ids).logits


def saved(tmp_path, make_base, config, name="adapter"):
    """An adapter saved by peft itself, and the logits peft's own load of it gives."""
    source = peft.get_peft_model(make_base(), config)
    perturb(source)
    source.save_pretrained(str(tmp_path / name))
    return tmp_path / name, logits(PeftModel.from_pretrained(make_base(), str(tmp_path / name)))


# ------------------------------------------------------------------ nothing to fuse is not an error

def test_embedding_only_lora_builds_and_loads_like_peft(tmp_path):
    make = lambda: LoraConfig(r=4, target_modules=["embed_tokens"])  # noqa: E731
    with pytest.warns(UserWarning, match="no LoRA layer is fused"):
        ours = fastft.get_peft_model(tiny_llama(), make())
    theirs = peft.get_peft_model(tiny_llama(), make())
    perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(logits(ours), logits(theirs))
    path, want = saved(tmp_path, tiny_llama, make())
    with pytest.warns(UserWarning, match="no LoRA layer is fused"):
        assert torch.equal(logits(fastft.load_adapter(tiny_llama(), path)), want)
    host = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    fastft.load_adapter(host, path, adapter_name="embed")
    host.set_adapter("embed")
    assert torch.equal(logits(host), want)


def test_conv_only_lora_builds_like_peft():
    with pytest.warns(UserWarning, match="no LoRA layer is fused"):
        ours = fastft.get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["conv"]))
    theirs = peft.get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["conv"]))
    perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours(x), theirs(x))


# ------------------------------------------------------------------ fan_in_fan_out: one rule

def test_conv1d_lora_follows_one_rule_creating_adding_and_loading(tmp_path):
    """GPT-2's Conv1D layers run peft's forward: the explicit fan_in_fan_out=True, the user's config after peft set
    it, and a GPT-2 adapter loaded into a PeftModel are all accepted, and give peft's outputs."""
    make = lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)  # noqa: E731
    ours = fastft.get_peft_model(tiny_gpt2(), make())
    theirs = peft.get_peft_model(tiny_gpt2(), make())
    perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(logits(ours), logits(theirs))
    reused = LoraConfig(r=4, target_modules=["c_attn"])
    host = fastft.get_peft_model(tiny_gpt2(), reused)
    assert reused.fan_in_fan_out  # peft set it on the user's config
    fastft.add_adapter(host, "again", reused)
    path, want = saved(tmp_path, tiny_gpt2, make())
    fastft.load_adapter(host, path, adapter_name="loaded")
    host.set_adapter("loaded")
    assert torch.equal(logits(host), want)


def test_fan_in_fan_out_without_conv1d_targets_is_named():
    """On nn.Linear (or NF4) layers peft would silently reset it: a mistake, named with the field."""
    with pytest.raises(ValueError, match=r"LoraConfig.fan_in_fan_out=True .*none of the layers it targets is a "
                                         r"transformers Conv1D"):
        fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], fan_in_fan_out=True))


def test_ia3_on_gpt2_saves_and_loads_back(tmp_path):
    ours = fastft.get_peft_model(tiny_gpt2(), IA3Config(task_type="CAUSAL_LM"))
    perturb(ours)
    fastft.save_adapter(ours, tmp_path / "ia3")
    want = logits(PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ia3")))
    assert torch.equal(logits(ours), want)
    assert torch.equal(logits(fastft.load_adapter(tiny_gpt2(), tmp_path / "ia3")), want)


def test_dora_on_gpt2_with_explicit_fan_in_fan_out_matches_peft():
    make = lambda: LoraConfig(r=4, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True)  # noqa: E731
    ours = fastft.get_peft_model(tiny_gpt2(), make())
    theirs = peft.get_peft_model(tiny_gpt2(), make())
    perturb(theirs)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(logits(ours), logits(theirs))


# ------------------------------------------------------------------ one load policy

def _eva_adapter(tmp_path):
    """peft saves an EVA-initialised adapter with init_lora_weights='eva' in its config."""
    source = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    source.peft_config["default"].init_lora_weights = "eva"
    perturb(source)
    source.save_pretrained(str(tmp_path / "eva"))
    return tmp_path / "eva", logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "eva")))


@pytest.mark.parametrize("kind", ["lora_bias", "eva", "target_parameters"])
def test_a_peft_adapter_loads_into_a_peft_model_as_onto_a_plain_one(tmp_path, kind):
    if kind == "eva":
        path, want = _eva_adapter(tmp_path)
    else:
        extra = dict(lora_bias=True) if kind == "lora_bias" else dict(target_parameters=["mlp.down_proj.weight"])
        path, want = saved(tmp_path, tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], **extra))
    assert torch.equal(logits(fastft.load_adapter(tiny_llama(), path)), want)
    host = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"]))
    fastft.load_adapter(host, path, adapter_name="loaded")
    host.set_adapter("loaded")
    assert torch.equal(logits(host), want)


def test_layer_replication_adapter_loads_like_peft(tmp_path):
    path, want = saved(tmp_path, tiny_llama,
                       LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [0, 2]]))
    loaded = fastft.load_adapter(tiny_llama(), path)
    assert torch.equal(logits(loaded), want)
    assert len(loaded.get_base_model().model.layers) == 4
    host = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="layer_replication=.*Load it onto the plain base model"):
        fastft.load_adapter(host, path, adapter_name="replicated")


def test_an_option_qlora_layers_do_not_compute_is_refused_on_load(tmp_path):
    path, _ = saved(tmp_path, tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match=r"LoraConfig.lora_bias=True.*QLoRA.*unquantized model"):
        fastft.load_adapter(fastft.quantize_model(tiny_llama(), "nf4"), path)


# ------------------------------------------------------------------ typos named, peft's matches accepted

@pytest.mark.parametrize("config, message", [
    (LoraConfig(r=4, target_modules="all-linear", rank_pattern={"qproj": 8}), r"rank_pattern key 'qproj'"),
    (LoraConfig(r=4, alpha_pattern={"vproj": 8}), r"alpha_pattern key 'vproj'"),
    (LoraConfig(r=4, target_modules="all-linear", exclude_modules=["downproj"]),
     r"exclude_modules entry 'downproj'.*did you mean 'down_proj'"),
    (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lmhead"]),
     r"modules_to_save entry 'lmhead'.*did you mean 'lm_head'"),
    (LoraConfig(r=4, target_modules=[], trainable_token_indices=[3]), r"target_modules='dummy-target-modules'"),
])
def test_an_option_that_would_do_nothing_is_named(config, message):
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        fastft.get_peft_model(model, config)
    assert [type(m) for m in model.modules()] == before  # refused before peft touched the model


def test_entries_peft_matches_are_accepted():
    """peft's matching: list entries by name or dotted suffix, string exclusions by regex full match, pattern keys
    by suffix regex, modules_to_save by name ending; the classification heads peft adds itself."""
    accepted = [
        LoraConfig(r=4, target_modules="all-linear", exclude_modules=["model.layers.0.mlp.down_proj", "lm_head"]),
        LoraConfig(r=4, target_modules="all-linear", exclude_modules=r".*layers\.0\..*"),
        LoraConfig(r=4, rank_pattern={r"layers\.\d+\.self_attn\.q_proj": 8}, alpha_pattern={"v_proj": 2}),
        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        LoraConfig(r=4, target_modules="dummy-target-modules", trainable_token_indices=[3]),
        LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1], rank_pattern={"q_proj": 8}),
    ]
    for config in accepted:
        fastft.get_peft_model(tiny_llama(), copy.deepcopy(config))
    from transformers import LlamaConfig, LlamaForSequenceClassification

    make_cls = lambda: LlamaForSequenceClassification(LlamaConfig(  # noqa: E731
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=3, pad_token_id=0))
    config = LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS")
    host = fastft.get_peft_model(make_cls(), config)
    assert "classifier" in config.modules_to_save  # peft added its head names; Llama's head is 'score'
    fastft.add_adapter(host, "again", config)
