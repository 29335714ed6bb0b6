"""prepare_model_for_kbit_training with reentrant checkpointing (peft's default) makes the embedding's output require
grad, which reentrant checkpointing of a frozen NF4 model needs for its adapters to get gradients. transformers 5
adds that hook itself when checkpointing is enabled; older transformers (the GPU machine's) does not, which this
test reproduces by removing the hook checkpointing added."""
import torch

import fastft.integration.nf4_model as nf4_model
from fastft.integration.checkpointing import input_grad_hooks
from tests.utils import tiny_llama


def test_reentrant_prepare_makes_the_embedding_output_require_grad(monkeypatch):
    real = nf4_model.enable_checkpointing

    def enable_without_input_grad_hooks(model, kwargs=None):  # as transformers before 5 enables checkpointing
        real(model, kwargs)
        for hook in input_grad_hooks(model):
            hook.remove()
        for attr in ("_require_grads_hooks", "_require_grads_hook"):
            if hasattr(model, attr):
                delattr(model, attr)

    monkeypatch.setattr(nf4_model, "enable_checkpointing", enable_without_input_grad_hooks)
    model = nf4_model.quantize_model(tiny_llama()).train()
    model = nf4_model.prepare_model_for_kbit_training(model)  # use_reentrant defaults to True, as in peft
    assert model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).requires_grad
