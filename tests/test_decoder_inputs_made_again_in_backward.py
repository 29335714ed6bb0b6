"""A patched decoder layer (fastft.patch_model) does not keep its projections' saved inputs that are cheap to
make again: the input norm's output (q, k, v read it), the post-attention norm's (gate, up) and the GLU output
act(gate)·up (down_proj), which those projections' backward needs for their adapters' or weights' gradients, are
made again from what the norms' and the GLU's own backward keep anyway (fastft.ops.recompute): per token and layer
two activations of the hidden width and one of the intermediate width less, the same loss and gradients bit for
bit. Measured here as the bytes a training forward
leaves alive (every storage an op makes, weakly tracked: saved-tensor hooks of our own would switch the recompute
off, as activation checkpointing's do)."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastft
from fastft.integration.methods import MethodOptions, apply_method
from fastft.ops import recompute as made_again
from tests.utils import interpreter_only, randomize_lora_B, tiny_llama

TOKENS, HIDDEN, INTERMEDIATE, LAYERS = 2 * 11, 64, 96, 2
BACKENDS = ["torch", pytest.param("triton", marks=interpreter_only)]


class _LiveStorages(TorchDispatchMode):
    """Every storage the ops inside the block make, weakly held: `alive()` sums those still alive."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                s = t.untyped_storage()
                self.made.append((s._weak_ref(), s.nbytes(), s.data_ptr()))
        return out

    def alive(self) -> int:
        return sum({ptr: n for ref, n, ptr in self.made if not torch.UntypedStorage._expired(ref)}.values())


def _step(build, ids, on: bool | None, monkeypatch):
    """(loss, gradients, bytes the forward left alive) with the recompute on or off (None: as fastft ships)."""
    if on is not None:
        monkeypatch.setattr(made_again, "ENABLED", on)
    model = build()
    live = _LiveStorages()
    with live:
        loss = model(input_ids=ids, labels=ids).loss
    held = live.alive()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, held


def _assert_same_step(build, ids, monkeypatch, saved_bytes: int, on=True, at_least=False):
    """The same loss and gradients bit for bit, the forward leaving `saved_bytes` fewer bytes alive (or more)."""
    loss1, grads1, held1 = _step(build, ids, on, monkeypatch)
    loss0, grads0, held0 = _step(build, ids, False, monkeypatch)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert held0 - held1 >= saved_bytes if at_least else held0 - held1 == saved_bytes, (held0, held1)


def _patched(method, backend, dtype=torch.float32, loss=True):
    def build():
        # eager attention where double backward runs (torch's CPU SDPA has no second derivative)
        model = tiny_llama(**({} if loss else {"attn_implementation": "eager"})).to(dtype)
        model = apply_method(model, method, MethodOptions(rank=4), implementation="fastft")
        randomize_lora_B(model)  # zero B would give zero lora_A gradients whatever the saved input
        fastft.patch_model(model, backend=backend, loss=loss, attention=loss)
        return model.train()
    return build


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, TOKENS // 2), generator=torch.Generator().manual_seed(4))


# the Triton ops through the interpreter for LoRA and DoRA (NF4's: the kbit case below); every method on torch's
@pytest.mark.parametrize("method, backend", [(m, "torch") for m in ("lora", "qlora", "dora", "ia3", "full")]
                         + [pytest.param(m, "triton", marks=interpreter_only) for m in ("lora", "dora")])
def test_the_down_projection_input_is_made_again_with_the_same_gradients(method, backend, ids, monkeypatch):
    monkeypatch.setenv("FASTFT_LORA_BACKEND", backend)
    dtype = torch.bfloat16 if method == "qlora" else torch.float32
    # the norms' outputs too where gate and up (q, k and v) keep them (IA3 adapts down_proj, k and v's outputs)
    # and the norm's backward keeps its input (the fused op, or the torch reference in fp32); the first layer's
    # input norm only in full fine-tuning (its trained weight: otherwise nothing before it needs a gradient)
    norm_kept = method != "ia3" and (backend == "triton" or dtype == torch.float32)
    input_norms = (LAYERS if method == "full" else LAYERS - 1) if norm_kept else 0
    elements = LAYERS * INTERMEDIATE + (LAYERS * HIDDEN if norm_kept else 0) + input_norms * HIDDEN
    _assert_same_step(_patched(method, backend, dtype), ids, monkeypatch,
                      saved_bytes=TOKENS * elements * dtype.itemsize)


