"""What the fused ops' custom ops (fastft.ops.compiled) share beyond fastft.ops.compiled itself: the dropout seed
(drawn by its own op, fastft::draw_seed, and passed to the op families as a tensor), the CUDA-graph refusal for
dropout, fake gradients, and an NF4Weight passed as its inner tensors.

The dropout seed is drawn at run time by `draw_seed_op`, in its body, from the generator eager draws from
(fastft.ops.shared.draw_seed, called through its module so a test patches one name for every op family, eager and
compiled), and handed to an op's forward and backward as an int64 CPU tensor (`Optional[Tensor]`, None without
dropout): the forward op is then a function of its inputs, so activation checkpointing may recompute it (the draw op
is tagged random: the partitioner saves its value or replays it under the saved CPU generator state; under an
activation memory budget below 1 fastft.ops.seed_saving marks it saved).

A custom op takes tensors, numbers, bools and strings only, so an NF4Weight (a tensor subclass) crosses the
boundary as `nf4_args(w)`: its inner tensors (the nested offset a 0-d tensor, so graphs do not specialise on each
layer's) and its integer fields; the body rebuilds an NF4Weight around the same tensors with `nf4_from_args`.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from fastft.ops import shared
from fastft.ops.compiled import capturing, unused
from fastft.ops.seed_saving import refuse_zero_memory_budget, save_drawn_seeds
from fastft.quant import nf4_format as fmt

SEED_DEVICE = torch.device("cpu")  # dropout seeds come from torch's CPU generator (fastft.ops.shared.draw_seed)


def seed_tensor(seed: int) -> torch.Tensor:
    """A drawn dropout seed as draw_seed_op returns it: an int64 CPU tensor (reading it back is no device sync)."""
    return torch.tensor(seed, dtype=torch.int64)


def seed_tensor_like() -> torch.Tensor:
    """seed_tensor's fake."""
    return torch.empty((), dtype=torch.int64, device="cpu")


# cudagraph_unsafe: inductor's graph partition (mode="reduce-overhead") otherwise keeps the draw, whose inputs are
# CUDA tensors, inside a CUDA-graph partition, whose CPU output then fails the recording ("Expected all cuda outputs
# in cuda graph recording", H200, torch 2.11) before the ops' clear refusal (refuse_replayed_dropout) can speak.
@torch.library.custom_op("fastft::draw_seed", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe))
def draw_seed_op(anchors: list[torch.Tensor], *, device: torch.device) -> torch.Tensor:
    """anchors: unread tensors that make each call a node of its own (traced_seed passes them): AOTAutograd's CSE
    merges identical pure calls, and calls without arguments are all identical, so every dropout layer of a
    compiled graph got the first one's seed, and its mask. (An ordered effect keeps them apart too, but
    AOTAutograd then fails on activation checkpointing.)
    device: the generator's, always the CPU (a keyword: where the partitioner looks to save and restore the
    generator's state when it replays the op)."""
    return seed_tensor(shared.draw_seed())


@draw_seed_op.register_fake
def _(anchors, *, device):
    save_drawn_seeds()  # a graph holding a draw is about to be partitioned: its seeds must stay saved
    return seed_tensor_like()


def seeded_ops(name: str, body, fake, backward=None, setup_context=None) -> dict:
    """{False: fastft::NAME, True: fastft::NAME_dropout}: one body, one fake and (given `backward`) one autograd
    formula as two custom ops, the second tagged cudagraph_unsafe; the traced doors call `ops[dropout_p > 0]`. An op
    that reads the host-drawn seed (an int64 CPU tensor) cannot sit in a CUDA-graph partition
    (mode="reduce-overhead"): cudagraph trees copies each input of a partition into its pool before recording, and
    the CPU seed failed that ("storage data ptrs are not allocated in pool", H100, torch 2.11, 2026-12-05); a
    recorded seed would replay one mask besides. Inductor's graph partition
    runs the twin outside the CUDA graphs, with a fresh seed every step; without dropout the plain op stays inside
    them. A backward that calls a custom op picks that op's own pair by dropout_p."""
    ops = {False: torch.library.custom_op(f"fastft::{name}", body, mutates_args=()),
           True: torch.library.custom_op(f"fastft::{name}_dropout", body, mutates_args=(),
                                         tags=(torch.Tag.cudagraph_unsafe,))}
    for op in ops.values():
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
    return ops


def traced_seed(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float) -> Optional[torch.Tensor]:
    """The seed a traced op call takes: drawn by fastft::draw_seed when dropout_p > 0, else None. Its anchors are
    the call's input and adapter and a fresh empty tensor of its own: the same layer called twice on the same input
    in one graph (R-Drop, SimCSE: two masks wanted) gave two identical draws, which CSE merged into one, the same
    mask twice. aten.empty is never CSE'd (it is not a pure function), so every call site keeps its own draw."""
    if dropout_p == 0.0:
        return None
    refuse_zero_memory_budget(dropout_p)
    return draw_seed_op([x, lora_A, torch.empty(0, device=x.device)], device=SEED_DEVICE)


