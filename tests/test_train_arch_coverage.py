"""fastft train's objectives on architectures outside the patching table (found by an architecture sweep over
transformers' causal-LM registry): each trains on the model's own logits, or is refused in one line."""
from __future__ import annotations

import pytest
import torch

from fastft.apps.training import objectives
from fastft.apps.training.config import ConfigError
from fastft.apps.training.data import Example, pack
from fastft.apps.training.objectives import (ObjectiveModel, causal_lm_parts, check_head_gives_logits, packing_isolates,
                                             token_rows)

transformers = pytest.importorskip("transformers")


def _recurrent_gemma(scale=3.0):
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(0)
    config = RecurrentGemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, lru_width=64,
                                  block_types=["recurrent", "attention"], logits_soft_cap=30.0)
    model = RecurrentGemmaForCausalLM(config).eval()
    with torch.no_grad():  # logits of a trained model's size (|logit| up to ~6), where a cap of 30 moves them ~1%
        model.model.final_norm.weight.add_(1).mul_(scale).sub_(1)
    return model


def test_recurrent_gemmas_softcap_is_applied():
    """RecurrentGemma caps its logits (config.logits_soft_cap): the sft loss was 7.459 against its own 7.357."""
    model = _recurrent_gemma()
    check_head_gives_logits(model, "--model rg")
    ids = torch.randint(3, 200, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    batch = pack([Example(ids, ids)], pad_token_id=0, flash_kwargs=False)
    loss, _ = ObjectiveModel(model, "sft")(batch)
    (loss / batch["num_targets"]).backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    t = torch.tensor([ids])
    own = model(input_ids=t, labels=t).loss
    own.backward()
    torch.testing.assert_close(loss / batch["num_targets"], own, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_an_unknown_scaling_of_fp32_logits_is_refused_at_small_logits(monkeypatch):
    """The head check allowed 2% of the largest logit, a bf16 model's rounding: on an fp32 model a cap the objectives
    did not know passed while the probe's logits were small."""
    monkeypatch.setattr(objectives, "_FINAL_SOFTCAP", ("final_logit_softcapping",))  # as if the cap were unknown
    with pytest.raises(ConfigError, match="transforms its logits after the head"):
        check_head_gives_logits(_recurrent_gemma(), "--model rg")


def test_llama4_text_model_backbone_is_found():
    """Llama4ForCausalLM names base_model_prefix 'language_model' but keeps its backbone at .model: base_model was
    the causal LM itself, and the head check crashed (no last_hidden_state)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_local_experts=2)
    model = Llama4ForCausalLM(config)
    backbone, _ = causal_lm_parts(model)
    assert backbone is model.model
    check_head_gives_logits(model, "--model llama4")


def test_decoder_wrapper_models_give_their_embeddings():
    """BART-family ...ForCausalLM keep a decoder wrapper as base_model, which does not answer get_input_embeddings:
    fastft train stopped on transformers' error from the packing probe and the token-row count."""
    from transformers import BartConfig, BartForCausalLM

    config = BartConfig(vocab_size=256, d_model=32, decoder_layers=1, encoder_layers=1, decoder_attention_heads=4,
                        encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64, is_decoder=True)
    model = BartForCausalLM(config).eval()
    assert token_rows(model, None) == 256
    packing_isolates(model, False)  # answers (whatever it finds) instead of raising


def test_a_model_with_its_own_attention_table_is_a_one_line_error(tmp_path, capsys):
    """Falcon (and GPT-Neo) look their attention class up in a table of their own: --attn-implementation fastft
    stopped on transformers' KeyError: 'fastft'."""
    from transformers import AutoTokenizer, FalconConfig, FalconForCausalLM

    from fastft.apps.cli import main
    from fastft.apps.models import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    FalconForCausalLM(FalconConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4)).save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--model", str(tmp_path / "falcon"), "--attn-implementation", "fastft", "--steps", "1",
              "--output-dir", str(tmp_path / "run")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "picks its attention from its own table of classes" in err and "Traceback" not in err
