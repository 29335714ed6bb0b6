"""Prompt tuning / P-tuning with task_type SEQ_CLS (fastft refused it; peft runs it): against peft's own on a
classifier Llama and BERT — logits, loss and every gradient, saves both ways. peft pools a decoder's last position,
a padding token on a right-padded row (it passes inputs_embeds, which hide the padding from the head); fastft
pools the row's last real token, so a right-padded row classifies as the row alone."""
import peft
import pytest
import torch
from peft import PromptEncoderConfig, PromptTuningConfig

import fastft
from tests.methods_utils import copy_trainables, perturb_trainables
from tests.utils import assert_close

CONFIGS = {"prompt": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
           "p-tuning": lambda: PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=32)}


def llama_classifier(attn_implementation="sdpa"):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    fastft.register_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_labels=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation).eval()


def bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=96, num_labels=3,
                                                    max_position_embeddings=64)).eval()


def pair(make_model, kind):
    ours = fastft.get_peft_model(make_model(), CONFIGS[kind]())
    theirs = peft.get_peft_model(make_model(), CONFIGS[kind]())
    perturb_trainables(ours)
    copy_trainables(ours, theirs)
    return ours, theirs


def batch(left_padded: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    for row, pads in ((1, 2), (2, 4)):
        if left_padded:
            ids[row, :pads], mask[row, :pads] = 0, 0
        else:
            ids[row, -pads:], mask[row, -pads:] = 0, 0
    return ids, mask


def logits_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("make_model", [llama_classifier, bert_classifier], ids=["llama", "bert"])
def test_matches_peft_where_peft_pools_right(make_model, kind):
    ours, theirs = pair(make_model, kind)
    ids, mask = batch(left_padded=make_model is llama_classifier)
    (logits, grads), (want, want_grads) = logits_and_grads(ours, ids, mask), logits_and_grads(theirs, ids, mask)
    assert_close(logits, want, torch.float32, f"{kind} logits")
    assert set(grads) == set(want_grads) and any("score" in n or "classifier" in n for n in grads)
    for name in grads:
        assert_close(grads[name], want_grads[name], torch.float32, f"{kind} grad {name}")


@pytest.mark.parametrize("attn", ["sdpa", "fastft"])
def test_a_right_padded_row_classifies_as_the_row_alone(attn):
    ours, theirs = pair(lambda: llama_classifier(attn), "prompt")
    ids, mask = batch(left_padded=False)
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        alone = torch.cat([theirs(input_ids=ids[r:r + 1, :int(mask[r].sum())]).logits for r in range(3)])
        assert_close(logits, alone, torch.float32, "right-padded rows vs alone")
        assert not torch.allclose(theirs(input_ids=ids, attention_mask=mask).logits[1:], alone[1:], atol=1e-3)


def test_saves_and_loads_both_ways_with_peft(tmp_path):
    ours, theirs = pair(llama_classifier, "prompt")
    ids, mask = batch(left_padded=True)
    fastft.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    by_peft = peft.PeftModel.from_pretrained(llama_classifier(), str(tmp_path / "ours"))
    by_fastft = fastft.load_adapter(llama_classifier(), tmp_path / "theirs")
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        assert_close(by_peft(input_ids=ids, attention_mask=mask).logits, want, torch.float32, "fastft → peft")
        assert_close(by_fastft(input_ids=ids, attention_mask=mask).logits, want, torch.float32, "peft → fastft")
