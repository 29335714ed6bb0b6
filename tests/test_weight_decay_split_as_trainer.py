"""--weight-decay spared only parameters named exactly `bias` and every weight of a module whose class name holds
"norm": GPT-OSS's expert biases (`gate_up_proj_bias`), Mamba2's `dt_bias` were decayed, and a NormedEmbedding's
whole token table was not — transformers.Trainer does the opposite for both. The split now follows Trainer's
rule (its name patterns and LayerNorm layers), plus normalization classes and the methods' scales. And make_optimizer
keeps AdamW unfused under fp16's GradScaler (which always calls a fused step)."""
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Trainer

from fastft.apps.optimizers import make_optimizer


class NormedEmbedding(nn.Embedding):  # as transformers' InklingNormedEmbedding: a table with a norm inside
    def __init__(self):
        super().__init__(16, 8)
        self.norm = nn.RMSNorm(8)


class OddNorm(nn.Module):  # a normalization layer whose weight's name no pattern of Trainer's matches
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = NormedEmbedding()
        self.proj = nn.Linear(8, 8)
        self.dt_bias = nn.Parameter(torch.ones(8))
        self.ln_f = OddNorm()


def _decayed(model) -> set[str]:
    """The names one AdamW step on zero gradients moved (weight decay alone moves a weight)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # nothing at zero, where decay would not show
    opt = make_optimizer("adamw", model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_decay_split_matches_trainer_on_gpt_oss_expert_biases():
    config = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert any(n.endswith("gate_up_proj_bias") for n, _ in model.named_parameters())
    assert _decayed(model) == set(Trainer.get_decay_parameter_names(None, model))


def test_dt_bias_and_odd_norms_spared_a_normed_embedding_decayed():
    decayed = _decayed(Block())
    assert decayed == {"embed.weight", "proj.weight"}, decayed
    # Trainer's own rule spares dt_bias and decays the embedding; the odd norm class fastft spares besides
    assert set(Trainer.get_decay_parameter_names(None, Block())) == {"embed.weight", "proj.weight", "ln_f.scale"}


class Scale(nn.Module):  # a remote-code model's own normalization, its class name without "norm"
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))


def test_a_weight_named_like_a_norm_is_spared_whatever_its_class():
    model = nn.Module()
    model.proj = nn.Linear(8, 8, bias=False)
    model.final_norm = Scale()  # Trainer's `_norm` pattern spares it; its class says nothing
    assert _decayed(model) == {"proj.weight"}
    assert set(Trainer.get_decay_parameter_names(None, model)) == {"proj.weight"}


def test_adamw_is_fused_on_cuda_parameters_except_under_the_grad_scaler(monkeypatch):
    """Only the device type decides: parameters report cuda (no GPU here) and AdamW's `fused` argument is read."""
    given = []
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **kw: (given.append(kw["fused"]),
                                                                     real(groups, **{**kw, "fused": None}))[1])
    monkeypatch.setattr(nn.Parameter, "device", property(lambda self: torch.device("cuda")), raising=False)
    model = nn.Linear(4, 4)
    make_optimizer("adamw", model, 1e-3, 0.0, grad_scaler=True)
    make_optimizer("adamw", model, 1e-3, 0.0, grad_scaler=False)
    make_optimizer("adamw", model, 1e-3, 0.0, fsdp=True)
    assert given == [None, True, None]
