"""fastft where transformers.Trainer (and user code) treats the loss and the model as plain ones:

- every fused loss can be changed in place (`loss *= w`: Trainer's average_tokens_across_devices, on by default),
  eager and compiled, with the gradients of the scaled loss (fp64 plain-torch references);
- a patched model trains under Trainer's default arguments, and Trainer.predict gets the unpatched model's logits
  (not in training mode the patched forward keeps the model's own head and loss; `skip_logits` overrides);
- peft's trainable tokens on a tied lm_head (trainable_token_indices) train through the fused loss like peft's own
  forward; a head the fused loss refuses (DoRA) keeps the model's own loss, with one warning.
"""
import copy
import warnings

import numpy as np
import peft
import pytest
import torch
from peft import LoraConfig
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import fastft
from fastft.ops import (linear_cross_entropy, linear_cross_entropy_reference, linear_dpo_loss,
                        linear_dpo_loss_reference, linear_kl_div, linear_kl_div_reference, linear_sequence_logprobs,
                        linear_sequence_logprobs_reference, lm_head_cross_entropy)
from tests.train_utils import one_thread, save_tiny_checkpoint  # noqa: F401 (fixture)
from tests.utils import rel_err, tiny_llama

SCALE = 2.5
H, V = 16, 37


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 5, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    th, tw = torch.randn(3, 5, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    y = torch.randint(0, V, (3, 5), generator=g)
    y[0, :2] = -100
    return h, w, th, tw, y


def _dpo(fn):
    """DPO's loss with rows 0-1 chosen and 1-2 rejected (row 1 in both: its gradient sums the two)."""
    def loss(h, w, y):
        ref = torch.tensor([-40.0, -45.0, -38.0, -41.0], dtype=h.dtype)
        return fn(h[:2], h[1:], w, y[:2], y[1:], ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])[0]
    return loss


# (fused loss, its fp64 reference): functions of (hidden, weight, teacher hidden, teacher weight, labels)
LOSSES = {
    "ce_mean": (lambda h, w, th, tw, y: linear_cross_entropy(h, w, y, backend="torch"),
                lambda h, w, th, tw, y: linear_cross_entropy_reference(h, w, y)),
    "ce_sum": (lambda h, w, th, tw, y: linear_cross_entropy(h, w, y, reduction="sum", backend="torch"),
               lambda h, w, th, tw, y: linear_cross_entropy_reference(h, w, y, reduction="sum")),
    "ce_none": (lambda h, w, th, tw, y: linear_cross_entropy(h, w, y, reduction="none", backend="torch"),
                lambda h, w, th, tw, y: linear_cross_entropy_reference(h, w, y, reduction="none")),
    "ce_num_items": (lambda h, w, th, tw, y: linear_cross_entropy(h, w, y, num_items=40, backend="torch"),
                     lambda h, w, th, tw, y: linear_cross_entropy_reference(h, w, y, num_items=40)),
    "lm_head": (lambda h, w, th, tw, y: lm_head_cross_entropy(h, _linear(w), y, backend="torch"),
                lambda h, w, th, tw, y: linear_cross_entropy_reference(h, w, y)),
    "kl_mean": (lambda h, w, th, tw, y: linear_kl_div(h, w, th, tw, labels=y, backend="torch"),
                lambda h, w, th, tw, y: linear_kl_div_reference(h, w, th, tw, labels=y)),
    "kl_none": (lambda h, w, th, tw, y: linear_kl_div(h, w, th, tw, reduction="none", backend="torch"),
                lambda h, w, th, tw, y: linear_kl_div_reference(h, w, th, tw, reduction="none")),
    "logprobs": (lambda h, w, th, tw, y: linear_sequence_logprobs(h, w, y, backend="torch"),
                 lambda h, w, th, tw, y: linear_sequence_logprobs_reference(h, w, y)),
    "dpo": (lambda h, w, th, tw, y: _dpo(linear_dpo_loss)(h, w, y),
            lambda h, w, th, tw, y: _dpo(linear_dpo_loss_reference)(h, w, y)),
}


def _linear(w):
    """An nn.Linear whose weight is w itself (its gradient reaches w)."""
    head = nn.Linear(w.shape[1], w.shape[0], bias=False)
    del head.weight
    head.weight = w
    return head


