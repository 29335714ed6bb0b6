"""After prepare_model_for_kbit_training the residual stream is fp32 and each NF4 layer computes in bf16
(fastft.ops.shared.compute_input): q, k and v (gate and up) each cast the same x and each op saved its own bf16
copy for backward, three where one does. The cast is now shared while x is unchanged, each layer keeping its own
cast node: the same loss and gradients bit for bit, fewer saved storages."""
import pytest
import torch
from peft import LoraConfig

import fastft
from fastft.ops import shared
from tests.utils import interpreter_only, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _qlora_kbit(seed=0):
    model = tiny_llama(seed).to(torch.bfloat16)
    fastft.quantize_model(model, "nf4")
    model = fastft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed + 1)
    model = fastft.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    init_lora_weights="gaussian"))
    return model.train()


def _step(model, ids):
    """(loss, every trainable parameter's gradient, the bf16 storages of the residual stream's width autograd saved)"""
    storages = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and t.dim() >= 2 and t.shape[-1] == 64 and t.numel() >= ids.numel() * 64:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(storages)


def _plain_cast(monkeypatch):
    monkeypatch.setattr(shared, "_shared_cast", lambda x, dtype: x.to(dtype))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_q_k_v_and_gate_up_share_one_cast_with_the_same_gradients(monkeypatch, backend):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", backend)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    model = _qlora_kbit()
    assert next(model.base_model.model.model.norm.parameters()).dtype == torch.float32  # kbit's fp32 stream
    shared_run = _step(model, ids)
    with monkeypatch.context() as m:
        _plain_cast(m)
        plain_run = _step(model, ids)
    assert torch.equal(shared_run[0], plain_run[0])
    assert shared_run[1].keys() == plain_run[1].keys() and len(shared_run[1]) == 2 * len(TARGETS) * 2
    for name, grad in shared_run[1].items():
        assert torch.equal(grad, plain_run[1][name]), name
    # per layer: q/k/v's input, o's, gate/up's (was q, k, v, o, gate, up)
    assert (shared_run[2], plain_run[2]) == (3 * 2, 6 * 2)


def test_a_changed_x_is_cast_again():
    weight = torch.empty(2, 2, dtype=torch.bfloat16)
    x = torch.randn(3, 4)
    first = shared.compute_input(x, weight)
    assert shared.compute_input(x, weight) is first  # unchanged: the same cast
    x.add_(1.0)
    again = shared.compute_input(x, weight)
    assert torch.equal(again, x.to(torch.bfloat16)) and not torch.equal(again, first)
    first.zero_()  # a cast changed in place is not handed out either
    assert torch.equal(shared.compute_input(x, weight), x.to(torch.bfloat16))
    y = x.clone()
    assert torch.equal(shared.compute_input(y, weight), y.to(torch.bfloat16))  # another tensor: its own cast


def test_a_cast_made_without_grad_still_carries_the_gradient():
    weight = torch.empty(2, 2, dtype=torch.bfloat16)
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        kept = shared.compute_input(x, weight)
    assert kept.grad_fn is None
    cast = shared.compute_input(x, weight)
    assert cast.dtype == torch.bfloat16 and cast.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()
    (cast.float() * torch.arange(4.0)).sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, torch.arange(4.0).expand(3, 4))
    with torch.no_grad():
        assert shared.compute_input(x, weight).grad_fn is None  # not the grad-mode call's history
