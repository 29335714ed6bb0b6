"""attn_implementation="fastft" under torch.compile, model after model in one process (a sweep, a notebook): the
mask function's notes were keyed by the config's id, which dynamo guards, so every new model compiled again and past
dynamo's recompile limit (8) the ninth ran eagerly, silently (audit round 15). Traced, the notes are keyed by the
config's class and plain settings: a new model alike in every setting reuses the graph, while two live models that
differ (a window) still read their own notes, with only their layers compiled under an eager mask (regional
compilation) and in a checkpointed recompute."""
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, LlamaConfig, PhimoeConfig

import fastft
from fastft.integration import attention_masks


@pytest.fixture(autouse=True)
def torch_attention():
    torch._dynamo.reset()
    # notes an earlier test's packed forward left: a traced forward replaces such a note once (one more graph)
    attention_masks._packing_seen.clear()
    yield fastft.register_attention(backend="torch")  # the notes are the integration's: no kernel needed
    fastft.register_attention()
    torch._dynamo.reset()


def _model(config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastft").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(k in name for k in ("q_proj", "k_proj")):
                p.mul_(3.0)  # sharper attention: a lost window shows
    return model


def _sdpa_logits(model, ids):
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.set_attn_implementation("fastft")


def _llama():
    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def _phimoe(window):  # its layers pass no sliding_window and its config lists no layer_types: the mask's window
    return PhimoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window, num_local_experts=2,
                        num_experts_per_tok=2, pad_token_id=0)


def test_nine_new_models_of_one_kind_run_one_compiled_graph():
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    before = counters["stats"]["unique_graphs"]
    for seed in range(9):  # the ninth past dynamo's recompile limit (8), each a new config object
        model = _model(_llama(), seed)
        with torch.no_grad():
            got = torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids).logits
        torch.testing.assert_close(got, _sdpa_logits(model, ids), rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] - before == 1, f"model {seed} compiled again"


def test_two_live_models_differing_in_their_window_keep_their_own_under_regional_compilation():
    """Only the layers compiled, the mask built eagerly around them: each compiled attention reads the window its
    own model's eager mask noted (under the traced key the eager mask writes too)."""
    models = [_model(_phimoe(5), 0), _model(_phimoe(3), 1)]
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    want = [_sdpa_logits(m, ids) for m in models]
    for m in models:
        for i, layer in enumerate(m.model.layers):
            m.model.layers[i] = torch.compile(layer, backend="eager")
    for _ in range(2):
        for m, w in zip(models, want):
            with torch.no_grad():
                torch.testing.assert_close(m(input_ids=ids).logits, w, rtol=1e-5, atol=1e-5)


def test_a_compiled_attention_recomputed_after_another_models_forward_keeps_its_window():
    """Gradient checkpointing recomputes the student's compiled attention in the backward, after a teacher's forward
    (another window) wrote its own notes: the student's are under its own key (a key shared by every model handed
    the recompute the teacher's window)."""
    student, teacher = _model(_phimoe(5), 0).train(), _model(_phimoe(3), 1)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(1, 12, 96, generator=torch.Generator().manual_seed(3))

    def grads(between):
        student.zero_grad(set_to_none=True)
        loss = (student(input_ids=ids, use_cache=False).logits * weights).sum()
        between()
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])

    want = grads(lambda: None)
    for m in (student, teacher):  # only the attention compiled: the checkpointed layer around it runs eagerly
        for layer in m.model.layers:
            layer.self_attn = torch.compile(layer.self_attn, backend="eager")
    with torch.no_grad():
        teacher(input_ids=ids)  # both compiled before the run compared

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=ids)

    torch.testing.assert_close(grads(teacher_forward), want, rtol=1e-5, atol=1e-5)
