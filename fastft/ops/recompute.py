"""Outputs made again in backward instead of kept: a cheap elementwise op's output (a norm's, a GLU's) that a
projection saves for its weights' or adapters' gradients, while the op's own backward keeps its inputs anyway.

`remember(out, make, reads)` marks `out` (on the root tensor of its storage, so the views a projection saves are
found) as `make()` gives it again, bit for bit; inside `recomputed_outputs()` a tensor autograd saves whose storage
is a marked output, or the bf16 cast `shared._shared_cast` made of one (an NF4 projection after
prepare_model_for_kbit_training), is saved as a recipe, made again when backward unpacks it. The block is a no-op
under torch.compile (its partitioner chooses what to recompute), torch.func transforms, without grad mode, and when
other saved-tensor hooks run (activation checkpointing, save_on_cpu: they decide what is kept; a recipe would keep
the op's inputs alive beside them)."""
from __future__ import annotations

import contextlib

import torch

from fastft.kernels.runtime import under_func_transform
from fastft.ops.compiled import compiling
from fastft.ops.shared import last_shared_cast

ENABLED = True  # tests switch it off to compare
_ATTR = "_fastft_made_again_by"


def remember(out: torch.Tensor, make, reads: tuple[torch.Tensor, ...]) -> None:
    """Mark `out` as `make()` makes it again. `reads`: the tensors make() reads, which the caller knows autograd
    keeps anyway (their in-place change after the forward is refused at unpack, as autograd refuses it). Ignored
    under torch.compile, and for an output that is not a whole contiguous storage of its own (a recipe could not
    rebuild its views)."""
    if compiling() or not (ENABLED and type(out) is torch.Tensor and out.numel() > 0 and out.is_contiguous()
            and out.storage_offset() == 0 and out.untyped_storage().nbytes() == out.numel() * out.element_size()):
        return
    root = out if out._base is None else out._base
    setattr(root, _ATTR, (make, reads, tuple(t._version for t in reads), root._version))


def recomputed_outputs():
    """The block inside which remembered outputs are saved as recipes (see the module docstring)."""
    if compiling() or not (ENABLED and torch.is_grad_enabled() and not under_func_transform()
                           and _no_saved_tensor_hooks()):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def _no_saved_tensor_hooks() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is None


def _recipe_of(t: torch.Tensor):
    """t's recipe while t's storage holds what it made (a change in place since, e.g. a hook scaling the normed
    states before the MLP reads them, leaves t to be kept as it is)."""
    root = t if t._base is None else t._base
    recipe = getattr(root, _ATTR, None)
    return recipe if recipe is not None and root._version == recipe[3] else None


class _Recipe:
    """A saved view of a remembered output (or of its cast): how to make it again, its geometry and dtype."""
    __slots__ = ("recipe", "size", "stride", "offset", "dtype")

    def __init__(self, recipe, t: torch.Tensor):
        self.recipe = recipe
        self.size, self.stride, self.offset, self.dtype = t.size(), t.stride(), t.storage_offset(), t.dtype


def _pack(t: torch.Tensor):
    if type(t) is not torch.Tensor:
        return t
    recipe = _recipe_of(t)
    if recipe is None:
        last = last_shared_cast()  # (source, cast): an NF4 projection keeps the bf16 cast of an fp32 output
        if last is not None and last[1].untyped_storage().data_ptr() == t.untyped_storage().data_ptr() \
                and last[1].dtype == t.dtype:
            recipe = _recipe_of(last[0])
    return t if recipe is None else _Recipe(recipe, t)


def _unpack(saved):
    if not isinstance(saved, _Recipe):
        return saved
    make, reads, versions, _ = saved.recipe
    if tuple(t._version for t in reads) != versions:
        raise RuntimeError("fastft: a tensor an output is made again from in backward (a norm's input, a gated "
                           "MLP's gate or up) was modified in place after the forward: the output would differ")
    again = make().contiguous()  # in backward's grad mode: create_graph keeps its history
    return again.to(saved.dtype).as_strided(saved.size, saved.stride, saved.offset)
