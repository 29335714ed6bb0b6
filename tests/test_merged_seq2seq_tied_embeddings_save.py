"""A merge into a tied word embedding gives the adapted layer its own copy and says tie_word_embeddings=False, which
in transformers unties all of a model's word embeddings. An encoder-decoder ties more than lm_head to them (BART's
encoder and decoder embed_tokens share `shared`): those still held one tensor, the checkpoint stored it once, and
the reload left the rest at random init (BART with LoRA on lm_head, merged, saved and reloaded: logits 1.0 off the
adapted model's; mBART, PLBart, Blenderbot, Pegasus, Marian alike; T5 with LoRA on `shared` 0.42). Now every word
embedding still sharing gets its own copy too, and merge_adapter + unmerge_adapter ties them all back."""
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig

import fastft


def _bart(config_class=transformers.BartConfig, model_class=transformers.BartForConditionalGeneration):
    torch.manual_seed(0)
    config = config_class(vocab_size=96, pad_token_id=1, decoder_start_token_id=2, d_model=32, encoder_layers=1,
                          decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0)
    return model_class(config).eval()


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


CASES = {
    "bart-lm_head": (_bart, ["q_proj", "lm_head"]),
    "bart-embed_tokens": (_bart, ["q_proj", "embed_tokens"]),
    "marian-lm_head": (lambda: _bart(transformers.MarianConfig, transformers.MarianMTModel), ["q_proj", "lm_head"]),
    "t5-shared": (_t5, ["q", "shared"]),
    "t5-lm_head": (_t5, ["q", "lm_head"]),
}


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(input_ids=torch.randint(3, 96, (2, 9), generator=g),
                decoder_input_ids=torch.randint(3, 96, (2, 6), generator=g))


@pytest.mark.parametrize("case", CASES)
def test_a_merged_encoder_decoder_saves_and_reloads_the_adapted_models_outputs(case, tmp_path):
    build, targets = CASES[case]
    model = fastft.get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # the embeddings' lora_embedding_B too
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    inputs = _inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = model(**inputs).logits
        merged = fastft.merge_and_unload(model)
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)
        merged.save_pretrained(tmp_path)
        reloaded = type(merged).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)


def test_merge_adapter_then_unmerge_ties_every_word_embedding_back():
    model = fastft.get_peft_model(_bart(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    base = model.get_base_model()

    def weights():
        return [base.model.shared.weight, base.model.encoder.embed_tokens.weight,
                base.model.decoder.embed_tokens.weight, base.lm_head.base_layer.weight]

    before = weights()
    assert len({id(w) for w in before}) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        assert len({id(w) for w in weights()}) == 4 and base.config.tie_word_embeddings is False
        model.unmerge_adapter()
    assert all(w is before[0] for w in weights()) and base.config.tie_word_embeddings is True
