"""torch.compile with torch._functorch.config.activation_memory_budget < 1: the min-cut partitioner's knapsack
recomputes nodes it would otherwise save, and recomputed fastft::draw_seed in the backward (torch bans recomputing
only aten's own random ops): a fresh seed, another dropout mask than the forward's, LoRA gradients off by O(1) at
budget 0.5 (fuzz-found, 2026-12-06). fastft.ops.seed_saving's joint-graph pass marks every draw MUST_SAVE: outputs
and gradients are eager's exactly at any budget in (0, 1], with activation checkpointing too and beside a user's
own joint pass; at budget 0 (the partitioner then saves inputs only) dropout is refused, naming what works."""
import pytest
import torch
import torch._functorch.config as functorch_config

from fastft.ops import lora_linear, qlora_linear, seed_saving
from fastft.quant import quantize_nf4
from tests.utils import interpreter_only

K = 64


def _layers(op):
    """f(x, A, B): two dropout layers of `op` (p = 0.3) sharing the adapter, the second on tanh of the first."""
    torch.manual_seed(1)
    W = torch.randn(K, K) * 0.1
    w = quantize_nf4(W, blocksize=32) if op == "qlora_linear" else W
    fused = qlora_linear if op == "qlora_linear" else lora_linear

    def f(x, A, B):
        h = fused(x, w, None, A, B, 2.0, 0.3, backend="triton")
        return fused(torch.tanh(h), w, None, A, B, 2.0, 0.3, backend="triton")
    return f


def _run(f, wrap):
    """[y, dx, dA, dB] of wrap(f) on fixed inputs, its dropout seeds drawn after torch.manual_seed(7)."""
    torch.manual_seed(0)
    leaves = [t.requires_grad_() for t in (torch.randn(6, K), torch.randn(4, K) * 0.3, torch.randn(K, 4) * 0.3)]
    torch.manual_seed(7)
    y = wrap(f)(*leaves)
    return [y.detach(), *torch.autograd.grad(y.square().sum(), leaves)]


def _compiled(f):
    torch._dynamo.reset()
    return torch.compile(f, backend="aot_eager", fullgraph=True)


def _checkpointed(f):
    return lambda x, A, B: torch.utils.checkpoint.checkpoint(f, x, A, B, use_reentrant=False)


def _matches_eager(f, budget, wrap=lambda f: f) -> list[bool]:
    with functorch_config.patch(activation_memory_budget=budget, joint_custom_pass=None):
        got = _run(f, lambda f: _compiled(wrap(f)))
    want = _run(f, wrap)
    return [torch.equal(a, b) for a, b in zip(got, want)]


@interpreter_only
@pytest.mark.parametrize("op, budget", [("lora_linear", 0.05), ("lora_linear", 0.5), ("qlora_linear", 0.5),
                                        ("lora_linear", 1.0)])
def test_dropout_under_a_memory_budget_matches_eager(op, budget):
    assert _matches_eager(_layers(op), budget) == [True] * 4


@interpreter_only
def test_without_the_pass_the_budget_redraws_the_seed(monkeypatch):
    """What the pass prevents, so the test above can fail: unmarked, the knapsack recomputes the draw."""
    monkeypatch.setattr(seed_saving.SavesDrawnSeeds, "__call__", lambda self, gm, inputs: gm)
    assert _matches_eager(_layers("lora_linear"), 0.5)[1:] == [False] * 3


@interpreter_only
def test_under_activation_checkpointing_and_a_budget():
    """Inside torch.utils.checkpoint the draw keeps its recompute tag: the partitioner replays its generator state."""
    assert _matches_eager(_layers("lora_linear"), 0.5, _checkpointed) == [True] * 4


@interpreter_only
def test_a_users_own_joint_pass_still_runs():
    seen = []

    def users_pass(gm, inputs):
        seen.append(len(gm.graph.nodes))
        return gm
    f = _layers("lora_linear")
    with functorch_config.patch(activation_memory_budget=0.5, joint_custom_pass=users_pass):
        got = _run(f, _compiled)
        installed = functorch_config.joint_custom_pass
    assert isinstance(installed, seed_saving.SavesDrawnSeeds) and installed.inner is users_pass and seen
    assert all(torch.equal(a, b) for a, b in zip(got, _run(f, lambda f: f)))


@interpreter_only
def test_dropout_at_budget_zero_is_refused_naming_the_fix():
    with functorch_config.patch(activation_memory_budget=0.0):
        with pytest.raises(Exception, match=r"activation_memory_budget=0\.0.*redraw it in the backward.*"
                                            r"budget above 0"):
            _run(_layers("lora_linear"), _compiled)


@interpreter_only
def test_budget_zero_without_dropout_matches_eager():
    torch.manual_seed(1)
    W = torch.randn(K, K) * 0.1
    f = lambda x, A, B: lora_linear(x, W, None, A, B, 2.0, 0.0, backend="triton")  # noqa: E731
    assert _matches_eager(f, 0.0) == [True] * 4


@interpreter_only
def test_under_inductor_at_a_budget():
    """Inductor's own fusions round differently from eager (~1e-7 relative); another mask would be O(1)."""
    f = _layers("lora_linear")

    def inductor(f):
        torch._dynamo.reset()
        return torch.compile(f, backend="inductor", fullgraph=True)
    with functorch_config.patch(activation_memory_budget=0.5, joint_custom_pass=None):
        got = _run(f, inductor)
    for a, b in zip(got, _run(f, lambda f: f)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
