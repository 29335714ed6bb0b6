"""A bottleneck-adapter model under transformers.Trainer's checkpointing. Trainer saves with `save_pretrained` only a
PreTrainedModel or a peft PeftModel; the old wrapper was neither, so a checkpoint was a raw state dict of the whole
model (model.safetensors), and with tied embeddings (SmolLM2, most small Llamas) safetensors refused to write it:
"Some tensors share memory". The wrapper is a PeftModel to Trainer now: checkpoints hold the adapter in fastft's
format, and resume_from_checkpoint / load_best_model_at_end reload it through its `load_adapter`."""
import copy

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Trainer

import fastft
from fastft import BottleneckAdapterConfig
from tests.train_utils import trainer_args, trainer_records
from tests.utils import tiny_llama


def _build(base, size=8):
    torch.manual_seed(123)
    return fastft.get_peft_model(copy.deepcopy(base), BottleneckAdapterConfig(size=size, placement="houlsby"))


def _args(folder, **kw):
    return trainer_args(folder, **{"logging_steps": 1, **kw})


def _adapter(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("tied", [True, False])
def test_a_checkpoint_holds_the_adapter_as_save_adapter_writes_it(tmp_path, tied):
    transformers.logging.set_verbosity_error()
    base = tiny_llama(tie_word_embeddings=tied)
    model = _build(base)
    Trainer(model=model, args=_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=trainer_records()).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}  # no whole model
    saved = load_file(checkpoint / "adapter_model.safetensors")
    trained = _adapter(model)
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in trained)
    fastft.save_adapter(model, tmp_path / "saved")
    assert (checkpoint / "adapter_config.json").read_text() == (tmp_path / "saved" / "adapter_config.json").read_text()
    ids = torch.randint(3, 128, (2, 7))
    loaded = fastft.load_adapter(copy.deepcopy(base), checkpoint)  # the checkpoint is a fastft adapter folder
    again = type(model).from_pretrained(copy.deepcopy(base), checkpoint)  # peft's spelling
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want) and torch.equal(again(input_ids=ids).logits, want)
    assert isinstance(model, PeftModel)  # what Trainer asks before it calls save_pretrained


def _losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_resume_from_checkpoint_continues_as_the_uninterrupted_run(tmp_path):
    transformers.logging.set_verbosity_error()
    base = tiny_llama(tie_word_embeddings=True)
    data = trainer_records()
    full = _build(base)
    uninterrupted = Trainer(model=full, args=_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                            train_dataset=data)
    uninterrupted.train()
    resumed = _build(base)  # the initial adapter: only the checkpoint's weights can make it end as `full` does
    trainer = Trainer(model=resumed, args=_args(tmp_path, max_steps=4, save_strategy="no"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    want, got = _adapter(full), _adapter(resumed)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # steps 1-2 come with the checkpoint's trainer state; 3-4 are the resumed run's own, equal to the bit
    assert sorted(_losses(trainer)) == [1, 2, 3, 4] and _losses(trainer) == _losses(uninterrupted)
    assert all(p.requires_grad for n, p in resumed.named_parameters() if ".adapter." in n)


def test_load_best_model_at_end_reloads_the_best_checkpoints_adapter(tmp_path):
    transformers.logging.set_verbosity_error()
    model = _build(tiny_llama(tie_word_embeddings=True))
    data = trainer_records()
    # the highest eval loss is the best: the first checkpoint (training lowers it), not the weights training ends on
    args = _args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved, final = load_file(f"{best}/adapter_model.safetensors"), load_file(
        tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(saved[k], final[k]) for k in saved)
    now = _adapter(model)
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapter." in n)


def test_load_adapter_takes_only_an_adapter_of_the_models_config(tmp_path):
    base = tiny_llama()
    fastft.save_adapter(_build(base, size=4), tmp_path / "size4")
    model = _build(base)
    before = _adapter(model)
    with pytest.raises(ValueError, match=r"holds a bottleneck adapter with size=4, but the model's adapter has "
                                         r"size=8: its weights cannot be loaded into it"):
        model.load_adapter(str(tmp_path / "size4"), "default", is_trainable=True)
    with pytest.raises(ValueError, match="holds one adapter, 'default'"):
        model.load_adapter(str(tmp_path / "size4"), "other")
    assert all(torch.equal(v, before[k]) for k, v in _adapter(model).items())
