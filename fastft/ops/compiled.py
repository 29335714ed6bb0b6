"""How a fused op is seen by torch.compile and CUDA graphs.

Each fused op keeps two doors onto the same forward/backward bodies:
- eager: a torch.autograd.Function (host cost ~7 µs a forward on the CI CPU);
- traced: a torch.library custom op pair `fastft::<op>` / `fastft::<op>_backward` with fake (shape-only) kernels
  and `register_autograd`, taken while torch.compile traces. Dynamo cannot trace the Triton launch path (the
  autotuner times configs in Python), so without the custom op every fused op was a graph break; as a custom op
  it is one node of the graph, its body run eagerly, and `mode="reduce-overhead"` can capture it in a CUDA graph.
  A custom op costs ~20 µs more host time per forward than the Function in eager, which is why eager keeps the
  Function (host time is what the small layers are bound by).

Custom-op bodies return fresh tensors only (no output may alias an input): a tensor a body would pass through
is re-derived from the inputs in `setup_context` instead, and an output a call does not need is `unused(like)`.
A dropout seed is drawn at run time by its own op, `fastft::draw_seed` (fastft.ops.compiled_args), and enters the
forward and backward ops as an input: the forward op is then a function of its inputs, so activation checkpointing
may recompute it (a seed drawn inside the forward body would be drawn anew by the recompute: wrong gradients). An
NF4Weight crosses a custom op as its inner tensors (compiled_args.nf4_args / nf4_from_args).
"""
from __future__ import annotations

import torch


def compiling() -> bool:
    """True while torch.compile (dynamo) traces: the op should call its custom op, not its autograd.Function."""
    return torch.compiler.is_compiling()


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on `device`'s current stream: no host sync, no timing, and a
    host-drawn random seed would be replayed unchanged."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def unused(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a custom op returns for an output it did not compute (custom ops cannot return None)."""
    return like.new_empty(0)


def needed(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    """A custom op's output back to None where it was a placeholder."""
    return t if wanted else None
