"""`NF4Weight`: a frozen NF4-quantized tensor (bitsandbytes layout) as a torch tensor subclass, and `quantize_nf4`.

Modelled on torchao's NF4Tensor: a wrapper tensor whose logical shape and dtype are the weight's (N, K) and its
compute dtype, holding the packed uint8 codes and the block scales as inner tensors. Because it is a tensor it
can be a frozen `nn.Parameter` (visible to `model.parameters()`, moved by `module.to(device)`, seen by peft),
traced by torch.compile (`__tensor_flatten__`), and sharded by FSDP2 (`fsdp_pre_all_gather` /
`fsdp_post_all_gather` gather the packed bytes and scales, not a dense copy). The aten ops it supports are
listed in one table (fastft/quant/nf4_tensor_ops.py); any other op raises, naming it — arithmetic on the
weight goes through `.dequantize()`.

Its state dict is bitsandbytes' own (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), so checkpoints move between fastft and
transformers + bitsandbytes.
"""
from __future__ import annotations

import json
import math

import torch
from torch._subclasses.fake_tensor import is_fake

from fastft.arguments import check_flag
from fastft.kernels import nf4_cpu
from fastft.kernels.runtime import raw_pointers_ok
from fastft.quant import nf4_format as fmt
from fastft.quant import nf4_fsdp
from fastft.quant import nf4_tensor_ops as ops

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _flat(t: torch.Tensor) -> torch.Tensor:
    # no op on the common path: the constructor also runs inside compiled graphs (unflatten)
    t = t if t.dim() == 1 else t.reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def tensor_version(t: torch.Tensor) -> int | None:
    """t's in-place write counter; None for an inference tensor (made under torch.inference_mode), which has none:
    its value is then read every time instead of cached."""
    return None if t.is_inference() else t._version


