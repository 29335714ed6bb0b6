"""Steps the fuzz tests share: which leaves need a gradient, their gradients from one autograd call, each output
and gradient against its fp64 reference (references.check's bound) and in its leaf's dtype, the cross-entropy
options the loss tests draw, and the compiled-vs-eager comparison of an op's two doors (assert_doors_agree)."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from tests.fuzz import references as ref


def needing_grad(named) -> dict:
    """{name: tensor} of the (name, tensor or None) pairs whose tensor requires a gradient, in their order."""
    return {n: t for n, t in named if t is not None and t.requires_grad}


def grads_of(outputs, inputs: dict, grad_outputs, **kwargs) -> dict:
    """{name: gradient} of `outputs` for every tensor in `inputs`, from one torch.autograd.grad call."""
    return dict(zip(inputs, torch.autograd.grad(outputs, list(inputs.values()), grad_outputs, **kwargs)))


def check_grads(op, prefix, inputs, grads, expected, dtype, n_round, lengths, extra_rel=0.0, *, reshape=False):
    """Each gradient against expected[name] = (exact, mag, abs_floor) with reduction lengths[name], and in its
    input's dtype. reshape: compare the gradient viewed in the reference's shape (the losses' references take
    the leading dims flattened)."""
    for name, t in inputs.items():
        exact, mag, floor = expected[name]
        g = grads[name]
        ref.check(op, f"{prefix} d{name}", g.reshape(exact.shape) if reshape else g, exact, mag, dtype, n_round,
                  lengths[name], extra_rel, abs_floor=floor)
        assert g.dtype == t.dtype, f"{op} d{name} should come back in {t.dtype}, got {g.dtype}"


def check_example(op, backend, inputs, grads, y, y64, ymag, g64, gmags, dtype, n_round, lengths, extra_rel=0.0, *,
                  y_floor=0.0, floors=None):
    """One example of a layer op: y (reduction lengths["y"]) and every gradient against fp64 (g64 / gmags by name,
    floors[name] an absolute allowance where given), then counted for the report."""
    ref.check(op, f"{backend} y", y, y64, ymag, dtype, n_round, lengths["y"], extra_rel, abs_floor=y_floor)
    expected = {n: (g64[n], gmags[n], (floors or {}).get(n, 0.0)) for n in inputs}
    check_grads(op, backend, inputs, grads, expected, dtype, n_round, lengths, extra_rel)
    ref.count_example(f"{op}[{backend}]")


def draw_ce_options(data):
    """(ignore_index, reduction, num_items, label_smoothing, softcap) of a cross-entropy call. The draws' order and
    labels are part of every example the CI profile replays (fixed seed, saved database): keep both."""
    ignore_index = data.draw(st.sampled_from([-100, -1, 0]), label="ignore_index")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    num_items = data.draw(st.sampled_from([None, 7, torch.tensor(3.0)]), label="num_items") \
        if reduction == "mean" else None
    smoothing = data.draw(st.sampled_from([0.0, 0.1]), label="label_smoothing")
    softcap = data.draw(st.sampled_from([None, 3.0, 30.0]), label="softcap")
    return ignore_index, reduction, num_items, smoothing, softcap


def reordered_tol(want: torch.Tensor, exact: bool) -> dict:
    """assert_close's tolerance between two runs of one computation: none when exact, else 16 unit roundoffs of the
    dtype, relative and of the tensor's largest entry (roundings of terms in a different order)."""
    if exact or not want.is_floating_point():
        return dict(atol=0, rtol=0)
    u = ref.UNIT_ROUNDOFF[want.dtype]
    return dict(rtol=16 * u, atol=16 * u * float(want.abs().max()) if want.numel() else 0.0)


def assert_doors_agree(op: str, fn, named, grad_output, seed: int = 7, exact: bool = True,
                       traced: bool = True) -> None:
    """fn(*tensors of `named`) eager and compiled (aot_eager, fullgraph) under one torch.manual_seed (dropout seeds
    drawn alike): the same outputs and the same gradient, in the same dtype, for every leaf that requires one.
    fn may return a tensor or a tuple of them (each compared); grad_output is a tensor or a sequence for the first
    outputs (the rest, e.g. DPO's rewards, are compared only), or None: outputs only (a no-grad call).
    exact=False where the op falls back to its torch reference, which the compiler traces into its own graph:
    torch's own ops may then round differently, and the traced backward may sum a gradient's terms in another order
    (a few roundings of the terms, which may be larger than their sum): `reordered_tol`.
    traced: the compiled graph must hold a fastft:: op (False where the op answers in plain torch, e.g. empty x)."""
    from torch._dynamo.backends.debugging import aot_eager

    inputs = needing_grad(named)
    grad_outputs = [] if grad_output is None else \
        list(grad_output) if isinstance(grad_output, (tuple, list)) else [grad_output]

    def run(f):
        torch.manual_seed(seed)
        out = f(*(t for _, t in named))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        grads = grads_of(outs[:len(grad_outputs)], inputs, grad_outputs, allow_unused=True) if grad_outputs else {}
        return [o.detach() for o in outs], grads

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    y_eager, g_eager = run(fn)
    y_comp, g_comp = run(torch.compile(fn, backend=recording, fullgraph=True))
    if traced:
        assert "torch.ops.fastft." in "\n".join(graphs), f"{op}: no fastft:: op in the traced graph"
    assert len(y_comp) == len(y_eager), f"{op}: {len(y_comp)} outputs compiled, {len(y_eager)} eager"
    for i, (got, want) in enumerate(zip(y_comp, y_eager)):
        torch.testing.assert_close(got, want, **reordered_tol(want, exact), msg=lambda m: f"{op} output {i}: {m}")
    for name, want in g_eager.items():
        got = g_comp[name]
        if want is None:
            assert got is None, f"{op} d{name}: eager gives none, compiled one"
            continue
        assert got is not None, f"{op} d{name}: compiled gives none, eager one"
        assert got.dtype == want.dtype, f"{op} d{name}: {got.dtype}, eager {want.dtype}"
        torch.testing.assert_close(got, want, **reordered_tol(want, exact), msg=lambda m: f"{op} d{name}: {m}")
    ref.count_example(f"{op} compiled")
