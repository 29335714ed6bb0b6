"""Checks that a fused op traces under torch.compile as one custom-op node (fastft.ops.compiled) and computes
what eager computes, forward and backward."""
from __future__ import annotations

import torch
from torch._dynamo.backends.debugging import aot_eager


def leaves(tensors):
    """Fresh leaf copies (same values, strides kept) of the tensors that require grad; others pass through."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            c = t.detach().clone()
            c.requires_grad_(True)
            out.append(c)
        else:
            out.append(t)
    return out


def _outputs(result):
    return [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]


def run_with_grads(fn, args, seed=0):
    """fn(*args) and the gradients of every leaf arg, for a fixed random upstream gradient per output."""
    out = _outputs(fn(*args))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in out if o.requires_grad)
    params = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(loss, params) if params and isinstance(loss, torch.Tensor) else ()
    return [o.detach() for o in out], list(grads)


def assert_compiles_like_eager(fn, *args, ops: tuple[str, ...], dynamic: bool = False, atol=0.0, rtol=0.0):
    """torch.compile(fn, fullgraph=True) — no graph break — has the custom ops `ops` (names under torch.ops.fastft)
    in its forward graph, and gives eager's outputs and gradients (the same kernels run: exact by default)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    want_out, want_grads = run_with_grads(fn, leaves(args))
    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True, dynamic=dynamic)
    got_out, got_grads = run_with_grads(compiled, leaves(args))
    code = "\n".join(graphs)
    for op in ops:
        assert f"torch.ops.fastft.{op}." in code, f"fastft::{op} is not in the traced graph:\n{code}"
    assert len(got_out) == len(want_out) and len(got_grads) == len(want_grads)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