class NF4Weight(torch.Tensor):
    """An NF4-quantized tensor: packed uint8 codes (`.packed`), per-block scales, logical shape and dtype.

    Scales are `.absmax` (fp32 per block), or with double quantization (`.double_quant`) 8-bit codes in
    `.absmax` plus `.absmax2` (fp32 per 256 blocks), `.code2` (256 fp32) and `.offset` (a float; stored as the
    0-d fp32 tensor `.nested_offset`, so that torch.compile does not specialise, and recompile, on every layer's).
    `.dtype` is the original (compute) dtype, what `.dequantize()` returns; the codes never change dtype.
    """

    quant_type = "nf4"
    # Methods and torch functions run as on a plain tensor and reach __torch_dispatch__ as aten ops.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, packed: torch.Tensor, absmax: torch.Tensor = None, shape=None, dtype: torch.dtype = None,
                blocksize: int = 64, *, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                offset: float | torch.Tensor = 0.0, nested_blocksize: int = fmt.NESTED_BLOCKSIZE,
                code: torch.Tensor | None = None, requires_grad=None):
        if absmax is None or shape is None or dtype is None or requires_grad is not None:
            # type(param)(value, requires_grad=...): how accelerate's offload (cpu_offload, dispatch_model with cpu
            # or disk in the device map) rebuilds a parameter from the tensors it stored, which for an NF4 layer are
            # its bitsandbytes-keyed parts: one tensor cannot make a weight
            raise TypeError("NF4Weight cannot be rebuilt from one tensor (accelerate's offload rebuilds parameters "
                            "as type(param)(value, requires_grad=...)): fastft's NF4 layers do not take accelerate's "
                            "cpu/disk offload; keep them on the execution device (a device_map without 'cpu' or "
                            "'disk' for them), or offload a dense model")
        shape = torch.Size(shape)
        if dtype not in fmt.FLOAT_DTYPES:
            raise ValueError(f"NF4Weight of shape {tuple(shape)}: dtype must be one of {fmt.FLOAT_DTYPES}, "
                             f"got {dtype}")
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype, blocksize: int = 64,
                 *, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                 offset: float | torch.Tensor = 0.0, nested_blocksize: int = fmt.NESTED_BLOCKSIZE,
                 code: torch.Tensor | None = None):
        self.blocksize = fmt.check_blocksize(blocksize, "NF4Weight")
        # flat, contiguous, and the nested tables fp32: the form every kernel (Triton, C++, CUDA) reads
        self.packed = _flat(packed)
        self.absmax = _flat(absmax)
        self.absmax2 = None if absmax2 is None else _flat(absmax2).float()
        self.code2 = None if code2 is None else _flat(code2).float()
        self.nested_offset, self._offset_cache = None, None
        if self.absmax2 is not None:
            if isinstance(offset, torch.Tensor):
                self.nested_offset = offset.reshape(()) if offset.dim() else offset
            else:
                self.nested_offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
                self._offset_cache = (tensor_version(self.nested_offset), float(offset))
        self.nested_blocksize = int(nested_blocksize)
        # set by row slicing (nf4_tensor_ops.row_range) on some rows of a double-quantized weight: an in-place
        # copy_ into them must leave the other rows' scales as they are
        self._part_of: str | None = None
        # with _part_of on nested rows: (the whole weight's packed bytes, this part's byte range), to tell whether
        # every other row holds zero codes (FSDP2's padding), which a new offset leaves at zero
        self._parent_bytes: tuple | None = None
        self.code = fmt.nf4_code(str(packed.device)) if code is None else _flat(code)
        self._validate()

    def _validate(self) -> None:
        n, what = self.numel(), f"NF4Weight of shape {tuple(self.shape)}"
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"{what}: packed data must be {(n + 1) // 2} uint8 values, got "
                             f"{self.packed.numel()} of {self.packed.dtype}")
        blocks = fmt.num_blocks(n, self.blocksize)
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != blocks:
            raise ValueError(f"{what}: blocksize {self.blocksize} needs {blocks} absmax values of {want}, got "
                             f"{self.absmax.numel()} of {self.absmax.dtype}")
        if self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError(f"{what}: the code table must be 16 fp32 values, got {self.code.numel()} of "
                             f"{self.code.dtype}")
        # NF4's own table only: the CPU paths (C++, torch) decode with it whatever `code` says, the GPU kernels read
        # `code`. Checked where it costs no device sync (weights are built on the CPU: quantized or loaded there), on
        # real tensors (torch.compile rebuilds weights from fake ones)
        if type(self.code) is torch.Tensor and self.code.device.type == "cpu" \
                and not torch.equal(self.code, fmt.nf4_code()):
            raise ValueError(f"{what}: the code table is not NF4's ({self.code.tolist()}); fastft decodes NF4 only")
        if self.double_quant:
            if self.code2 is None or self.code2.numel() != 256:
                raise ValueError(f"{what}: double quantization needs a 256-entry nested_quant_map")
            if self.nested_blocksize <= 0 or self.nested_blocksize & (self.nested_blocksize - 1):
                raise ValueError(f"{what}: nested_blocksize must be a power of two, got {self.nested_blocksize}")
            if self.absmax2.numel() != fmt.num_blocks(blocks, self.nested_blocksize):
                raise ValueError(f"{what}: nested_absmax needs {fmt.num_blocks(blocks, self.nested_blocksize)} "
                                 f"values, got {self.absmax2.numel()}")
            if self.nested_offset.dtype != torch.float32:
                raise ValueError(f"{what}: the nested offset must be fp32, got {self.nested_offset.dtype}")
        devices = {t.device for t in self._tensors_and_offset()}
        if len(devices) != 1:
            raise ValueError(f"{what}: all parts must be on one device, got {sorted(map(str, devices))}")

    # ------------------------------------------------------------------------------------------
    # what it is

    @property
    def double_quant(self) -> bool:
        """True when the block scales are themselves 8-bit quantized (bitsandbytes' compress_statistics).

        (Not called `is_nested`: torch.Tensor.is_nested means a nested tensor, and torch reads it.)"""
        return self.absmax2 is not None

    @property
    def offset(self) -> float:
        """The nested scales' mean as a float (0.0 without double quantization); read once, then cached until
        `.nested_offset` changes in place. A meta weight has no values: 0.0 unless it was moved there from one
        whose offset was read."""
        if self.nested_offset is None:
            return 0.0
        if self.nested_offset.is_meta:  # nothing to read
            return 0.0 if self._offset_cache is None else self._offset_cache[1]
        version = tensor_version(self.nested_offset)
        if self._offset_cache is None or version is None or self._offset_cache[0] != version:
            self._offset_cache = (version, float(self.nested_offset))
        return self._offset_cache[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        parts = [self.packed, self.absmax, self.code]
        return parts + ([self.absmax2, self.code2] if self.double_quant else [])

    def _tensors_and_offset(self) -> list[torch.Tensor]:
        """Every inner tensor, the nested offset (a 0-d tensor, not a byte of the format) included."""
        return self._tensors() + ([self.nested_offset] if self.double_quant else [])

    @torch.compiler.disable  # peft's disable_adapter() builds layer reprs inside a compiled forward (DPO's reference)
    def __repr__(self, *, tensor_contents=None) -> str:
        nested = f", double_quant(blocksize={self.nested_blocksize})" if self.double_quant else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{nested}, "
                f"device={self.device}, {self.nbytes / 2**20:.2f} MiB)")

    # ------------------------------------------------------------------------------------------
    # values

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per block (the nested codes decoded)."""
        if not self.double_quant:
            return self.absmax
        # traced: the offset as its 0-d tensor (a host read of it cannot be traced); same fp32 value either way
        offset = self.nested_offset if self._traced() else self.offset
        return fmt.dequantize_blockwise8_torch(self.absmax, self.absmax2, self.code2, offset, self.nested_blocksize)

    def _traced(self) -> bool:
        """Under torch.compile, where the nested offset cannot be read on the host. torch 2.11's dynamo (the GPU
        machine's) puts `w.dequantize()` in the graph as a tensor method and runs it on fake tensors outside
        is_compiling(): there the inner tensors are fake (reading the offset stopped the trace)."""
        return torch.compiler.is_compiling() or is_fake(self.packed)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in `dtype` (default: the original dtype), bit-identical to bitsandbytes' dequantize_4bit.

        Under torch.compile one custom op (fastft::nf4_dequantize) on the inner tensors, traced whole."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in fmt.FLOAT_DTYPES:
            raise ValueError(f"NF4Weight.dequantize: dtype must be one of {fmt.FLOAT_DTYPES}, got {dtype}")
        if self._traced():
            flat = torch.ops.fastft.nf4_dequantize(self.packed, self.absmax, self.absmax2, self.code2, self.code,
                                                   self.nested_offset, self.nested_blocksize, self.blocksize,
                                                   self.numel(), dtype)
        else:  # eager: the cached float offset, no device sync
            flat = ops.dequantize_parts(self.packed, self.absmax, self.absmax2, self.code2, self.code, self.offset,
                                        self.nested_blocksize, self.blocksize, self.numel(), dtype)
        return flat.view(self.shape)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows start..stop-1 of a 2-D weight, dequantized alone (e.g. a vocab chunk of an lm_head): only the
        blocks that hold them (whole nested-scale groups, ≤ blocksize·256 elements either side) are decoded."""
        if self.ndim != 2:
            raise ValueError(f"NF4Weight.dequantize_rows: needs a 2-D weight, got shape {tuple(self.shape)}")
        rows, cols = self.shape
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"NF4Weight.dequantize_rows: need 0 <= start <= stop <= {rows}, got {start}, {stop}")
        n = self.numel()
        unit = self.blocksize * (self.nested_blocksize if self.double_quant else 1)
        e0, e1 = start * cols, stop * cols
        a0, a1 = (e0 // unit) * unit, min(n, -(-e1 // unit) * unit)
        if (a0, a1) == (0, n):
            return self.dequantize(dtype)[start:stop]
        b0, b1 = a0 // self.blocksize, fmt.num_blocks(a1, self.blocksize)
        nested = {}
        if self.double_quant:
            g0 = a0 // unit
            nested = dict(absmax2=self.absmax2[g0: g0 + fmt.num_blocks(b1 - b0, self.nested_blocksize)],
                          code2=self.code2, offset=self.nested_offset, nested_blocksize=self.nested_blocksize)
        part = NF4Weight(self.packed[a0 // 2: (a1 + 1) // 2], self.absmax[b0:b1], (a1 - a0,), self.dtype,
                         self.blocksize, code=self.code, **nested)
        return part.dequantize(dtype)[e0 - a0: e1 - a0].view(stop - start, cols)

    def kernel_operand(self):
        """The 2-D weight as the Triton kernels take it (fastft.kernels.nf4_gemm.NF4Operand)."""
        from fastft.kernels.nf4_gemm import NF4Operand
        if self.ndim != 2:
            raise ValueError(f"NF4Weight: a matrix operand must be 2-D, got shape {tuple(self.shape)}")
        return NF4Operand(self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.nested_blocksize,
                          self.code, self.blocksize, self.shape[0], self.shape[1])

    def with_parts(self, **parts) -> NF4Weight:
        """A new NF4Weight with some fields replaced (packed, absmax, shape, dtype, absmax2, offset, ...).

        Without a new `offset` it shares this one's `.nested_offset` tensor (and its cached float)."""
        fields = dict(packed=self.packed, absmax=self.absmax, shape=self.shape, dtype=self.dtype,
                      blocksize=self.blocksize, absmax2=self.absmax2, code2=self.code2,
                      offset=0.0 if self.nested_offset is None else self.nested_offset,
                      nested_blocksize=self.nested_blocksize, code=self.code)
        fields.update(parts)
        out = NF4Weight(**fields)
        if out.nested_offset is not None and out.nested_offset is self.nested_offset:
            out._offset_cache = self._offset_cache
        if out.packed is self.packed:  # a view of the same bytes (detach, view): what it is a part of stays
            out._part_of, out._parent_bytes = self._part_of, self._parent_bytes
        return out

    # ------------------------------------------------------------------------------------------
    # devices and dtypes (nf4_tensor_ops.cast_dtype: the codes never change dtype; `.dtype`, the one dequantize
    # returns, stays under floating-point casts, as bitsandbytes' 4-bit weights do)

    def to(self, *args, copy: bool = False, **kwargs) -> NF4Weight:
        """On the target device: self when already there and not `copy`, else a copy. A floating-point dtype leaves
        the weight's dtype as it is; another dtype is refused (TypeError): use `.dequantize(dtype)`."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        dtype = ops.cast_dtype(self, dtype, "to")
        device = self.device if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device and dtype == self.dtype and not copy:
            return self
        return ops.apply_to_parts(self, lambda t: t.to(device, non_blocking=non_blocking, copy=True), dtype=dtype)

    def requires_grad_(self, requires_grad: bool = True) -> NF4Weight:
        if requires_grad:  # the 4-bit codes have no gradient: a weight that claimed one would silently not train
            raise self._frozen_error()
        return super().requires_grad_(False)

    # `weight.requires_grad = True` (a full fine-tuning loop over model.parameters()) sets torch's flag directly
    @property
    def requires_grad(self) -> bool:
        return torch._C.TensorBase.requires_grad.__get__(self)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value:
            raise self._frozen_error()
        torch._C.TensorBase.requires_grad.__set__(self, False)

    @property
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        """`weight.data = x`: x's values written into this weight (an NF4Weight of the same layout, or a dense tensor
        quantized in it). torch's own setter swaps the shape only, not the codes and scales this weight's Python
        fields hold: the layer went on computing with the old weight."""
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(self.shape):
            raise ValueError(f"NF4Weight.data = {type(value).__name__} of shape "
                             f"{tuple(getattr(value, 'shape', ()))}: expected a tensor of this weight's shape "
                             f"{tuple(self.shape)} (to give a layer another shape, assign a new weight: "
                             "layer.weight = quantize_nf4(w))")
        if not isinstance(value, NF4Weight):
            value = quantize_nf4(value.detach().to(self.device), self.blocksize, self.double_quant)
        with torch.no_grad():
            self.copy_(value)

    def _frozen_error(self) -> RuntimeError:
        return RuntimeError(f"NF4Weight of shape {tuple(self.shape)} is frozen: it cannot require gradients "
                            "(requires_grad = True, requires_grad_(True), nn.Parameter(weight) without "
                            "requires_grad=False, or module.requires_grad_(True) over a quantized model). Train "
                            "adapters on it (e.g. LoRA with fastft.get_peft_model), or train a dense copy: "
                            "weight.dequantize(dtype)")

    def cuda(self, device=None, non_blocking: bool = False, **_) -> NF4Weight:
        device = torch.cuda.current_device() if device is None else device
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device, non_blocking=non_blocking)

    def cpu(self, **_) -> NF4Weight:
        return self.to("cpu")

    # Shared memory (`module.share_memory()`, torch.multiprocessing): a wrapper tensor has no storage of its own
    # (torch's share_memory_ would read it and crash), so these act on the inner tensors, which hold the bytes.

    def share_memory_(self) -> NF4Weight:
        for t in self._tensors_and_offset():
            t.share_memory_()
        return self

    def is_shared(self) -> bool:
        return all(t.is_shared() for t in self._tensors_and_offset())

    # ------------------------------------------------------------------------------------------
    # tensor subclass protocol (torch.compile, FSDP2, aten ops)

    def __tensor_flatten__(self):
        names = ["packed", "absmax", "code"] + (["absmax2", "code2", "nested_offset"] if self.double_quant else [])
        return names, (self.dtype, self.blocksize, self.nested_blocksize)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        dtype, blocksize, nested_blocksize = meta
        return NF4Weight(inner["packed"], inner["absmax"], outer_size, dtype, blocksize,
                         absmax2=inner.get("absmax2"), code2=inner.get("code2"),
                         offset=inner.get("nested_offset", 0.0),
                         nested_blocksize=nested_blocksize, code=inner["code"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return ops.dispatch(func, args, kwargs or {})

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        return nf4_fsdp.fsdp_pre_all_gather(self, mesh, outer_size)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        return nf4_fsdp.fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)

    def __reduce_ex__(self, proto):
        return (_rebuild_nf4_weight, (self.packed, self.absmax, tuple(self.shape), self.dtype, self.blocksize,
                                      self.absmax2, self.code2, self.offset, self.nested_blocksize, self.code,
                                      isinstance(self, torch.nn.Parameter)))

    # ------------------------------------------------------------------------------------------
    # bitsandbytes state dict

    def bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """bitsandbytes' keys under `prefix` (e.g. "model.layers.0.mlp.up_proj.weight"); all values tensors."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
                "shape": list(self.shape)}
        # tables cloned: weights share them in memory, but a state dict must not (safetensors, tie detection)
        out = {prefix: self.packed.view(-1, 1), f"{prefix}.absmax": self.absmax,
               f"{prefix}.quant_map": self.code.clone()}
        if self.double_quant:
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset)
            out[f"{prefix}.nested_absmax"] = self.absmax2
            out[f"{prefix}.nested_quant_map"] = self.code2.clone()
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.{QUANT_STATE_KEY}"] = torch.tensor(list(blob), dtype=torch.uint8, device=self.device)
        return out

    @staticmethod
    def has_bnb_state(state: dict, prefix: str = "weight") -> bool:
        return any(k.startswith(f"{prefix}.quant_state.bitsandbytes__") for k in state)

    @classmethod
    def from_bnb_state_dict(cls, state: dict, prefix: str = "weight", device=None) -> NF4Weight:
        """Build from bitsandbytes' keys under `prefix`; errors name the missing or wrong key."""
        qs_keys = [k for k in state if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if not qs_keys:
            raise KeyError(f"NF4 checkpoint: missing '{prefix}.{QUANT_STATE_KEY}' (the packed quant state)")
        if qs_keys[0] != f"{prefix}.{QUANT_STATE_KEY}":
            raise ValueError(f"NF4 checkpoint: '{qs_keys[0]}' is not NF4 (only quant_type nf4 is supported)")

        def need(key: str) -> torch.Tensor:
            if key not in state:
                raise KeyError(f"NF4 checkpoint: missing '{key}' (needed by '{prefix}')")
            t = state[key]
            return t if device is None else t.to(device)

        meta = json.loads(bytes(state[qs_keys[0]].cpu().tolist()).decode("utf-8"))
        for field in ("blocksize", "dtype", "shape"):
            if field not in meta:
                raise KeyError(f"NF4 checkpoint: '{qs_keys[0]}' has no '{field}'")
        if meta["dtype"] not in _DTYPES_BY_NAME:
            raise ValueError(f"NF4 checkpoint: '{prefix}' has unsupported dtype {meta['dtype']!r}")
        code = need(f"{prefix}.quant_map").float()
        if code.numel() != 16 or not torch.equal(code.cpu(), fmt.nf4_code()):
            raise ValueError(f"NF4 checkpoint: '{prefix}.quant_map' is not the NF4 code table")
        shape = torch.Size(meta["shape"])
        packed = need(prefix).contiguous().reshape(-1).view(torch.uint8)[: (math.prod(shape) + 1) // 2]
        nested = {}
        if "nested_blocksize" in meta or f"{prefix}.nested_absmax" in state:
            for field in ("nested_blocksize", "nested_offset"):
                if field not in meta:
                    raise KeyError(f"NF4 checkpoint: '{qs_keys[0]}' has no '{field}'")
            nested = dict(absmax2=need(f"{prefix}.nested_absmax").float(), code2=need(f"{prefix}.nested_quant_map"),
                          offset=float(meta["nested_offset"]), nested_blocksize=int(meta["nested_blocksize"]))
        return cls(packed, need(f"{prefix}.absmax"), shape, _DTYPES_BY_NAME[meta["dtype"]], int(meta["blocksize"]),
                   code=code, **nested)


def local_nf4(t) -> NF4Weight | None:
    """The NF4Weight behind `t`: t itself, or the local shard of a DTensor (FSDP2) wrapping one; else None."""
    if isinstance(t, NF4Weight):
        return t
    local = getattr(t, "_local_tensor", None)  # DTensor, without importing torch.distributed
    return local if isinstance(local, NF4Weight) else None


def _rebuild_nf4_weight(packed, absmax, shape, dtype, blocksize, absmax2, code2, offset, nested_blocksize, code,
                        is_param=False):
    w = NF4Weight(packed, absmax, shape, dtype, blocksize, absmax2=absmax2, code2=code2, offset=offset,
                  nested_blocksize=nested_blocksize, code=code)
    return torch.nn.Parameter(w, requires_grad=False) if is_param else w


torch.serialization.add_safe_globals([NF4Weight, _rebuild_nf4_weight])


def _refuse_non_finite(t: torch.Tensor, what: str, chunk: int = 1 << 24) -> None:
    """ValueError naming the tensor, its count of NaN/inf and the first one's index; checked in chunks so the
    check adds at most `chunk` bytes to a quantize-while-loading peak."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        if bool(torch.isfinite(flat[start:start + chunk]).all()):
            continue
        bad = ~torch.isfinite(flat)
        first = tuple(int(i) for i in torch.unravel_index(bad.nonzero()[0, 0], t.shape))
        raise ValueError(f"quantize_nf4: {what} (shape {tuple(t.shape)}) has {int(bad.sum())} non-finite value(s) "
                         f"(NaN/inf), the first at index {first}; NF4 cannot represent them — fix the weights (or "
                         "the merge that produced them) before quantizing")


def check_quantizable(tensor, blocksize: int, *, name: str | None = None) -> None:
    """quantize_nf4's refusals (TypeError / ValueError naming the tensor) without quantizing: a dense float tensor,
    not empty, no NaN/inf (a meta tensor has no values to check), and a valid blocksize. One pass over the values."""
    what = f"`{name}`" if name else "`tensor`"
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize_nf4: {what} must be a torch.Tensor, got {type(tensor).__name__}")
    if local_nf4(tensor) is not None:
        sharded = "" if isinstance(tensor, NF4Weight) else " (sharded as a DTensor)"
        raise TypeError(f"quantize_nf4: {what} is already an NF4Weight{sharded}: copy it into the target weight "
                        "(`weight.copy_(...)`) or assign it, instead of quantizing it again")
    if tensor.dtype not in fmt.FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4: {what} must be float32, float16 or bfloat16, got {tensor.dtype}")
    fmt.check_blocksize(blocksize, "quantize_nf4")
    if tensor.numel() == 0:
        raise ValueError(f"quantize_nf4: {what} is empty")
    if not tensor.is_meta:
        with torch.no_grad():
            _refuse_non_finite(tensor.detach(), what)


def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
                 name: str | None = None) -> NF4Weight:
    """Quantize `tensor` (fp32/fp16/bf16, any shape and device) to NF4, bit-identical to bitsandbytes'
    `quantize_4bit(tensor, blocksize, compress_statistics=double_quant, quant_type="nf4")`.

    name: what to call the tensor in errors (e.g. the layer's weight key).
    A meta `tensor` gives a meta NF4Weight of the same layout (no values to quantize).
    Non-finite values are refused (ValueError) rather than copied from bitsandbytes: there a NaN makes its
    whole block NaN and an inf makes its block's scale inf (inf·0 = NaN for the other codes), so the
    quantized weight is garbage either way; a NaN/inf weight is a broken checkpoint or a diverged merge, and
    saying so where it enters beats a model that silently outputs NaN. The check is one pass over the input.
    """
    check_quantizable(tensor, blocksize, name=name)
    check_flag(double_quant, "quantize_nf4", "double_quant")
    if tensor.is_meta:  # no values (accelerate's init_empty_weights): the layout alone, to fill with to_empty + a load
        return ops.zero_weight(tensor.shape, tensor.dtype, blocksize, double_quant, tensor.device)
    with torch.no_grad():
        t = tensor.detach()
        if t.device.type == "cpu" and nf4_cpu.available() and raw_pointers_ok(t):
            packed, absmax = nf4_cpu.quantize(t, blocksize)
        else:
            packed, absmax = fmt.quantize_nf4_torch(t, blocksize)
        nested = {}
        if double_quant:
            q, absmax2, code2, offset = fmt.double_quantize(absmax)
            absmax, nested = q, dict(absmax2=absmax2, code2=code2, offset=offset)
    return NF4Weight(packed, absmax, tensor.shape, tensor.dtype, blocksize, **nested)
