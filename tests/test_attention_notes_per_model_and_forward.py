"""What fastft's mask function notes for a forward's attention calls (a PhiMoE-style model's causal window, the
packed documents of a model whose layers get no position_ids) and the per-forward memo of packed documents, as a
fuzz audit found them (2026-12-06):
- gradient checkpointing recomputes attention in the backward, after whatever ran in between: a distillation
  teacher's forward (another model) or a no-grad forward of the same model replaced the one note every forward
  wrote, and the recompute ran without the window or merged the documents: gradients 10-17 off (scale 40-80),
  silently. Notes are kept per model and grad mode;
- the window note was one slot for every model: a forward of another model in another thread replaced it (logits
  0.25 off);
- the memo of packed documents keyed on the position_ids tensor and its version counter: a buffer rewritten through
  .data (or NumPy) kept the last forward's documents (logits 0.4 off). It is kept for one forward."""
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTBigCodeConfig, LlamaConfig, PhimoeConfig

import fastft
from fastft.integration.packing import PackingCollator


@pytest.fixture(autouse=True)
def torch_attention():
    yield fastft.register_attention(backend="torch")  # the notes are the integration's: no kernel needed
    fastft.register_attention()


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(k in name for k in ("q_proj", "k_proj", "c_attn")):
                p.mul_(3.0)  # sharper attention: a lost window or document boundary shows
    return model


def _llama():
    return _model(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0))


def _phimoe():  # its layers pass no sliding_window and its config lists no layer_types: the mask's window
    return _model(PhimoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=5, num_local_experts=2,
                               num_experts_per_tok=2, pad_token_id=0))


def _bigcode():  # its layers get no position_ids: packed documents come from the mask
    return _model(GPTBigCodeConfig(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128, multi_query=True,
                                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))


def _packed_batch():
    docs = [torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in (7, 4, 8)]
    batch = PackingCollator(return_flash_kwargs=False)([{"input_ids": d} for d in docs])
    batch.pop("labels")
    return batch


def _grads(model, impl, batch, between=None):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(**batch, use_cache=False).logits
    loss = (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum()
    if between is not None:
        between()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("student, other", [("phimoe", "teacher"), ("bigcode", "teacher"),
                                            ("bigcode", "itself unpacked")])
def test_checkpointed_attention_recomputes_with_its_own_forwards_notes(student, other, reentrant):
    model = _phimoe() if student == "phimoe" else _bigcode()
    batch = {"input_ids": torch.randint(3, 96, (2, 14))} if student == "phimoe" else _packed_batch()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if other == "teacher":
        teacher = _llama().eval()
        teacher.set_attn_implementation("fastft")
        ids = torch.randint(3, 96, (2, 14))
    else:
        teacher, ids = model, torch.randint(3, 96, (1, 19))

    def forward_between():  # what fastft's distill objective runs between the student's forward and backward
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False)

    want = _grads(model, "sdpa", batch)
    got = _grads(model, "fastft", batch, forward_between)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_window_is_not_lost_to_another_models_forward_in_another_thread():
    phimoe, llama = _phimoe().eval(), _llama().eval()
    ids = torch.randint(3, 96, (2, 14))
    with torch.no_grad():
        phimoe.set_attn_implementation("sdpa")
        want = phimoe(input_ids=ids).logits
        phimoe.set_attn_implementation("fastft")
        llama.set_attn_implementation("fastft")
        stop = threading.Event()

        def other_model():
            while not stop.is_set():
                llama(input_ids=ids)

        thread = threading.Thread(target=other_model)
        thread.start()
        try:
            worst = max(float((phimoe(input_ids=ids).logits - want).abs().max()) for _ in range(20))
        finally:
            stop.set()
            thread.join()
    assert worst < 1e-4


def test_packed_documents_follow_a_position_ids_buffer_rewritten_in_place():
    model = _llama().eval()
    ids = torch.randint(3, 96, (1, 14))
    position_ids = torch.arange(14)[None].clone()
    with torch.no_grad():
        model.set_attn_implementation("fastft")
        model(input_ids=ids, position_ids=position_ids, use_cache=False)  # one document
        position_ids.data.copy_(torch.cat([torch.arange(6), torch.arange(4), torch.arange(4)])[None])  # no version bump
        got = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids, position_ids=position_ids.clone(), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_recompute_after_another_forward_with_gradients_is_refused():
    """Its notes are that forward's: checked against the recomputed call's tokens (a stale note of the same size
    is not caught: run each backward before the next forward with gradients on)."""
    model = _bigcode()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.set_attn_implementation("fastft")
    first = model(**_packed_batch(), use_cache=False).logits.sum()
    model(input_ids=torch.randint(3, 96, (1, 9)), use_cache=False)
    with pytest.raises(ValueError, match=r"called on 19 tokens but the last forward of its model with gradients on "
                                         r"masked 9"):
        first.backward()
