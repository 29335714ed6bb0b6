"""FSDP2's all-gather of an NF4Weight (its fsdp_pre_all_gather / fsdp_post_all_gather hooks): the packed bytes and
the block scales travel, never a dense copy; the code tables and the nested offset ride in the metadata.

Even shards (rows a multiple of the ranks) gather each part as it is: 4.1–4.5 bits a weight on the wire. Uneven
shards (FSDP2 cuts dim 0 as torch.chunk does: ceil(N/world) rows, the last ones shorter or empty): torch requires a
padded shard's all-gather inputs to have the padded shard's size, so every rank sends one uint8 tensor of
ceil(N/world)×K bytes — its codes, then its blocks' fp32 scales (decoded, so nested and un-nested shards send alike),
then zeros (8 bits a weight on the wire; the stored shards stay 4-bit) — and the post-all-gather cuts each rank's
codes and scales out of the gathered bytes, drops the padding and empty shards, and rebuilds an un-nested weight of
N rows (copies, which FSDP2 frees at reshard and refills on the next all-gather) that dequantizes to the original bit
for bit. Which shapes shard at all: fastft/quant/nf4_tensor_ops.py (shard_problem).
"""
from __future__ import annotations

import math

import torch

from fastft.quant import nf4_format as fmt
from fastft.quant.nf4_tensor_ops import row_numel, shard_problem, shard_rows


def fsdp_pre_all_gather(w, mesh, outer_size):
    world = mesh.size()
    outer_size = torch.Size(outer_size)
    if outer_size[0] % world:
        return _uneven_pre_all_gather(w, world, outer_size)
    if w.ndim < 1 or tuple(outer_size) != (w.shape[0] * world, *w.shape[1:]):
        raise ValueError(f"NF4Weight: FSDP shard of shape {tuple(w.shape)} is not 1/{world} of {tuple(outer_size)}"
                         " (see fastft.quant.nf4_tensor_ops.check_shardable)")
    scales = (w.absmax,) + ((w.absmax2,) if w.double_quant else ())
    # torch's one-rank path copies only the first all-gather input: there the (whole) scales ride in the metadata
    one_rank = world == 1
    inputs = (w.packed,) if one_rank else (w.packed, *scales)
    meta = (outer_size, w.blocksize, w.nested_blocksize, w.nested_offset, w.code, w.code2,
            scales if one_rank else None, None)
    return inputs, meta


def _uneven_pre_all_gather(w, world: int, outer_size: torch.Size):
    rows = shard_rows(outer_size[0], world)
    if w.ndim < 1 or w.shape[0] > rows or tuple(w.shape[1:]) != tuple(outer_size[1:]):
        raise ValueError(f"NF4Weight: FSDP shard of shape {tuple(w.shape)} is not a dim-0 shard of at most {rows} "
                         f"rows of {tuple(outer_size)}")
    problem = shard_problem(outer_size, w.blocksize, world)
    if problem:
        raise ValueError(f"NF4Weight: {problem}")
    values = rows * row_numel(w)
    wire = torch.zeros(values, dtype=torch.uint8, device=w.device)
    wire[:w.packed.numel()] = w.packed
    scales = w.block_absmax().to(torch.float32)
    wire[values // 2: values // 2 + 4 * scales.numel()] = scales.view(torch.uint8)
    meta = (outer_size, w.blocksize, w.nested_blocksize, None, w.code, None, None, rows)
    return (wire.view(rows, *outer_size[1:]),), meta


def _uneven_parts(gathered: torch.Tensor, shape: torch.Size, rows: int, blocksize: int):
    """Each rank's codes and fp32 scales cut out of the gathered uneven wire (see _uneven_pre_all_gather), padding
    and empty shards dropped: (list of packed pieces, list of scale pieces), in rank order."""
    row, n = math.prod(shape[1:]), shape[0]
    values = rows * row
    wires = gathered.view(-1).split(values)
    packed, scales = [], []
    for rank, wire in enumerate(wires):
        real = max(0, min(rows, n - rank * rows)) * row
        if real == 0:
            continue
        packed.append(wire[:(real + 1) // 2])
        scales.append(wire[values // 2: values // 2 + 4 * fmt.num_blocks(real, blocksize)].view(torch.float32))
    return packed, scales


def _uneven_post_all_gather(outputs, meta, param_dtype, out):
    from fastft.quant.nf4_weight import NF4Weight

    shape, blocksize, _, _, code, _, _, rows = meta
    packed, scales = _uneven_parts(outputs[0], shape, rows, blocksize)
    if out is not None:  # later all-gathers: into the buffers FSDP2 re-allocated (the returned inner tensors)
        torch.cat(packed, out=out.packed)
        torch.cat(scales, out=out.absmax)
        return None
    full = NF4Weight(torch.cat(packed), torch.cat(scales), shape, param_dtype, blocksize, code=code)
    # the codes and scales are copies: FSDP2 frees them (and the gathered wire) at reshard
    return full, (full.packed, full.absmax)


def fsdp_post_all_gather(w, outputs, meta, param_dtype, *, out=None):
    from fastft.quant.nf4_weight import NF4Weight

    if meta[-1] is not None:
        return _uneven_post_all_gather(outputs, meta, param_dtype, out)
    shape, blocksize, nested_blocksize, offset, code, code2, scales, _ = meta
    # what FSDP2 frees at reshard: only the buffers it gathered into, never the shard's own scales (one rank)
    gathered = tuple(outputs)
    if scales is not None:  # one rank: only the packed codes were "gathered"
        outputs = (outputs[0], *scales)
    if out is not None:  # later all-gathers write into the buffers `out` already views
        for mine, got in zip((out.packed, out.absmax, out.absmax2), outputs):
            if mine.untyped_storage().data_ptr() != got.untyped_storage().data_ptr():
                raise RuntimeError("NF4Weight: FSDP all-gather output is not the unsharded weight's storage")
        if out.double_quant and out.nested_offset is not offset:  # a new shard (an assign load): its offset
            out.nested_offset, out._offset_cache = offset, w._offset_cache
        return None
    absmax2 = outputs[2] if len(outputs) > 2 else None
    full = NF4Weight(outputs[0], outputs[1], shape, param_dtype, blocksize, absmax2=absmax2, code2=code2,
                     offset=0.0 if offset is None else offset, nested_blocksize=nested_blocksize, code=code)
    if full.double_quant and w.nested_offset is offset:
        full._offset_cache = w._offset_cache
    return full, gathered
