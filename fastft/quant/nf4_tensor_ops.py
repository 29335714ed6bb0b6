"""What an NF4Weight (fastft/quant/nf4_weight.py) supports as a tensor: its aten op table, row slicing for
sharding, and the `fastft::nf4_dequantize` custom op (FSDP2's all-gather hooks: fastft/quant/nf4_fsdp.py).

The op table is small and explicit (as torchao's NF4Tensor): the ops `nn.Module` moves, `nn.Parameter`,
deepcopy, FSDP2's `fully_shard` (chunk → split, new_zeros, narrow → slice, copy_, view(-1), as_strided),
DTensor and DCP's full state dicts (all-gather, scatter) need. Every one of them keeps the bytes as they are;
anything else raises NotImplementedError naming the op (math on the weight goes through `.dequantize()`).

Sharding. bitsandbytes' layout is row-major over the whole flattened weight, so rows [r0, r1) of W (N×K) are
the contiguous byte run [r0·K/2, r1·K/2) and absmax blocks [r0·K/bs, r1·K/bs) as long as r0·K and r1·K are
multiples of the blocksize; a cut inside a block is refused with a clear error. Double quantization groups 256
block scales under one fp32 `absmax2`: a row range whose blocks start and count on whole groups keeps the
8-bit nested scales (the common case on real models: e.g. 4096×4096 / 8 ranks = 8192 groups a rank); any
other range is *un-nested* — its block scales decoded to fp32 (exactly the values dequantization uses), so
the shard stands alone at 4 bytes instead of 1 per block. FSDP2 then all-gathers the packed bytes and the
scales (4.1–4.5 bits a weight), never a dense copy.

Uneven shards. FSDP2 cuts dim 0 as torch.chunk does, into ceil(N/world)-row shards (the last ones shorter, or empty:
4 rows over 3 are 2, 2, 0), so NF4 weights shard over any process count whose ceil(N/world)·K is a multiple of the
blocksize (`shard_problem`). Each rank pads its shard into `new_zeros` of the first shard's size: zero codes under
zero scales, which dequantize to zeros. That buffer keeps nested scales only when it and the whole weight hold whole
groups (else the last shard's leading rows would narrow to an un-nested copy and FSDP2's copy_ into them be lost);
a nested shard copied into an un-nested buffer brings its scales decoded to fp32. (FSDP2's all-gather of NF4 shards,
even and uneven: fastft/quant/nf4_fsdp.py.) State dicts of
such shards: DTensor pads a short shard with F.pad (`constant_pad_nd`, zero rows, nested as `new_zeros` would be)
before its all-gather, which agrees on one layout across the ranks first (un-nested fp32 scales if any piece is
un-nested); a shard that is the leading rows of a padded buffer takes a copy with another nested offset, as the
other rows are zero codes; DCP's scatter of a full state dict is refused, on every rank, where nested and un-nested
pieces would mix (load_state_dict copies each rank's rows instead).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fastft.kernels import nf4_cpu
from fastft.kernels.runtime import HAS_TRITON, raw_pointers_ok, under_func_transform
from fastft.quant import nf4_format as fmt

aten = torch.ops.aten
_ZERO_BYTE = (fmt.NF4_ZERO_CODE << 4) | fmt.NF4_ZERO_CODE  # two zero codes: an all-zero weight at any scale


# ----------------------------------------------------------------------------------------------
# dequantization as one custom op: eager picks the fastest path, torch.compile sees one node

def dequantize_parts(packed, absmax, absmax2, code2, code, offset, nested_blocksize: int, blocksize: int, numel: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Flat [numel] tensor in dtype from an NF4Weight's parts (bit-identical to bitsandbytes); offset: float or
    0-d fp32 tensor."""
    if packed.device.type == "cuda" and HAS_TRITON and not under_func_transform():
        from fastft.kernels.nf4_dequant import nf4_dequantize as triton_dequantize
        if isinstance(offset, torch.Tensor):  # traced: the nested scales decoded on the device, as the kernel would
            # (bit-identical), not float(offset): a host read a step, refused while a CUDA graph is captured
            if absmax2 is not None:
                absmax = fmt.dequantize_blockwise8_torch(absmax, absmax2, code2, offset, nested_blocksize)
            absmax2 = code2 = None
            offset = 0.0
        return triton_dequantize(packed, absmax, numel, blocksize, dtype, code, absmax2=absmax2, code2=code2,
                                 offset=float(offset), nested_blocksize=nested_blocksize)
    scales = absmax if absmax2 is None else fmt.dequantize_blockwise8_torch(absmax, absmax2, code2, offset,
                                                                            nested_blocksize)
    if packed.device.type == "cpu" and nf4_cpu.available() and raw_pointers_ok(packed, scales):
        return nf4_cpu.dequantize(packed, scales, numel, blocksize, dtype)
    return fmt.dequantize_nf4_torch(packed, scales, numel, blocksize, dtype)


