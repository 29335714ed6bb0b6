"""A head a method trains whole (a modules_to_save entry, or the head task_type adds) that was quantized to NF4
(quantize_model(use_default_skip=False)) is refused up front, naming it and the way to keep it dense, with the
model left as it was. LoRA refused it for SEQ_CLS / TOKEN_CLS only: QUESTION_ANS (qa_outputs), IA3 (any trained
head) and bottleneck adapters with a task head failed late with NF4Weight's "frozen: it cannot require gradients",
leaving lora_A / ia3_l layers or AdapterAfter wrappers in the user's model."""
import warnings

import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig

import fastft


def _bert(model_class, **overrides):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, **overrides)
    model = model_class(config)
    fastft.quantize_model(model, "nf4", use_default_skip=False)
    return model


CASES = {
    "lora-qa": (transformers.BertForQuestionAnswering, {"num_labels": 2},
                lambda: LoraConfig(r=4, target_modules=["query", "value"], task_type="QUESTION_ANS"),
                r"LoraConfig.task_type='QUESTION_ANS' trains its head 'qa_outputs' whole: 'qa_outputs', which is or "
                r"holds an NF4 .* skip=\['qa_outputs'\]\) \(a model transformers quantizes: "
                r"BitsAndBytesConfig\(\.\.\., llm_int8_skip_modules=\['qa_outputs'\]\)\); or adapt it with LoRA"),
    "ia3-token": (transformers.BertForTokenClassification, {"num_labels": 5},
                  lambda: IA3Config(target_modules=["key", "value"], feedforward_modules=[], task_type="TOKEN_CLS"),
                  r"IA3Config.task_type='TOKEN_CLS' trains its head 'classifier' whole: 'classifier', which is or "
                  r"holds an NF4 .* skip=\['classifier'\]\) \(.*llm_int8_skip_modules=\['classifier'\]\)\)$"),
    "ia3-modules_to_save": (transformers.BertModel, {},
                            lambda: IA3Config(target_modules=["key", "value"], feedforward_modules=[],
                                              modules_to_save=["pooler.dense"]),
                            r"IA3Config.modules_to_save entry 'pooler.dense' names 'pooler.dense', which is or holds "
                            r"an NF4 .* skip=\['pooler.dense'\]\) \(.*llm_int8_skip_modules=\['pooler.dense'\]\)\)$"),
    "adapter-qa": (transformers.BertForQuestionAnswering, {"num_labels": 2},
                   lambda: fastft.BottleneckAdapterConfig(size=4, mlp_output_modules=r".*\.layer\.\d+\.output\.dense",
                                                          task_type="QUESTION_ANS"),
                   r"BottleneckAdapterConfig.task_type='QUESTION_ANS' trains its head 'qa_outputs' whole"),
}


@pytest.mark.parametrize("case", CASES)
def test_an_nf4_head_trained_whole_is_refused_before_the_model_changes(case):
    model_class, overrides, config, message = CASES[case]
    model = _bert(model_class, **overrides)
    before = [(name, type(m)) for name, m in model.named_modules()]
    with warnings.catch_warnings(), pytest.raises(ValueError, match=message):
        warnings.simplefilter("ignore")
        fastft.get_peft_model(model, config())
    assert [(name, type(m)) for name, m in model.named_modules()] == before


def test_a_dense_head_still_trains_whole():
    """The way the error names: the head kept dense trains (its weight gets a gradient)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)
    model = fastft.quantize_model(transformers.BertForQuestionAnswering(config), "nf4", skip=["qa_outputs"])
    model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="QUESTION_ANS"))
    out = model(input_ids=torch.randint(3, 96, (2, 7)), start_positions=torch.tensor([1, 2]),
                end_positions=torch.tensor([3, 4]))
    out.loss.backward()
    trained = [n for n, p in model.named_parameters() if "qa_outputs" in n and p.grad is not None]
    assert trained and all("modules_to_save" in n for n in trained)
