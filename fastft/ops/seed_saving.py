"""Dropout seeds stay saved under torch.compile's activation memory budget.

With `torch._functorch.config.activation_memory_budget` below 1, the min-cut partitioner solves a knapsack over the
nodes it would otherwise save and recomputes the ones it picks in the backward. It bans recomputing aten's own
random ops, not a custom op tagged nondeterministic_seeded: fastft::draw_seed (fastft.ops.compiled_args) was picked,
drew a fresh seed in the backward, and the backward then used another dropout mask than the forward: O(1)-wrong
dx, dA, dB at budget 0.5 (fuzz-found, 2026-12-06).

`SavesDrawnSeeds` is a joint-graph pass (functorch's `joint_custom_pass`, run on the joint graph just before the
partitioner) that marks every draw_seed node MUST_SAVE, as torch marks collectives and effectful ops: the knapsack
never recomputes a MUST_SAVE node, so the backward reads the forward's seed (one int64 on the CPU). It wraps
whatever pass was installed before and runs it after. Nodes inside torch.utils.checkpoint keep their recompute
tag: there the partitioner replays the generator's saved state, the same seed.

Budget 0 is refused instead (`refuse_zero_memory_budget`): there the partitioner saves only the graph's inputs and
ignores MUST_SAVE (torch 2.13).
"""
from __future__ import annotations

import torch
import torch._functorch.config as functorch_config
from torch.utils.checkpoint import CheckpointPolicy

_RECOMPUTED = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


class SavesDrawnSeeds:
    """functorch's joint_custom_pass: draw_seed nodes marked MUST_SAVE, then the pass it wraps (None: nothing)."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, graph_module: torch.fx.GraphModule, joint_inputs):
        draws = graph_module.graph.find_nodes(op="call_function", target=torch.ops.fastft.draw_seed.default)
        for node in draws:
            if node.meta.get("recompute") not in _RECOMPUTED:
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        return graph_module if self.inner is None else self.inner(graph_module, joint_inputs)


def save_drawn_seeds() -> None:
    """Installs SavesDrawnSeeds around the current joint_custom_pass unless it is there already. Called from
    draw_seed's fake, which runs (outside dynamo's bytecode tracing) each time a graph with a draw is traced, before
    that graph is partitioned: a pass a user installs later is wrapped at their next compile."""
    current = functorch_config.joint_custom_pass
    if not isinstance(current, SavesDrawnSeeds):
        functorch_config.joint_custom_pass = SavesDrawnSeeds(current)


def refuse_zero_memory_budget(dropout_p: float) -> None:
    """activation_memory_budget=0 saves only the compiled graph's inputs, MUST_SAVE nodes included: draw_seed would
    be drawn again in the backward. Refused while tracing, naming what works instead."""
    budget = functorch_config.activation_memory_budget
    if budget <= 0.0:
        raise ValueError(f"fastft dropout (p={dropout_p}) under torch.compile with "
                         f"torch._functorch.config.activation_memory_budget={budget}: at 0 the partitioner recomputes "
                         "every node, the dropout seed included, which would redraw it in the backward (another mask "
                         "than the forward's, so wrong gradients). Use a budget above 0 (e.g. 0.05), or 1.0 with "
                         "torch.utils.checkpoint (or gradient checkpointing), or dropout 0 (e.g. lora_dropout=0.0)")
