"""`NF4Weight`: a frozen NF4-quantized tensor (bitsandbytes layout) as one value, and `quantize_nf4`.

Modelled on torchao's NF4Tensor: the object knows its shape, dtype and scales, dequantizes, moves between
devices and serializes; every operation it supports is a method here. Its state dict is bitsandbytes' own
(`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`), so checkpoints move between fastft and transformers + bitsandbytes.
"""
from __future__ import annotations

import json
import math

import torch

from fastft.kernels import nf4_cpu
from fastft.kernels.runtime import HAS_TRITON
from fastft.quant import nf4_format as fmt

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


class NF4Weight:
    """An NF4-quantized tensor: packed uint8 codes (`.packed`), per-block scales, shape and original dtype.

    Scales are `.absmax` (fp32 per block), or with double quantization 8-bit codes in `.absmax` plus
    `.absmax2` (fp32 per 256 blocks), `.code2` (256 fp32) and `.offset` (a float).
    """

    quant_type = "nf4"

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype, blocksize: int = 64,
                 *, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None, offset: float = 0.0,
                 nested_blocksize: int = fmt.NESTED_BLOCKSIZE, code: torch.Tensor | None = None):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = fmt.check_blocksize(blocksize, "NF4Weight")
        # flat, contiguous, and the nested tables fp32: the form every kernel (Triton, C++, CUDA) reads
        self.packed = packed.reshape(-1).contiguous()
        self.absmax = absmax.reshape(-1).contiguous()
        self.absmax2 = None if absmax2 is None else absmax2.reshape(-1).contiguous().float()
        self.code2 = None if code2 is None else code2.reshape(-1).contiguous().float()
        self.offset = float(offset)
        self.nested_blocksize = int(nested_blocksize)
        self.code = fmt.nf4_code(str(packed.device)) if code is None else code.reshape(-1)
        self._validate()

    def _validate(self) -> None:
        n, what = self.numel(), f"NF4Weight of shape {tuple(self.shape)}"
        if self.dtype not in fmt.FLOAT_DTYPES:
            raise ValueError(f"{what}: dtype must be one of {fmt.FLOAT_DTYPES}, got {self.dtype}")
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"{what}: packed data must be {(n + 1) // 2} uint8 values, got "
                             f"{self.packed.numel()} of {self.packed.dtype}")
        blocks = fmt.num_blocks(n, self.blocksize)
        want = torch.uint8 if self.is_nested else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != blocks:
            raise ValueError(f"{what}: blocksize {self.blocksize} needs {blocks} absmax values of {want}, got "
                             f"{self.absmax.numel()} of {self.absmax.dtype}")
        if self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError(f"{what}: the code table must be 16 fp32 values, got {self.code.numel()} of "
                             f"{self.code.dtype}")
        if self.is_nested:
            if self.code2 is None or self.code2.numel() != 256:
                raise ValueError(f"{what}: double quantization needs a 256-entry nested_quant_map")
            if self.nested_blocksize <= 0 or self.nested_blocksize & (self.nested_blocksize - 1):
                raise ValueError(f"{what}: nested_blocksize must be a power of two, got {self.nested_blocksize}")
            if self.absmax2.numel() != fmt.num_blocks(blocks, self.nested_blocksize):
                raise ValueError(f"{what}: nested_absmax needs {fmt.num_blocks(blocks, self.nested_blocksize)} "
                                 f"values, got {self.absmax2.numel()}")
        devices = {t.device for t in self._tensors()}
        if len(devices) != 1:
            raise ValueError(f"{what}: all parts must be on one device, got {sorted(map(str, devices))}")

    # ------------------------------------------------------------------------------------------
    # what it is

    @property
    def is_nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        parts = [self.packed, self.absmax, self.code]
        return parts + ([self.absmax2, self.code2] if self.is_nested else [])

    def __repr__(self) -> str:
        nested = f", double_quant(blocksize={self.nested_blocksize})" if self.is_nested else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{nested}, "
                f"device={self.device}, {self.nbytes / 2**20:.2f} MiB)")

    # ------------------------------------------------------------------------------------------
    # values

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per block (the nested codes decoded)."""
        if not self.is_nested:
            return self.absmax
        return fmt.dequantize_blockwise8_torch(self.absmax, self.absmax2, self.code2, self.offset,
                                               self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in `dtype` (default: the original dtype), bit-identical to bitsandbytes' dequantize_4bit."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in fmt.FLOAT_DTYPES:
            raise ValueError(f"NF4Weight.dequantize: dtype must be one of {fmt.FLOAT_DTYPES}, got {dtype}")
        n = self.numel()
        if self.device.type == "cuda" and HAS_TRITON:
            from fastft.kernels.nf4_dequant import nf4_dequantize
            flat = nf4_dequantize(self.packed, self.absmax, n, self.blocksize, dtype, self.code,
                                  absmax2=self.absmax2, code2=self.code2, offset=self.offset,
                                  nested_blocksize=self.nested_blocksize)
        elif self.device.type == "cpu" and nf4_cpu.available():
            flat = nf4_cpu.dequantize(self.packed, self.block_absmax(), n, self.blocksize, dtype)
        else:
            flat = fmt.dequantize_nf4_torch(self.packed, self.block_absmax(), n, self.blocksize, dtype)
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
        unit = self.blocksize * (self.nested_blocksize if self.is_nested else 1)
        e0, e1 = start * cols, stop * cols
        a0, a1 = (e0 // unit) * unit, min(n, -(-e1 // unit) * unit)
        if (a0, a1) == (0, n):
            return self.dequantize(dtype)[start:stop]
        b0, b1 = a0 // self.blocksize, fmt.num_blocks(a1, self.blocksize)
        nested = {}
        if self.is_nested:
            g0 = a0 // unit
            nested = dict(absmax2=self.absmax2[g0: g0 + fmt.num_blocks(b1 - b0, self.nested_blocksize)],
                          code2=self.code2, offset=self.offset, nested_blocksize=self.nested_blocksize)
        part = NF4Weight(self.packed[a0 // 2: (a1 + 1) // 2], self.absmax[b0:b1], (a1 - a0,), self.dtype,
                         self.blocksize, code=self.code, **nested)
        return part.dequantize(dtype)[e0 - a0: e1 - a0].view(stop - start, cols)

    def kernel_operand(self):
        """The 2-D weight as the Triton kernels take it (fastft.kernels.qlora_linear.NF4Operand)."""
        from fastft.kernels.qlora_linear import NF4Operand
        if self.ndim != 2:
            raise ValueError(f"NF4Weight: a matrix operand must be 2-D, got shape {tuple(self.shape)}")
        return NF4Operand(self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.nested_blocksize,
                          self.code, self.blocksize, self.shape[0], self.shape[1])

    # ------------------------------------------------------------------------------------------
    # devices

    def to(self, device=None, *, non_blocking: bool = False) -> NF4Weight:
        """A copy on `device` (the codes and scales never change dtype); self when already there."""
        device = torch.device(device) if device is not None else self.device
        if device == self.device:
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         absmax2=move(self.absmax2), code2=move(self.code2), offset=self.offset,
                         nested_blocksize=self.nested_blocksize, code=move(self.code))

    def cuda(self, device: int | None = None) -> NF4Weight:
        return self.to(torch.device("cuda", torch.cuda.current_device() if device is None else device))

    def cpu(self) -> NF4Weight:
        return self.to("cpu")

    # ------------------------------------------------------------------------------------------
    # bitsandbytes state dict

    def bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """bitsandbytes' keys under `prefix` (e.g. "model.layers.0.mlp.up_proj.weight"); all values tensors."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
                "shape": list(self.shape)}
        # tables cloned: weights share them in memory, but a state dict must not (safetensors, tie detection)
        out = {prefix: self.packed.view(-1, 1), f"{prefix}.absmax": self.absmax,
               f"{prefix}.quant_map": self.code.clone()}
        if self.is_nested:
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


def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize `tensor` (fp32/fp16/bf16, any shape and device) to NF4, bit-identical to bitsandbytes'
    `quantize_4bit(tensor, blocksize, compress_statistics=double_quant, quant_type="nf4")`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize_nf4: `tensor` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in fmt.FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4: `tensor` must be float32, float16 or bfloat16, got {tensor.dtype}")
    fmt.check_blocksize(blocksize, "quantize_nf4")
    if tensor.numel() == 0:
        raise ValueError("quantize_nf4: `tensor` is empty")
    with torch.no_grad():
        t = tensor.detach()
        if t.device.type == "cpu" and nf4_cpu.available():
            packed, absmax = nf4_cpu.quantize(t, blocksize)
        else:
            packed, absmax = fmt.quantize_nf4_torch(t, blocksize)
        nested = {}
        if double_quant:
            q, absmax2, code2, offset = fmt.double_quantize(absmax)
            absmax, nested = q, dict(absmax2=absmax2, code2=code2, offset=offset)
    return NF4Weight(packed, absmax, tensor.shape, tensor.dtype, blocksize, **nested)