@torch.library.custom_op("fastft::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                   code2: torch.Tensor | None, code: torch.Tensor, offset: torch.Tensor | None, nested_blocksize: int,
                   blocksize: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_parts as one op for torch.compile (the offset a tensor, so graphs do not specialise on it)."""
    return dequantize_parts(packed, absmax, absmax2, code2, code, 0.0 if offset is None else offset,
                            nested_blocksize, blocksize, numel, dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, absmax2, code2, code, offset, nested_blocksize, blocksize, numel, dtype):
    return packed.new_empty(numel, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# building blocks

def apply_to_parts(w, fn: Callable[[torch.Tensor], torch.Tensor], **changes):
    """The same weight with fn applied to every inner tensor (device moves, clone, detach, pin)."""
    from fastft.quant.nf4_weight import tensor_version

    parts = dict(packed=fn(w.packed), absmax=fn(w.absmax), code=fn(w.code))
    if w.double_quant:
        parts.update(absmax2=fn(w.absmax2), code2=fn(w.code2), offset=fn(w.nested_offset))
    parts.update(changes)
    out = w.with_parts(**parts)
    if out.double_quant and w._offset_cache is not None:  # same value: keep the float, no device read...
        # ...but w's float as of now: `w.offset` reads it again when w's offset was written since (copy_, a load)
        out._offset_cache = (tensor_version(out.nested_offset), w.offset)
    return out


def row_numel(w) -> int:
    return math.prod(w.shape[1:])


def row_range(w, r0: int, r1: int):
    """Rows [r0, r1) of w along dim 0, sharing its bytes, or a copy for an un-nested range (see the module
    docstring for the rules)."""
    if w.ndim == 0:
        raise NotImplementedError("NF4Weight: a 0-d weight has no rows to slice")
    n, bs, row = w.numel(), w.blocksize, row_numel(w)
    e0, e1 = r0 * row, r1 * row
    if (r0, r1) == (0, w.shape[0]):
        return w.with_parts(shape=w.shape)
    if e0 % bs or (e1 % bs and e1 != n):
        raise ValueError(f"NF4Weight of shape {tuple(w.shape)}: rows {r0}:{r1} cut through a quantization block of "
                         f"{bs} elements; slices and shards must hold whole blocks (rows·{row} a multiple of {bs})")
    b0, b1 = e0 // bs, fmt.num_blocks(e1, bs)
    shape = (r1 - r0, *w.shape[1:])
    packed = w.packed[e0 // 2: (e1 + 1) // 2]
    if not w.double_quant:
        return w.with_parts(packed=packed, absmax=w.absmax[b0:b1], shape=shape)
    g = w.nested_blocksize
    of = f"rows {r0}:{r1} of a double-quantized NF4Weight of shape {tuple(w.shape)}"
    if b0 % g == 0 and (b1 - b0) % g == 0:  # whole groups of nested scales: keep them 8-bit
        part = w.with_parts(packed=packed, absmax=w.absmax[b0:b1], absmax2=w.absmax2[b0 // g: b1 // g],
                            shape=shape)
        part._part_of = of + " (sharing its nested offset)"
        part._parent_bytes = (w.packed, e0 // 2, (e1 + 1) // 2)
        return part
    # un-nest: a copy of these blocks' codes and of their decoded fp32 scales (what dequantize computes), so the
    # slice stands alone; a copy, not a view: codes shared with w under scales copied once read w's later codes under
    # its old scales after a write into w (copy_, load_state_dict), neither the old rows nor the new
    part = w.with_parts(packed=packed.clone(), absmax=w.block_absmax()[b0:b1].clone(), absmax2=None, code2=None,
                        offset=0.0, shape=shape)
    part._part_of = of + " (a copy of its codes, with a copy of their decoded scales)"
    return part


def zero_weight(shape, dtype, blocksize: int, nested: bool, device, *, nested_blocksize: int = fmt.NESTED_BLOCKSIZE,
                code2: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                code: torch.Tensor | None = None):
    """An all-zero NF4Weight (every code the zero, every scale 0) built on `device`; on meta, a layout only.

    code2 / offset / code: the nested code table and offset, and the NF4 table, to keep (default bitsandbytes'
    tables, offset 0; under torch.compile pass them: a cached table is a real tensor, which tracing cannot copy)."""
    from fastft.quant.nf4_weight import NF4Weight

    n = math.prod(shape)
    blocks = fmt.num_blocks(n, blocksize)
    packed = torch.full(((n + 1) // 2,), _ZERO_BYTE, dtype=torch.uint8, device=device)
    code = fmt.nf4_code(str(device)).clone() if code is None else code
    if not nested:
        return NF4Weight(packed, torch.zeros(blocks, device=device), shape, dtype, blocksize, code=code)
    return NF4Weight(packed, torch.zeros(blocks, dtype=torch.uint8, device=device), shape, dtype, blocksize,
                     absmax2=torch.zeros(fmt.num_blocks(blocks, nested_blocksize), device=device),
                     code2=fmt.dynamic_code(str(device)).clone() if code2 is None else code2,
                     offset=torch.zeros((), device=device) if offset is None else offset,
                     nested_blocksize=nested_blocksize, code=code)


def _zeros_like_layout(w, shape, device=None, dtype=None):
    """An all-zero NF4Weight of `shape` with the layout row_range gives a same-sized piece of w, on `device`
    (default w's). A nested one starts with w's offset, so copying a piece of w in leaves it as it is; w may be on
    meta (`module.to_empty`), so nothing is read from a meta w."""
    device = w.device if device is None else torch.device(device)
    blocks = fmt.num_blocks(math.prod(shape), w.blocksize)
    nested = w.double_quant and (torch.Size(shape) == w.shape or _pads_whole_groups(w, blocks))
    code = code2 = offset = None
    if not w.is_meta:
        code = w.code.to(device, copy=True)
    if nested and not w.is_meta:
        code2, offset = w.code2.to(device, copy=True), w.nested_offset.to(device, copy=True)
    return zero_weight(torch.Size(shape), cast_dtype(w, dtype, "new_zeros"), w.blocksize, nested, device,
                       nested_blocksize=w.nested_blocksize, code2=code2, offset=offset, code=code)


def _pads_whole_groups(w, blocks: int) -> bool:
    """Whether a zero buffer of `blocks` blocks, into whose leading rows FSDP2 copies a piece of w, may keep nested
    scales: only if both it and w hold whole groups, so every piece's leading rows (narrow) stay nested and share the
    buffer's scales; otherwise an uneven last shard would narrow to an un-nested copy and the copy_ into it be lost."""
    return blocks % w.nested_blocksize == 0 and w.absmax.numel() % w.nested_blocksize == 0


def shard_rows(rows: int, world: int) -> int:
    """The rows of FSDP2's largest (first) dim-0 shard over `world` ranks: ceil(rows / world), as torch.chunk cuts;
    the last shards hold fewer, or none, and are padded to this size for the all-gather."""
    return -(-rows // world)


def shard_problem(shape, blocksize: int, world: int, name: str = "weight") -> str | None:
    """Why an NF4 weight of `shape` cannot be sharded along dim 0 over `world` ranks, or None. FSDP2 cuts dim 0 into
    ceil(rows/world)-row shards (the last ones shorter or empty): every cut must fall between quantization blocks.
    Shapes only: a layer of a meta-device skeleton is checked before any weight loads."""
    shape = tuple(shape)
    if not shape:
        return f"{name}: a 0-d NF4 weight has no rows to shard over {world} ranks"
    rows, row = shard_rows(shape[0], world), math.prod(shape[1:])
    last = (shape[0] - 1) % rows + 1 if rows else 0  # the last non-empty shard's rows
    cannot = f"{name}: an NF4 weight of shape {shape} cannot be sharded over {world} ranks: "
    fix = ("; use a process count whose shards hold whole blocks, or leave this layer unquantized "
           "(quantize_model(..., skip=[...]))")
    if (rows * row) % blocksize:
        return (f"{cannot}a shard of {rows} rows (ceil({shape[0]}/{world})) holds {rows * row} values, not a multiple "
                f"of the blocksize {blocksize}, so a shard boundary would cut through a quantization block{fix}")
    if (last * row) % blocksize:  # it ends the weight, but FSDP2 copies it into a zero buffer's leading rows
        return (f"{cannot}its last shard of {last} rows holds {last * row} values, not a multiple of the blocksize "
                f"{blocksize}, and FSDP2 pads it into a {rows}-row buffer, cutting through a quantization block "
                f"there{fix}")
    if shape[0] % world and blocksize % 8:
        return (f"{name}: an NF4 weight of shape {shape} with blocksize {blocksize} cannot be sharded unevenly over "
                f"{world} ranks: uneven shards all-gather their codes and fp32 scales in one byte a value, which "
                "needs a blocksize that is a multiple of 8; use a process count that divides its "
                f"{shape[0]} rows, or quantize with blocksize 64")
    return None


def check_shardable(w, world: int, name: str = "weight") -> None:
    """Raise a ValueError naming `name` unless FSDP2's dim-0 shards of w over `world` ranks hold whole blocks."""
    problem = shard_problem(w.shape if w.ndim else (), w.blocksize, world, name)
    if problem:
        raise ValueError(problem)


# ----------------------------------------------------------------------------------------------
# dtype casts. An NF4Weight's dtype is the one dequantize returns, fixed when it was quantized; its codes and scales
# never change dtype. A floating-point cast (`module.half()`, `w.to(torch.float32)`, peft's
# prepare_model_for_kbit_training) leaves it as it is, as bitsandbytes' 4-bit weights are left; any other dtype is
# refused rather than ignored.

def cast_dtype(w, dtype, op: str) -> torch.dtype:
    """The dtype `w` cast to `dtype` keeps: its own, for None or any floating-point dtype; others: TypeError."""
    if dtype is None or dtype.is_floating_point:
        return w.dtype
    raise TypeError(f"NF4Weight.{op}: `dtype` {dtype} is not a floating-point dtype; a quantized weight keeps its 4-bit "
                    f"codes and dequantizes to {w.dtype} (floating-point casts leave it as it is, as bitsandbytes' "
                    "do); for a dense tensor of the values use weight.dequantize(dtype)")


# ----------------------------------------------------------------------------------------------
# the aten op table

_TABLE: dict = {}


def _implements(*aten_ops):
    def register(fn):
        for op in aten_ops:
            _TABLE[op] = fn
        return fn
    return register


def _same_numel(w, shape, op) -> torch.Size:
    shape = list(shape)
    if shape.count(-1) == 1:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = w.numel() // known if known else 0
    if math.prod(shape) != w.numel():
        raise NotImplementedError(f"NF4Weight: {op} to shape {tuple(shape)} changes the number of elements "
                                  f"({w.numel()})")
    return torch.Size(shape)


@_implements(aten.detach.default, aten.alias.default)
def _detach(func, w, *args, **kwargs):
    return w.with_parts(shape=w.shape)


@_implements(aten.clone.default)
def _clone(func, w, *args, **kwargs):
    return apply_to_parts(w, torch.clone)


@_implements(aten._to_copy.default)
def _to_copy(func, w, *args, dtype=None, device=None, non_blocking=False, **kwargs):
    # `w.half()`, `w.int()`, `torch.Tensor.to(w, copy=True)`: a copy (its dtype: cast_dtype)
    dtype = cast_dtype(w, dtype, "to")
    device = w.device if device is None else torch.device(device)
    return apply_to_parts(w, lambda t: t.to(device, non_blocking=non_blocking, copy=True), dtype=dtype)


@_implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func, w, shape, *args, **kwargs):
    # the layout is over the flattened weight, so any shape with the same numel is the same bytes
    return w.with_parts(shape=_same_numel(w, shape, "view"))


@_implements(aten.as_strided.default)
def _as_strided(func, w, size, stride, storage_offset=None, *args, **kwargs):
    size = torch.Size(size)
    contiguous = tuple(torch._prims_common.make_contiguous_strides_for(size))
    if tuple(stride) != contiguous or (storage_offset or 0) != 0:
        raise NotImplementedError(f"NF4Weight: as_strided only to a contiguous layout at offset 0, got "
                                  f"stride {tuple(stride)}, offset {storage_offset}")
    return w.with_parts(shape=_same_numel(w, size, "as_strided"))


def _check_dim0(dim, w, op):
    if dim not in (0, -w.ndim):
        raise NotImplementedError(f"NF4Weight: {op} only along dim 0 (rows), got dim={dim}")


@_implements(aten.slice.Tensor)
def _slice(func, w, dim=0, start=None, end=None, step=1):
    _check_dim0(dim, w, "slice")
    if step != 1:
        raise NotImplementedError(f"NF4Weight: slice with step {step}")
    r0, r1, _ = slice(start, end).indices(w.shape[0])
    return row_range(w, r0, max(r0, r1))


@_implements(aten.split.Tensor)
def _split(func, w, split_size, dim=0):
    _check_dim0(dim, w, "split")
    n = w.shape[0]
    return [row_range(w, r, min(n, r + split_size)) for r in range(0, n, split_size)]


@_implements(aten.split_with_sizes.default)
def _split_with_sizes(func, w, sizes, dim=0):
    _check_dim0(dim, w, "split_with_sizes")
    # as torch checks: pieces that do not add up to the rows would silently drop (or invent) rows
    if any(size < 0 for size in sizes):
        raise RuntimeError(f"split_with_sizes expects split_sizes have only non-negative entries, but got "
                           f"split_sizes={list(sizes)}")
    if sum(sizes) != w.shape[0]:
        raise RuntimeError(f"split_with_sizes expects split_sizes to sum exactly to {w.shape[0]} (input tensor's "
                           f"size at dimension 0), but got split_sizes={list(sizes)}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [row_range(w, s, s + size) for s, size in zip(starts, sizes)]


@_implements(aten.new_zeros.default, aten.new_empty.default)
def _new_zeros(func, w, size, *args, dtype=None, device=None, **kwargs):
    # FSDP2 pads each shard into a buffer of the shard's size: a zero weight with the shard's layout
    return _zeros_like_layout(w, torch.Size(size), device, dtype)


@_implements(aten.empty_like.default, aten.zeros_like.default)
def _zeros_like(func, w, *args, dtype=None, device=None, **kwargs):
    # `module.to_empty(device=...)`: a zero weight of the same layout, on the device
    return _zeros_like_layout(w, w.shape, device, dtype)


def layout(w) -> tuple:
    """What must agree for one NF4Weight's bytes to be copied into another's."""
    return (tuple(w.shape), w.blocksize, w.double_quant, w.nested_blocksize if w.double_quant else None)


def _check_copy_into_part(dst, src) -> None:
    """Rows of a double-quantized weight take an in-place copy only when it leaves the other rows' scales right:
    un-nested rows hold a copy of their scales (the parent would keep its old ones under the new codes), and
    nested rows share the parent's offset (a source quantized with another offset would shift every other row)."""
    if dst._part_of is None:
        return
    if not dst.double_quant:
        raise ValueError(f"NF4Weight.copy_: the destination is {dst._part_of}; writing codes into it would leave "
                         "the weight's own scales for them unchanged. Quantize the whole weight and copy it in, or "
                         "quantize with double_quant=False")
    same = src.nested_offset is dst.nested_offset or torch.equal(src.nested_offset.to(dst.device),
                                                                dst.nested_offset)
    if not same and not _other_rows_are_zero_codes(dst):
        raise ValueError(f"NF4Weight.copy_: the destination is {dst._part_of}, and the source was quantized with "
                         "another nested offset (the mean of its own block scales): copying it in would shift the "
                         "scales of every other row. Quantize the whole weight and copy it in, or quantize with "
                         "double_quant=False")


def _other_rows_are_zero_codes(part) -> bool:
    """Whether every row of the weight `part` is nested rows of, outside it, holds zero codes (FSDP2's padding of an
    uneven shard): they dequantize to 0 under any scale, so a new shared offset changes nothing there."""
    if part._parent_bytes is None:
        return False
    packed, b0, b1 = part._parent_bytes
    return bool((packed[:b0] == _ZERO_BYTE).all() and (packed[b1:] == _ZERO_BYTE).all())


@_implements(aten.copy_.default)
def _copy_(func, dst, src, non_blocking=False):
    from fastft.quant.nf4_weight import NF4Weight

    if not isinstance(dst, NF4Weight):  # dense.copy_(nf4), dense[:n] = nf4 (transformers' resize): its values
        return dst.copy_(src.dequantize(dst.dtype if dst.is_floating_point() else src.dtype), non_blocking)
    if not isinstance(src, NF4Weight):
        raise NotImplementedError(f"NF4Weight.copy_: the source must be an NF4Weight, got {type(src).__name__} "
                                  "(quantize it first with fastft.quant.quantize_nf4)")
    if src.double_quant and not dst.double_quant and layout(src)[:2] == layout(dst)[:2]:
        return _copy_decoded(dst, src, non_blocking)
    if layout(src) != layout(dst):
        raise ValueError(f"NF4Weight.copy_: layouts differ ({src!r} into {dst!r})")
    _check_copy_into_part(dst, src)
    for a, b in zip(dst._tensors(), src._tensors()):
        a.copy_(b, non_blocking=non_blocking)
    if dst.double_quant:  # in place, so views taken of dst before see it too (their cached float is re-read)
        dst.nested_offset.copy_(src.nested_offset, non_blocking=non_blocking)
    mark_written(dst)
    return dst


def mark_written(w) -> None:
    """Bump the version counters of w's inner tensors (nested offset included) after a write into them here: below
    autograd an in-place write bumps none, and `.offset`'s cache and fastft.ops.qlora_prefetch's decoded buffers are
    keyed on them (a view shares its base's counters, so the base sees the write too)."""
    for t in w._tensors_and_offset():
        if not t.is_inference():  # (an inference tensor has no counter: nothing keyed on it is cached)
            torch.autograd.graph.increment_version(t)


def _copy_decoded(dst, src, non_blocking: bool):
    """A double-quantized weight copied into an un-nested one of its shape: the codes, and the scales decoded to
    fp32 (the values dequantization uses). FSDP2 pads an uneven shard this way when its buffer cannot be nested."""
    if dst._part_of is not None:  # an un-nested piece of a nested weight holds a copy of its scales: writes are lost
        _check_copy_into_part(dst, src)
    dst.packed.copy_(src.packed, non_blocking=non_blocking)
    dst.absmax.copy_(src.block_absmax(), non_blocking=non_blocking)
    mark_written(dst)
    return dst


@_implements(aten.is_pinned.default)
def _is_pinned(func, w, *args, **kwargs):
    return all(t.is_pinned() for t in w._tensors())


@_implements(aten._pin_memory.default)
def _pin_memory(func, w, *args, **kwargs):
    return apply_to_parts(w, lambda t: t.pin_memory())


# DTensor.full_tensor() of a sharded NF4 weight (state dicts, checkpoints): gather the bytes and scales along rows.
# Uneven shards: DTensor pads the short ones with F.pad (constant_pad_nd) to the first's rows, gathers, and narrows.

@_implements(aten.constant_pad_nd.default)
def _pad_rows(func, w, pad, value=0):
    pad = list(pad)
    if w.ndim < 1 or value != 0 or len(pad) != 2 * w.ndim or any(pad[:-1]) or pad[-1] < 0:
        raise NotImplementedError(f"NF4Weight: constant_pad_nd only appends zero rows (dim 0), got pad={pad}, "
                                  f"value={value}")
    # nested only where the padded piece and w both hold whole groups, as FSDP2's padding (_zeros_like_layout): the
    # other pieces of the weight are then nested too, and scatter / all-gather see one layout on every rank
    out = _zeros_like_layout(w, torch.Size((w.shape[0] + pad[-1], *w.shape[1:])))
    if w.shape[0]:
        _copy_(None, row_range(out, 0, w.shape[0]), w)
    return out


def _all_ranks_nested(w, gather) -> bool:
    """Whether every rank's piece keeps nested scales: pieces of one weight may differ (a padded one is un-nested),
    and the all-gather needs the same tensors from every rank."""
    flags = gather(torch.tensor([int(w.double_quant)], dtype=torch.int32, device=w.packed.device))
    return bool(flags.all())


@_implements(torch.ops._c10d_functional.all_gather_into_tensor.default)
def _all_gather(func, w, group_size, group_name):
    wait = torch.ops._c10d_functional.wait_tensor.default
    gather = lambda t: wait(func(t, group_size, group_name))  # noqa: E731
    shape = (w.shape[0] * group_size, *w.shape[1:])
    if _all_ranks_nested(w, gather):
        return w.with_parts(shape=shape, packed=gather(w.packed), absmax=gather(w.absmax),
                            absmax2=gather(w.absmax2))
    return w.with_parts(shape=shape, packed=gather(w.packed), absmax=gather(w.block_absmax().to(torch.float32)),
                        absmax2=None, code2=None, offset=0.0)


# set_model_state_dict(full_state_dict=True) (DCP) hands every rank the whole weight and cuts it into row pieces
# with distribute_tensor, which scatters the pieces from rank 0: scatter their bytes, scales and offset

def _check_one_layout(func, out, inputs, *args, **kwargs):
    """The root scatters whether its pieces share one layout (nested or not): every rank must receive the same
    tensors, and a rank's own piece cannot tell. A mix (uneven shards whose last splits a group of nested scales)
    is refused on every rank rather than left to hang the others."""
    pieces = inputs[0] if inputs else []
    one = int(len({p.double_quant for p in pieces}) <= 1)
    flag = torch.zeros(1, dtype=torch.int32, device=out.packed.device)
    _, work = func([flag], [[torch.full_like(flag, one) for _ in pieces]] if inputs else [], *args, **kwargs)
    work.wait()
    if not flag.item():
        raise NotImplementedError(
            "NF4Weight: a full state dict cannot be scattered into these uneven FSDP2 shards: some hold whole groups "
            "of nested scales and some do not. Load it with load_state_dict (each rank copies its rows), or quantize "
            "with double_quant=False")


def _scatter(func, outputs, inputs, *args, **kwargs):
    out = outputs[0]
    _check_one_layout(func, out, inputs, *args, **kwargs)
    names = ["packed", "absmax"] + (["absmax2", "nested_offset"] if out.double_quant else [])
    for name in names:
        pieces = [[getattr(piece, name) for piece in inputs[0]]] if inputs else []
        _, work = func([getattr(out, name)], pieces, *args, **kwargs)
        work.wait()
    mark_written(out)  # written below autograd: the cached float offset must be re-read, decoded copies redone
    return outputs, work


def _broadcast(func, *args, **kwargs):
    raise NotImplementedError(
        "NF4Weight cannot be broadcast (c10d.broadcast_): the other ranks would receive it into dense buffers. "
        "Instead of set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)), "
        "give every rank the full state dict and leave broadcast_from_rank0 off (NF4 pieces are then scattered); "
        "an FSDP2-sharded NF4Linear also takes a full bitsandbytes-format or dense state dict in load_state_dict "
        "(each rank copies its rows into its shard)")


def _already_waited(func, w):
    return w  # the inner collectives were waited for when they were issued: no async wrapper needed


# by name: `_wrap_tensor_autograd` is registered only once torch.distributed._functional_collectives is imported,
# and c10d exists only in builds with torch.distributed
_TABLE_BY_NAME = {"_c10d_functional::wait_tensor": _already_waited,
                  "_c10d_functional::_wrap_tensor_autograd": _already_waited,
                  "c10d::scatter_": _scatter, "c10d::broadcast_": _broadcast}


def dispatch(func, args, kwargs):
    handler = _TABLE.get(func) or _TABLE_BY_NAME.get(func._schema.name)
    if handler is None and func is aten.cat.default:
        raise NotImplementedError("NF4Weight cannot be concatenated (aten.cat). DistributedDataParallel does so to "
                                  "broadcast parameters: call fastft.integration.nf4_sharding.ignore_nf4_in_ddp(model) "
                                  "before wrapping (frozen NF4 weights need no synchronisation)")
    if handler is None:
        raise NotImplementedError(f"fastft's NF4Weight does not support {func} (it is a frozen quantized weight: "
                                  "use weight.dequantize() for math on its values; a model whose code reads a "
                                  "layer's .weight itself, as a router may, needs that layer left dense: "
                                  "quantize_model(..., skip=[its name]))")
    return handler(func, *args, **kwargs)
