"""Bottleneck adapters on a *ForSequenceClassification model left its fresh classifier frozen at its random
initialisation and saved nothing of it (BottleneckAdapterConfig had no task_type nor modules_to_save), where peft's
methods train and save the head. task_type="SEQ_CLS" (classifier / score) and modules_to_save now train those
modules whole, save them with the adapter and load them back; disable_adapter runs their original copies, as peft's
modules_to_save does."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from fastft.integration.methods.adapter import BottleneckAdapterConfig, get_adapter_model
from fastft.integration.methods.adapter.model import load_bottleneck_adapter

BERT_TARGETS = dict(attn_output_modules=("attention.output.dense",),
                    mlp_output_modules=r".*[.]layer[.][0-9]+[.]output[.]dense")


def _bert(seed):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return dict(input_ids=torch.randint(0, 128, (3, 9), generator=g), attention_mask=mask)


def test_seq_cls_trains_saves_and_loads_the_classifier(tmp_path):
    model = get_adapter_model(_bert(0), BottleneckAdapterConfig(size=8, placement="houlsby", task_type="SEQ_CLS",
                                                                **BERT_TARGETS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= trainable
    assert all(".adapter." in n or ".classifier." in n for n in trainable)
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert model.base_model.classifier.weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        trained = model(**batch).logits
        with model.disable_adapter():  # the original head and no adapters: the model as it was built
            torch.testing.assert_close(model(**batch).logits, before)
    model.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {"classifier.weight", "classifier.bias"} <= saved.keys()
    fresh = _bert(0)
    torch.nn.init.normal_(fresh.classifier.weight)  # another random head: the saved one replaces it
    loaded = load_bottleneck_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained)


def test_a_llama_classifier_trains_its_score_head():
    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=2, pad_token_id=0))
    model = get_adapter_model(llama, BottleneckAdapterConfig(size=8, task_type="SEQ_CLS"))
    assert model.base_model.score.weight.requires_grad


def test_modules_to_save_trains_what_it_names_and_a_typo_is_refused():
    model = get_adapter_model(_bert(0), BottleneckAdapterConfig(size=8, modules_to_save=("pooler.dense",),
                                                                **BERT_TARGETS))
    assert model.base_model.bert.pooler.dense.weight.requires_grad
    assert not model.base_model.classifier.weight.requires_grad
    with pytest.raises(ValueError, match=r"modules_to_save entry 'clasifier' matches no module"):
        get_adapter_model(_bert(0), BottleneckAdapterConfig(size=8, modules_to_save=("clasifier",), **BERT_TARGETS))
    with pytest.raises(ValueError, match=r"task_type"):
        BottleneckAdapterConfig(task_type="SEQ_CLASSIFICATION")


def test_a_config_saved_before_these_fields_loads():
    saved = BottleneckAdapterConfig(size=8).to_dict()
    for field in ("modules_to_save", "task_type"):
        saved.pop(field, None)
    config = BottleneckAdapterConfig.from_dict(saved)
    assert config.modules_to_save is None and config.task_type is None