def test_only_where_gate_and_up_are_kept_anyway(ids, monkeypatch):
    """LoRA on down_proj alone: the first layer's gate and up need no gradient (the embeddings are frozen), so
    nothing keeps them and the recipe would hold two activations for one; that layer keeps its GLU output as before
    (and frozen gate/up projections keep no input)."""
    def build():
        model = apply_method(tiny_llama(), "lora", MethodOptions(rank=4, target_modules=("down_proj",)),
                             implementation="fastft")
        randomize_lora_B(model)
        fastft.patch_model(model, backend="torch")
        return model.train()

    _assert_same_step(build, ids, monkeypatch, saved_bytes=(LAYERS - 1) * TOKENS * INTERMEDIATE * 4)


def test_on_by_default(ids, monkeypatch):
    _assert_same_step(_patched("lora", "torch"), ids, monkeypatch,
                      saved_bytes=TOKENS * (LAYERS * (HIDDEN + INTERMEDIATE) + (LAYERS - 1) * HIDDEN) * 4, on=None)


def test_bottleneck_adapters_keep_nothing_of_it_and_nothing_changes(ids, monkeypatch):
    """The adapter follows down_proj, whose frozen weight needs no input: nothing kept, nothing to make again."""
    _assert_same_step(_patched("adapter", "torch"), ids, monkeypatch, saved_bytes=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_after_kbit_preparation_makes_the_bf16_cast_again(backend, ids, monkeypatch):
    """The fp32 residual stream's MLP: its NF4 projections keep the bf16 casts of the fp32 norm and GLU outputs."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", backend)

    def build():
        model = tiny_llama().to(torch.bfloat16)
        fastft.quantize_model(model, "nf4")
        model = fastft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(1)
        model = fastft.get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        fastft.patch_model(model, backend=backend)
        return model.train()

    _assert_same_step(build, ids, monkeypatch,
                      saved_bytes=TOKENS * (LAYERS * (HIDDEN + INTERMEDIATE) + (LAYERS - 1) * HIDDEN) * 2)


def test_phi3s_fused_gate_up_halves(ids, monkeypatch):
    from transformers import Phi3Config, Phi3ForCausalLM

    def build():
        torch.manual_seed(0)
        model = Phi3ForCausalLM(Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=INTERMEDIATE,
                                           num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=64, pad_token_id=0))
        model = apply_method(model, "lora", MethodOptions(rank=4, target_modules=("qkv_proj", "gate_up_proj",
                                                                                  "down_proj")),
                             implementation="fastft")
        randomize_lora_B(model)
        fastft.patch_model(model, backend="torch")
        return model.train()

    _assert_same_step(build, ids, monkeypatch,
                      saved_bytes=TOKENS * (LAYERS * (HIDDEN + INTERMEDIATE) + (LAYERS - 1) * HIDDEN) * 4)


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant", "save_on_cpu"])
def test_other_saved_tensor_hooks_keep_their_say(how, ids, monkeypatch):
    """Activation checkpointing and save_on_cpu decide what is kept: nothing is saved as a recipe under their hooks
    (it would keep the norm's input and gate and up alive beside them), and the gradients are those of the plain
    run. Reentrant checkpointing's first forward runs without grad, its recompute in backward with the recipes."""
    made, pack = [], made_again._pack

    def counted(t):
        packed = pack(t)
        made.extend([1] if isinstance(packed, made_again._Recipe) else [])
        return packed

    monkeypatch.setattr(made_again, "_pack", counted)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(made_again, "ENABLED", on)
        model = _patched("lora", "torch")()
        if how != "save_on_cpu":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": how == "reentrant"})
        context = torch.autograd.graph.save_on_cpu() if how == "save_on_cpu" else torch.enable_grad()
        with context:
            loss = model(input_ids=ids, labels=ids).loss
        if how != "reentrant":
            assert made == []
        loss.backward()
        runs[on] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert (len(made) > 0) == (how == "reentrant")
    for name in runs[False]:
        assert torch.equal(runs[False][name], runs[True][name]), name


def test_a_gate_changed_in_place_after_the_forward_is_refused_before_any_gradient(ids, monkeypatch):
    monkeypatch.setattr(made_again, "ENABLED", True)
    model = _patched("lora", "torch")()
    gates = []
    model.base_model.model.model.layers[1].mlp.gate_proj.register_forward_hook(lambda m, i, o: gates.append(o))
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        gates[0].mul_(2)
    with pytest.raises(RuntimeError, match="in ?place"):
        loss.backward()
    down = model.base_model.model.model.layers[1].mlp.down_proj
    assert down.lora_A["default"].weight.grad is None  # refused where it was read, not after using it


def test_a_norm_weight_changed_in_place_after_the_forward_is_refused_before_any_gradient(ids, monkeypatch):
    monkeypatch.setattr(made_again, "ENABLED", True)
    model = _patched("full", "torch")()
    layer = model.model.layers[1]
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        layer.post_attention_layernorm.weight.mul_(2)
    with pytest.raises(RuntimeError, match="in ?place"):
        loss.backward()
    assert layer.mlp.gate_proj.weight.grad is None  # refused where the norm's output was made again


def test_normed_states_changed_in_place_before_the_mlp_are_kept_as_they_are(ids, monkeypatch):
    """A hook scaling the normed states in place (as Mixtral's router jitter does) before the MLP reads them: the
    projections keep what they read, not the norm's output made again."""
    def scale_in_place(module, args):
        args[0].mul_(1.5)

    def build():
        model = _patched("lora", "torch")()
        for layer in model.base_model.model.model.layers:
            layer.mlp.register_forward_pre_hook(scale_in_place)
        return model

    _assert_same_step(build, ids, monkeypatch, saved_bytes=TOKENS * (LAYERS * INTERMEDIATE + (LAYERS - 1) * HIDDEN) * 4)


def test_second_order_gradients_are_unchanged(ids, monkeypatch):
    """create_graph: the output made again keeps its history (torch path, the model's own loss: the fused ops
    refuse double backward)."""
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(made_again, "ENABLED", on)
        model = _patched("full", "torch", loss=False)()
        params = [p for p in model.parameters() if p.requires_grad]
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        runs[on] = [p.grad for p in params]
    for g0, g1 in zip(runs[False], runs[True], strict=True):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("case", ["gemma", "olmo2", "granite", "smollm3", "mixtral", "qwen3_moe"])
def test_the_other_table_architectures_train_the_same_with_less_kept(case, ids, monkeypatch):
    """GeGLU and Gemma's (1 + w) norms, OLMo2's q/k norms and post-norms, Granite's multipliers, SmolLM3's no-RoPE
    layers, mixture-of-experts blocks (their MLPs stay the model's own: the input norms' outputs alone)."""
    from tests.test_patch_model_more_archs import CASES, tiny as tiny_model

    def build():
        model = tiny_model(case)
        targets = tuple(CASES[case][3])
        model = apply_method(model, "lora", MethodOptions(rank=4, target_modules=targets), implementation="fastft")
        randomize_lora_B(model)
        fastft.patch_model(model, backend="torch")
        return model.train()

    # the second layer's input norm at least
    _assert_same_step(build, ids, monkeypatch, saved_bytes=TOKENS * HIDDEN * 4, at_least=True)
