"""Activation checkpointing under torch.compile: non-reentrant checkpointing needs no hook making the embedding's
output require grad, and transformers 5 adds one anyway; its requires_grad_ on a frozen embedding's output stops
torch.compile(fullgraph=True) ("returning intermediate with requires_grad_()") and breaks the graph without it.
fastft.prepare_model_for_kbit_training(use_reentrant=False) and `fastft train --gradient-checkpointing` leave no
such hook: one graph, eager's gradients. Backend aot_eager keeps the CPU cost down."""
import contextlib
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

import fastft
from fastft.apps.cli import main
from tests.train_utils import save_tiny_checkpoint


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(config)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n.replace("_orig_mod.", ""): p.grad.clone()
                           for n, p in model.named_parameters() if p.grad is not None}


def _compiled_grads_equal_eager(model) -> set:
    """One training step eagerly and under torch.compile(fullgraph=True): equal loss and gradients. Returns the
    names of the parameters that got gradients."""
    model.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    want_loss, want_grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    got_loss, got_grads = _loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True), ids)
    torch.testing.assert_close(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name])
    return set(want_grads)


def test_prepared_non_reentrant_model_compiles_fullgraph_with_eager_gradients():
    model = fastft.prepare_model_for_kbit_training(_tiny_llama(),
                                                   gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not model.get_input_embeddings()._forward_hooks
    # a weight inside the checkpointed layers trains (as a LoRA factor would); the embedding stays frozen
    model.model.layers[1].post_attention_layernorm.weight.requires_grad_(True)
    assert _compiled_grads_equal_eager(model) == {"model.layers.1.post_attention_layernorm.weight"}


def test_qlora_order_prepare_then_get_peft_model_compiles_fullgraph():
    """The usual QLoRA order: peft's wrap hooks the checkpointed model's embedding again; fastft's wrap drops that
    hook too when the checkpointing is non-reentrant."""
    from peft import LoraConfig

    model = fastft.prepare_model_for_kbit_training(_tiny_llama(),
                                                   gradient_checkpointing_kwargs={"use_reentrant": False})
    model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not model.get_input_embeddings()._forward_hooks
    assert _compiled_grads_equal_eager(model)


# transformers 5.24 renamed gradient_checkpointing_enable (which then warns); 5.17, the GPU machine's, has only it
RENAMED = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def _enable_checkpointing(base, kwargs: dict, new_name: bool = True) -> None:
    if new_name and RENAMED:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return
    warns = pytest.warns(FutureWarning, match="gradient_checkpointing_enable") if RENAMED else contextlib.nullcontext()
    with warns:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _user_hook(module, args, output):  # a forward hook of the user's own, which fastft must leave alone
    return None


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable",
                                    "enable_then_hook_again"])
def test_checkpointing_enabled_on_the_base_then_get_peft_model_compiles_fullgraph(enable):
    """The order most users write: checkpointing enabled on the base (transformers 5 hooks the embedding then, and
    `enable_input_require_grads` again replaces its record of the first hook), then fastft.get_peft_model (peft hooks
    it once more). Non-reentrant, the wrap removes all of those hooks, and only those: one graph, eager's gradients."""
    from peft import LoraConfig

    base = _tiny_llama()
    kwargs = {"use_reentrant": False}
    _enable_checkpointing(base, kwargs, new_name=enable == "activation_checkpointing_enable")
    if enable == "enable_then_hook_again":
        base.enable_input_require_grads()
    user = base.get_input_embeddings().register_forward_hook(_user_hook)
    model = fastft.get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert list(model.get_input_embeddings()._forward_hooks.values()) == [_user_hook]
    assert not base._require_grads_hooks
    user.remove()
    layer0_lora = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert layer0_lora in _compiled_grads_equal_eager(model)


def test_reentrant_checkpointing_on_the_base_keeps_its_input_grad_hook_through_get_peft_model():
    """Reentrant checkpointing needs the embedding's output to require grad (else layer 0's adapters get no gradient):
    the wrap leaves the hooks there."""
    from peft import LoraConfig

    base = _tiny_llama()
    _enable_checkpointing(base, {"use_reentrant": True})
    model = fastft.get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    assert model.get_input_embeddings()._forward_hooks
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    _, grads = _loss_and_grads(model, ids)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in grads


def test_user_hook_for_reentrant_checkpoint_wrapper_stays_through_get_peft_model():
    """peft's recipe for reentrant checkpointing outside transformers: `enable_input_require_grads`, then torch's
    reentrant checkpoint_wrapper on the decoder layers. Without transformers' checkpointing the wrap keeps the hook:
    every LoRA factor gets peft's own gradient (without the hook the loss does not even require grad)."""
    from functools import partial

    import peft
    from peft import LoraConfig
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))

    def lora_grads(wrap):
        base = _tiny_llama().train()
        base.enable_input_require_grads()
        apply_activation_checkpointing(base, check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
                                       checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                     checkpoint_impl=CheckpointImpl.REENTRANT))
        model = wrap(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        torch.manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        loss = model(input_ids=ids, labels=ids).loss
        assert loss.requires_grad
        loss.backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
                if p.requires_grad}

    want, got = lora_grads(peft.get_peft_model), lora_grads(fastft.get_peft_model)
    assert got.keys() == want.keys() and len(want) == 8
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_prepared_reentrant_model_has_one_removable_input_grad_hook():
    """Reentrant checkpointing keeps its hook, registered once: disable_input_require_grads removes it (a second
    registration used to replace the first in transformers' record, which then stayed on the embedding)."""
    model = fastft.prepare_model_for_kbit_training(_tiny_llama())
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    model.disable_input_require_grads()
    assert not model.get_input_embeddings()._forward_hooks


def test_train_compiled_with_checkpointing_is_one_graph_with_eager_losses(tmp_path):
    tiny = save_tiny_checkpoint(tmp_path / "tiny", layers=1)
    data = tmp_path / "same.jsonl"  # documents of one token count: one packed shape, one compilation
    data.write_text("".join(json.dumps({"text": f"word{i % 7} and the other {i % 5} things go"}) + "\n"
                            for i in range(12)))
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "default", "--compile-backend", "aot_eager"])):
        argv = ["train", "--model", str(tiny), "--data", str(data), "--method", "lora", "--steps", "2",
                "--batch-size", "3", "--eval-examples", "0", "--max-length", "24", "--lr", "3e-3",
                "--gradient-checkpointing", "--seed", "1", "--output-dir", str(tmp_path / name)]
        assert main([*argv, *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    record = runs["compiled"]["compile"]
    assert record["compiled"] and record["graphs"] == 1 and record["graph_breaks"] == 0, record
    assert runs["compiled"]["train_losses"] == pytest.approx(runs["eager"]["train_losses"], rel=1e-5)