def seed_int(op: str, seed: Optional[torch.Tensor], dropout_p: float, device: torch.device) -> int:
    """The drawn seed as the bodies take it (0 without dropout), forward and backward alike; refused inside a CUDA
    graph capture (refuse_replayed_dropout): a backward captured with one seed would replay its mask against the
    forward's fresh ones."""
    shared.check(seed is not None or dropout_p == 0.0, f"{op}: dropout_p > 0 needs the seed from fastft::draw_seed")
    refuse_replayed_dropout(op, dropout_p, device)
    return 0 if seed is None else int(seed)


def refuse_replayed_dropout(op: str, dropout_p: float, device: torch.device) -> None:
    """A CUDA graph would replay the host-drawn seed unchanged: the same dropout mask every step."""
    if dropout_p > 0.0 and capturing(device):
        raise ValueError(f"{op}: dropout_p={dropout_p} cannot run inside a CUDA graph capture (torch.compile "
                         "mode='reduce-overhead' or torch.cuda.graph): its seed is drawn on the host and would be "
                         "replayed unchanged, the same mask every step. Use dropout 0 (e.g. lora_dropout=0.0) or "
                         "compile without CUDA graphs (mode='default' or 'max-autotune-no-cudagraphs')")


def fresh_like(t: torch.Tensor, wanted: bool) -> torch.Tensor:
    """A fake gradient shaped like t (contiguous), or the placeholder when it is not computed."""
    return t.new_empty(t.shape) if wanted else unused(t)


# ----------------------------------------------------------------------------------------------
# NF4Weight across the custom-op boundary

def nf4_args(w) -> tuple[list[torch.Tensor], list[int]]:
    """(tensors, ints) for a custom op: [packed, absmax, code] (+ [absmax2, code2, nested_offset] with double
    quantization) and [rows, cols, blocksize, nested_blocksize, dtype index]."""
    tensors = [w.packed, w.absmax, w.code]
    if w.double_quant:
        tensors += [w.absmax2, w.code2, w.nested_offset]
    rows, cols = w.shape
    return tensors, [rows, cols, w.blocksize, w.nested_blocksize, fmt.FLOAT_DTYPES.index(w.dtype)]


_OFFSETS: dict[int, tuple] = {}  # id(nested_offset) -> (weakref, _version, float): the value read once per tensor


def _offset_value(t: torch.Tensor) -> float:
    """float(t), read from the device once per tensor and version (a read is a host sync)."""
    from fastft.quant.nf4_weight import tensor_version

    version = tensor_version(t)
    hit = _OFFSETS.get(id(t))
    if hit is not None and hit[0]() is t and version is not None and hit[1] == version:
        return hit[2]
    value = float(t)
    _OFFSETS[id(t)] = (weakref.ref(t, lambda _, key=id(t): _OFFSETS.pop(key, None)), version, value)
    return value


def nf4_from_args(tensors: list[torch.Tensor], ints: list[int]):
    """The NF4Weight nf4_args took apart, around the same tensors. While a CUDA graph is captured the nested
    scales are decoded to fp32 on the device instead (the offset cannot be read to the host there), the same
    values the kernels decode."""
    from fastft.quant.nf4_weight import NF4Weight, tensor_version

    rows, cols, blocksize, nested_blocksize, dtype_index = ints
    packed, absmax, code = tensors[:3]
    dtype = fmt.FLOAT_DTYPES[dtype_index]
    if len(tensors) == 3:
        return NF4Weight(packed, absmax, (rows, cols), dtype, blocksize, code=code)
    absmax2, code2, offset = tensors[3:]
    if capturing(packed.device):
        scales = fmt.dequantize_blockwise8_torch(absmax, absmax2, code2, offset, nested_blocksize)
        return NF4Weight(packed, scales, (rows, cols), dtype, blocksize, code=code)
    w = NF4Weight(packed, absmax, (rows, cols), dtype, blocksize, absmax2=absmax2, code2=code2, offset=offset,
                  nested_blocksize=nested_blocksize, code=code)
    w._offset_cache = (tensor_version(offset), _offset_value(offset))
    return w


def weight_args(w) -> tuple[list[torch.Tensor], list[int]]:
    """A weight that may be dense or an NF4Weight, for a custom op: ([w], []) or nf4_args(w)."""
    from fastft.quant.nf4_weight import NF4Weight

    return nf4_args(w) if isinstance(w, NF4Weight) else ([w], [])


def weight_from_args(tensors: list[torch.Tensor], ints: list[int]):
    """weight_args' inverse."""
    return nf4_from_args(tensors, ints) if ints else tensors[0]
