"""A bottleneck-adapter model under transformers.Trainer's defaults: the wrapper's forward was `(*args, **kwargs)`,
so Trainer (remove_unused_columns=True) dropped every dataset column: "The batch received was empty". It shows the
base model's forward signature now (as peft's PeftModel does through its base model), and still pickles and
copies."""
import copy
import pickle

import torch
import transformers
from transformers import Trainer, TrainingArguments

import fastft
from fastft import BottleneckAdapterConfig
from fastft.integration.methods.adapter.model import BottleneckAdapterModel
from tests.utils import tiny_llama


def test_trainer_keeps_the_columns_the_base_model_takes(tmp_path):
    transformers.logging.set_verbosity_error()
    model = fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(size=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        ids = torch.randint(3, 128, (10,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone(), "source": "not a model input"})
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, max_steps=2,
                             per_device_train_batch_size=2, save_strategy="no", learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_the_wrapper_pickles_and_copies_with_its_signature():
    model = fastft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(size=8))
    assert isinstance(model, BottleneckAdapterModel) and "input_ids" in str(model.forward.__signature__)
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(other) is type(model) and other.base_model is not model.base_model
            assert torch.equal(other(input_ids=ids).logits, want)
