"""Steps the fuzz tests share: which leaves need a gradient, their gradients from one autograd call, each output
and gradient against its fp64 reference (references.check's bound) and in its leaf's dtype, and the
cross-entropy options the loss tests draw."""
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
