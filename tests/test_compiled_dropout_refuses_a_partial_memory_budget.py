"""torch.compile with torch._functorch.config.activation_memory_budget < 1: the min-cut partitioner's knapsack may
recompute fastft::draw_seed in the backward (torch bans recomputing only aten's own random ops), which then drew a
new seed — another dropout mask than the forward's: LoRA gradients off by O(1) at budget 0.5 (fuzz-found,
2026-12-06). Dropout is refused there while tracing, with what to do instead; without dropout, or at the default
budget 1.0, the compiled op still gives eager's results."""
import pytest
import torch
import torch._functorch.config as functorch_config

from fastft.ops import lora_linear


def _grads(fn, p):
    torch.manual_seed(0)
    x, A, B = (torch.randn(6, 64), torch.randn(4, 64) * 0.3, torch.randn(40, 4) * 0.3)
    W = torch.randn(40, 64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(7)
    y = fn(lambda *a: lora_linear(a[0], W, None, a[1], a[2], 2.0, p, backend="triton"))(*leaves)
    return [y.detach(), *torch.autograd.grad(y.sum(), leaves)]


def _compiled(f):
    torch._dynamo.reset()
    return torch.compile(f, backend="aot_eager", fullgraph=True)


def test_dropout_under_a_partial_budget_is_refused_naming_the_fix():
    with functorch_config.patch(activation_memory_budget=0.5):
        with pytest.raises(Exception, match=r"activation_memory_budget=0\.5.*redraw its seed.*"
                                            r"activation_memory_budget=1\.0 with torch\.utils\.checkpoint"):
            _grads(_compiled, 0.3)


@pytest.mark.parametrize("budget, p", [(0.5, 0.0), (1.0, 0.3)])
def test_what_stays_allowed_matches_eager(budget, p):
    with functorch_config.patch(activation_memory_budget=budget):
        got = _grads(_compiled, p)
    want = _grads(lambda f: f, p)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert torch.equal(a, b), name
