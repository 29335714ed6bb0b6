"""A bottleneck-adapter model has peft's module layout: `base_model` is a tuner whose `.model` is the transformers
model. transformers' Trainer reads `peft_model.base_model.model` for label smoothing (is it a causal LM, whose labels
shift?) and NEFTune (its input embeddings). When `base_model` was the transformers model itself, a Llama's
`base_model.model` was its decoder (LlamaModel: no causal-LM name, so the labels were not shifted, a silently wrong
loss) and GPT-2's had none (AttributeError for both options)."""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import fastft
from fastft import BottleneckAdapterConfig
from tests.utils import tiny_llama

VOCAB = 128


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      initializer_range=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


# a wide initialisation: logits far from uniform, so shifted and unshifted losses differ clearly
BASES = {"llama": lambda: tiny_llama(initializer_range=0.5), "gpt2": _gpt2}
CONFIGS = {"llama": BottleneckAdapterConfig(size=8),
           "gpt2": BottleneckAdapterConfig(size=8, mlp_output_modules=("mlp.c_proj",))}


def _wrapped(arch, base=None):
    return fastft.get_peft_model(base if base is not None else BASES[arch](), copy.deepcopy(CONFIGS[arch]))


def _records(n=2, length=10):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[-3:] = -100  # ignored positions count in neither loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def _args(folder, max_steps=1, **kw):
    return TrainingArguments(str(folder), use_cpu=True, report_to=[], disable_tqdm=True, per_device_train_batch_size=2,
                             seed=0, learning_rate=1e-2, logging_steps=1, save_strategy="no", max_steps=max_steps,
                             **kw)


def _smoothed(logits, labels, shift: bool, epsilon=0.1):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=epsilon).item()


@pytest.mark.parametrize("arch", BASES)
def test_trainers_label_smoothing_shifts_a_causal_lms_labels(tmp_path, arch):
    transformers.logging.set_verbosity_error()
    plain = BASES[arch]()
    model = _wrapped(arch, copy.deepcopy(plain))
    records = _records()
    batch = {k: torch.stack([r[k] for r in records]) for k in records[0]}
    with torch.no_grad():
        logits = model.train()(input_ids=batch["input_ids"]).logits
    want, unshifted = _smoothed(logits, batch["labels"], True), _smoothed(logits, batch["labels"], False)
    assert abs(want - unshifted) > 0.05  # the check below tells them apart
    args = _args(tmp_path, label_smoothing_factor=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=records)
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(want, rel=1e-5)
    # a training step as Trainer runs it for the plain model (the adapter adds nothing at initialisation): the same
    # loss (over the valid labels Trainer counts, unshifted for GPT-2, whose loss_type transformers leaves unset)
    logged = _logged_losses(Trainer(model=model, args=args, train_dataset=records))
    assert logged == _logged_losses(Trainer(model=plain, args=args, train_dataset=records)) and len(logged) == 1


def _logged_losses(trainer):
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


class _EmbeddingNoise(TrainerCallback):
    """Records, at every training forward, how far the input embeddings' output is from the plain lookup: hooked at
    on_train_begin, after Trainer hooked NEFTune's noise on (hooks run in order, so this one sees the noise)."""

    def __init__(self, embeddings):
        self.embeddings, self.noise, self.handle = embeddings, [], None

    def on_train_begin(self, *args, **kwargs):
        def record(module, inputs, output):
            self.noise.append((output - F.embedding(inputs[0], module.weight)).detach().abs().max().item())
        self.handle = self.embeddings.register_forward_hook(record)

    def on_train_end(self, *args, **kwargs):
        self.handle.remove()


@pytest.mark.parametrize("arch", BASES)
def test_neftune_noises_the_input_embeddings_while_training_only(tmp_path, arch):
    transformers.logging.set_verbosity_error()
    model = _wrapped(arch)
    embeddings = model.get_base_model().get_input_embeddings()
    seen = _EmbeddingNoise(embeddings)
    records = _records()
    Trainer(model=model, args=_args(tmp_path, neftune_noise_alpha=5.0, max_steps=2), train_dataset=records,
            callbacks=[seen]).train()
    bound = 5.0 / (10 * embeddings.weight.shape[1]) ** 0.5  # NEFTune's alpha / sqrt(length * width)
    assert len(seen.noise) == 2 and all(0 < n <= bound * (1 + 1e-5) for n in seen.noise)
    assert not hasattr(embeddings, "neftune_noise_alpha")  # taken off after training
    ids = records[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(embeddings.train()(ids), F.embedding(ids, embeddings.weight))


def test_the_wrapper_has_peft_layout_and_runs_under_functional_call():
    model = _wrapped("llama").eval()
    base = model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM" and model.base_model.model is base
    keys = list(model.state_dict())
    assert keys and all(k.startswith("base_model.model.") for k in keys)
    assert {k.removeprefix("base_model.model.") for k in keys} == set(base.state_dict())
    assert set(model.adapter_state_dict()) <= set(base.state_dict())  # the adapter file keeps the model's own keys
    ids = torch.randint(0, VOCAB, (1, 6))
    params = {k: torch.randn_like(v) * 0.1 if ".adapter.up" in k else v for k, v in model.named_parameters()}
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.func.functional_call(model, params, (), {"input_ids": ids}).logits
        assert not torch.equal(got, want)  # the given adapter weights were used...
        assert torch.equal(model(input_ids=ids).logits, want)  # ...and the model's own left alone


def test_fastft_train_patches_the_transformers_model_inside_the_wrapper():
    """--patch-model: patch_model records its changes on the transformers model inside the wrapper, as inside peft's,
    and fastft train reads the record there."""
    from fastft.apps.training.config import TrainConfig
    from fastft.apps.training.run_setup import maybe_patch

    model, lines = _wrapped("llama"), []
    assert maybe_patch(model, TrainConfig(patch_model="on"), torch.device("cpu"), lines.append)
    assert len(lines) == 1 and lines[0].startswith("patched by fastft.patch_model: llama:")
    assert "_fastft_patch" in model.get_base_model().__dict__ and "_fastft_patch" not in model.__dict__
    fastft.unpatch_model(model)