def _reference_grads(reference, h, w, th, tw, y):
    """The fp64 reference loss and its (hidden, weight) gradients."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = reference(h64, w64, th.double(), tw.double(), y)
    return (loss.detach(), *torch.autograd.grad(loss.sum(), (h64, w64)))


def _assert_scaled_in_place_gives_scaled_gradients(fused, reference, seed=0):
    h, w, th, tw, y = _problem(seed)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = fused(h, w, th, tw, y)
    loss *= SCALE  # what Trainer.compute_loss does; a view output of a custom autograd Function refused it
    loss.sum().backward()
    want, want_h, want_w = _reference_grads(reference, h, w, th, tw, y)
    assert rel_err(loss.detach().double(), SCALE * want) <= 1e-5
    assert rel_err(h.grad.double(), SCALE * want_h) <= 2e-5
    assert rel_err(w.grad.double(), SCALE * want_w) <= 2e-5


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fused_losses_can_be_scaled_in_place(name):
    _assert_scaled_in_place_gives_scaled_gradients(*LOSSES[name])


@pytest.mark.parametrize("name", ["ce_mean", "ce_none", "kl_mean"])
def test_compiled_fused_losses_can_be_scaled_in_place(name):
    """The traced door (the custom ops of fastft.ops.linear_losses_compiled), its output changed in place outside
    the compiled function, as Trainer does with a compiled model's loss."""
    fused, reference = LOSSES[name]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    _assert_scaled_in_place_gives_scaled_gradients(torch.compile(fused, backend=backend, fullgraph=True), reference,
                                                   seed=1)
    op = "linear_row_losses" if name.endswith("none") else "linear_loss"
    assert f"torch.ops.fastft.{op}." in "\n".join(graphs)  # the traced door, not the eager Function


# ----------------------------------------------------------------------------------------------
# the patched causal LM

def _batch(seed, rows=2, length=9, vocab=128, prompt=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def _trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_patched_loss_scaled_in_place_gives_scaled_gradients():
    model = tiny_llama().train()
    patched = fastft.patch_model(copy.deepcopy(model))
    ids, labels = _batch(0)
    model(input_ids=ids, labels=labels).loss.backward()
    out = patched(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(11))
    assert out.logits is None  # the fused loss
    loss = out.loss
    loss *= SCALE
    loss.backward()
    want = _trainable_grads(model)
    got = _trainable_grads(patched)
    assert got.keys() == want.keys()
    for name, g in got.items():  # unpatched: loss / 12 counted tokens; patched: (loss / 11) · 2.5
        assert rel_err(g, want[name] * SCALE * 12 / 11) <= 1e-4, name


def _records(n=8, length=15, seed=1):
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n):
        ids = torch.randint(3, 2000, (length,), generator=g)
        labels = ids.clone()
        labels[:5] = -100  # a prompt that does not count
        records.append({"input_ids": ids, "labels": labels})
    return records


