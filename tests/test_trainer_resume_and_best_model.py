"""transformers.Trainer's resume_from_checkpoint and load_best_model_at_end call the PeftModel's
`load_adapter(checkpoint, "default", is_trainable=True)`, peft's reload of an adapter's weights; fastft's routed
load_adapter refused the existing name, so both crashed on LoRA / DoRA / QLoRA models (at the end of training,
for the best model). The weights now load into that adapter, as peft does; a checkpoint of other layers is refused."""
import copy

import pytest
import torch
import transformers
from peft import LoraConfig
from transformers import Trainer

import fastft
from tests.train_utils import trainer_args, trainer_records
from tests.utils import tiny_llama


def _args(folder, **kw):
    return trainer_args(folder, **{"max_steps": 4, **kw})


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_resume_from_checkpoint_ends_on_the_uninterrupted_runs_weights(tmp_path, kind):
    transformers.logging.set_verbosity_error()
    base = tiny_llama()

    def build():
        model = copy.deepcopy(base)
        if kind == "qlora":
            fastft.quantize_model(model, "nf4")
        torch.manual_seed(123)
        return fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       use_dora=kind == "dora"))

    data = trainer_records()
    full = build()
    Trainer(model=full, args=_args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=data).train()
    resumed = build()
    Trainer(model=resumed, args=_args(tmp_path, save_strategy="no"), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    trained = {n: p for n, p in full.named_parameters() if p.requires_grad}
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name


def test_load_best_model_at_end(tmp_path):
    transformers.logging.set_verbosity_error()
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = trainer_records()
    trainer = Trainer(model=model, args=_args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                                              save_steps=2, load_best_model_at_end=True),
                      train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad}  # trainable after the reload


def test_reloading_a_checkpoint_of_other_layers_into_an_adapter_is_refused(tmp_path):
    other = fastft.get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    fastft.save_adapter(other, tmp_path / "r8")
    model = fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"holds an adapter with r=8, but the model's adapter 'default' has r=4"):
        model.load_adapter(str(tmp_path / "r8"), "default")