def _trainer(model, out_dir, **kwargs):
    """A Trainer with transformers' defaults but for the CPU, the logging and the run's length."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(out_dir), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1,
                             max_steps=2, seed=0, **kwargs)
    return Trainer(model=model, args=args, train_dataset=_records(), eval_dataset=_records(seed=2))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _load(path, patch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return fastft.patch_model(model) if patch else model


def test_trainer_trains_a_patched_model_with_default_arguments(tiny_ckpt, tmp_path, one_thread):  # noqa: F811
    """average_tokens_across_devices (loss *= ...) and remove_unused_columns (the forward's signature) on, as by
    default: the patched model's steps equal the unpatched model's."""
    losses = {}
    for patch in (False, True):
        trainer = _trainer(_load(tiny_ckpt, patch), tmp_path / str(patch))
        assert trainer.args.average_tokens_across_devices and trainer.args.remove_unused_columns
        trainer.train()
        losses[patch] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses[True]) == 2
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_trainer_predict_gets_the_unpatched_logits(tiny_ckpt, tmp_path, one_thread):  # noqa: F811
    def accuracy(p):
        predicted, labels = np.argmax(p.predictions, -1)[:, :-1], p.label_ids[:, 1:]
        counted = labels != -100
        return {"accuracy": float((predicted[counted] == labels[counted]).mean())}

    results = {}
    for patch in (False, True):
        trainer = _trainer(_load(tiny_ckpt, patch), tmp_path / str(patch))
        trainer.compute_metrics = accuracy
        results[patch] = trainer.predict(_records(seed=3))
    got, want = results[True], results[False]
    assert got.predictions.shape == want.predictions.shape == (8, 15, want.predictions.shape[-1])
    assert rel_err(torch.from_numpy(got.predictions), torch.from_numpy(want.predictions)) <= 1e-5
    assert got.metrics["test_accuracy"] == want.metrics["test_accuracy"]
    assert abs(got.metrics["test_loss"] - want.metrics["test_loss"]) <= 1e-5 * want.metrics["test_loss"]


def test_skip_logits_chooses_the_loss_path_whatever_the_mode():
    model = tiny_llama()
    patched = fastft.patch_model(copy.deepcopy(model))
    ids, labels = _batch(4)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    with torch.no_grad():
        want = model.eval()(input_ids=ids, labels=labels)
        for mode in ("eval", "train"):
            getattr(patched, mode)()
            own = patched(input_ids=ids, labels=labels, skip_logits=False)
            fused = patched(input_ids=ids, labels=labels, skip_logits=True)
            default = patched(input_ids=ids, labels=labels)
            assert fused.logits is None and (default.logits is None) == (mode == "train")
            assert rel_err(own.logits, want.logits) <= 1e-5
            for out in (own, fused, default):
                assert abs(out.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
        patched.eval()  # shift_labels alone: a loss in eval mode too (the model's own, from its logits)
        only_shifted = patched(input_ids=ids, shift_labels=shifted)
        assert rel_err(only_shifted.logits, want.logits) <= 1e-5
        assert abs(only_shifted.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        patched(input_ids=ids, skip_logits=True)


# ----------------------------------------------------------------------------------------------
# lm_heads: peft's trainable tokens (fused), a head the fused loss refuses (the model's own loss)

def test_trainable_tokens_on_a_tied_head_train_through_the_fused_loss():
    """trainable_token_indices with tied embeddings: peft wraps lm_head in a TrainableTokensWrapper whose weight is
    the embedding with the trainable rows swapped in; the fused loss gets that weight, the deltas their gradients."""
    def build():
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=[5, 7, 9])
        model = peft.get_peft_model(tiny_llama(tie_word_embeddings=True).train(), config)
        with torch.no_grad():  # deltas away from the embedding rows they start as, so a wrong weight shows
            for name, p in model.named_parameters():
                if "trainable_tokens_delta" in name or "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.5)
        return model

    ids, labels = _batch(6)
    ids[0, 4:7] = torch.tensor([5, 7, 9])  # the trainable tokens as inputs and as labels
    labels[0, 4:8] = torch.tensor([5, 7, 9, 7])
    model, patched = build(), fastft.patch_model(build())
    assert type(patched.get_base_model().lm_head).__name__ == "TrainableTokensWrapper"
    want = model(input_ids=ids, labels=labels)
    want.loss.backward()
    got = patched(input_ids=ids, labels=labels)
    assert got.logits is None  # fused
    got.loss.backward()
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    want_grads, got_grads = _trainable_grads(model), _trainable_grads(patched)
    assert got_grads.keys() == want_grads.keys()
    assert any("trainable_tokens_delta" in n for n in got_grads)
    for name, g in got_grads.items():
        assert rel_err(g, want_grads[name]) <= 1e-4, name
    with torch.no_grad(), model.disable_adapter(), patched.disable_adapter():  # the base head alone, fused too
        off = model(input_ids=ids, labels=labels).loss
        assert abs(patched(input_ids=ids, labels=labels).loss.item() - off.item()) <= 1e-5 * off.item()
        assert abs(off.item() - want.loss.item()) > 1e-3  # the deltas made a difference


def test_a_head_the_fused_loss_refuses_keeps_the_models_own_loss_with_one_warning():
    """DoRA on lm_head: the patched forward used to raise at the first labelled step."""
    def build():
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], use_dora=True)
        return fastft.get_peft_model(tiny_llama().train(), config)

    ids, labels = _batch(8)
    model, patched = build(), fastft.patch_model(build())
    want = model(input_ids=ids, labels=labels)
    want.loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = patched(input_ids=ids, labels=labels)
        patched(input_ids=ids, labels=labels)
    messages = [str(w.message) for w in caught if "fastft.patch_model" in str(w.message)]
    assert len(messages) == 1 and "unfused" in messages[0] and "LoRA variant" in messages[0]
    got.loss.backward()
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    want_grads = _trainable_grads(model)
    for name, g in _trainable_grads(patched).items():
        assert rel_err(g, want_grads[name]) <= 1e-4, name
