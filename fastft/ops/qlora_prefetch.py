"""FASTFT_QLORA_PREFETCH=1: the QLoRA dequant path decodes the next layer's W while this layer's GEMM runs.

On the dequant path (fastft.ops.qlora_path) every QLoRA GEMM first decodes its NF4 weight into the shared scratch
buffer, on the GEMM's stream: two decodes a layer a step (forward, dx), ~4.6% of a large layer's fwd+bwd on the H100
(docs/gpu-results.md), memory-bound work on the critical path. The decode kernel uses no shared memory and 40
registers a thread (sm_90) in its ROW4 layout, which the prefetches take (nf4_dequant.beside_gemm_configs), so its
blocks fit beside the GEMM's on every SM (tests/sm90_compile.py `overlap`). With prefetch on, two buffers take the
one scratch's place (memory: two of the largest weight instead of one; never a bf16 copy a layer), and:

- the sequence of weights the calls decode is remembered (each weight's successor in the forward and in the
  backward: the last one decoded after it there);
- after a call launches its GEMM, the successor is decoded into the other buffer on a side stream that waits only
  for the work before that GEMM (so the buffer's last reader is done), and an event marks it ready;
- a call whose weight is already in a buffer (prefetched, or decoded by the call before: QDoRA's row norm and GEMM)
  waits for that event and decodes nothing; a mispredicted call decodes on its own stream as without prefetch.

A buffer is matched by the weight's identity (the very object, alive), its bytes' address, its inner tensors' version
counters, the shape and the dtype: a weight written in place (fastft.quant's copy_ bumps the counters too) is decoded
again. Under CUDA-graph capture, and for a weight made under torch.inference_mode (its tensors count no writes), the
single-scratch path runs. Results are the same kernels' on the same inputs, bit for bit.
Off by default until a GPU run shows the gain (benchmarks/gpu_nf4.py's "prefetch" rows, a chain of three layers so
that the two buffers cycle as in a model).
"""
from __future__ import annotations

import os
import weakref
from typing import Callable, Optional, TypeVar

import torch

ENV = "FASTFT_QLORA_PREFETCH"
MAX_REMEMBERED = 4096  # weights whose successor is kept (a model's QLoRA layers; a new weight each call resets it)
_enabled = os.environ.get(ENV, "0").strip() == "1"
T = TypeVar("T")


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    """Turn prefetching on or off for later calls (the buffers are freed when it goes off)."""
    global _enabled
    _enabled = bool(on)
    if not _enabled:
        release()


def usable(qweight) -> bool:
    """Whether this call may prefetch: not while a CUDA graph is being captured (the single scratch's path), and only
    for a weight whose writes can be seen (an inference tensor has no version counter)."""
    if qweight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return not any(t.is_inference() for t in qweight._tensors_and_offset())


def weight_tag(qweight, dtype: torch.dtype) -> tuple:
    """What a buffer holding qweight decoded to `dtype` is known by: the weight's identity (a buffer is also checked
    to belong to this very object, alive: an id is reused after its object dies), where its bytes are, the version
    counters of its inner tensors (bumped by every write: fastft.quant's copy_ bumps them too), shape and dtype."""
    parts = qweight._tensors_and_offset()
    return id(qweight), qweight.packed.data_ptr(), tuple(t._version for t in parts), tuple(qweight.shape), dtype


class _Slot:
    def __init__(self):
        self.buf: Optional[torch.Tensor] = None  # allocated on the calls' stream, written by either
        self.tag: Optional[tuple] = None  # what buf holds (None while it is being written, or nothing)
        self.owner = None  # a weak reference to the weight decoded there
        self.ready = None  # the side stream's event after a prefetch into buf, until a call waits for it


class _Streams:
    """The stream operations (stand-ins on the CPU, where everything runs in order on the one 'stream')."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.device = device

    def current(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def mark(self, stream):
        """An event recorded on `stream` now (None on the CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        if event is not None:
            stream.wait_event(event)


class Prefetcher:
    """The two buffers of one device and dtype, and the order the weights were decoded in."""

    def __init__(self, device: torch.device, dtype: torch.dtype, decode: Callable):
        self.dtype = dtype
        self.decode = decode  # decode(qweight, out, beside_gemm) writes qweight decoded into the flat `out`
        self.streams = _Streams(device)
        self.slots = [_Slot(), _Slot()]
        self.successor: dict[tuple, tuple] = {}  # (tag, order) -> the tag decoded next, last time
        self.weights: dict[tuple, weakref.ref] = {}
        self.last: Optional[tuple] = None  # (tag, order) of the previous call
        self.last_slot: Optional[int] = None  # and the slot it read
        self.decodes = 0  # decodes launched (a test's count)
        self.ahead = 0  # of them, those made ahead of their call (on the side stream on a GPU)

    def run(self, qweight, use: Callable[[torch.Tensor], T], order: str) -> T:
        """use(W) with qweight decoded in one of the buffers (waited for, or decoded now), then the predicted next
        weight decoded into the other on the side stream. order: "forward" or "dx", the pass the call belongs to (a
        weight's successor is the next layer's in the forward and the previous layer's in the backward)."""
        tag = weight_tag(qweight, self.dtype)
        if len(self.weights) > MAX_REMEMBERED:  # weights made afresh each step (a gathered shard): forget the order
            self.weights.clear()
            self.successor.clear()
        self.weights[tag] = weakref.ref(qweight)
        if self.last is not None and self.last[0] != tag:
            self.successor[self.last] = tag
        current = self.streams.current()
        i = self._holding(tag, qweight)
        if i is None:  # not predicted: decoded on the call's stream, into the slot the previous call did not read
            i = 0 if self.last_slot is None else 1 - self.last_slot
            self._fill(i, qweight, tag, current)
        else:
            self.streams.wait(current, self.slots[i].ready)
            self.slots[i].ready = None
        self.last, self.last_slot = (tag, order), i
        before_use = self.streams.mark(current)  # everything before this GEMM: the other buffer's last reader
        rows, cols = qweight.shape
        out = use(self.slots[i].buf[:rows * cols].view(rows, cols))
        self._prefetch(1 - i, self.successor.get((tag, order)), before_use)
        return out

    def _holding(self, tag: tuple, qweight) -> Optional[int]:
        """The slot holding qweight (this very object, alive) decoded as `tag` says, or None."""
        return next((k for k, slot in enumerate(self.slots) if slot.tag == tag and slot.owner() is qweight), None)

    def _fill(self, i: int, qweight, tag: tuple, stream) -> None:
        """qweight (known by `tag`) decoded into slot i on `stream` (the call's), the buffer grown there if needed."""
        slot = self.slots[i]
        self.streams.wait(stream, slot.ready)  # a mispredicted prefetch still writing this buffer finishes first
        slot.ready, slot.tag = None, None
        if slot.buf is None or slot.buf.numel() < qweight.numel():
            if slot.buf is not None and self.streams.cuda:
                stream.wait_stream(self.streams.side)  # the old buffer is dropped once no side work reads it
            slot.buf = None
            slot.buf = torch.empty(qweight.numel(), dtype=self.dtype, device=self.streams.device)
        self.decode(qweight, slot.buf[:qweight.numel()])
        self.decodes += 1
        slot.tag, slot.owner = tag, weakref.ref(qweight)

    def _prefetch(self, j: int, tag: Optional[tuple], after) -> None:
        """The weight `tag` decoded into slot j on the side stream, after the event `after` (the work before the GEMM
        just launched). Only into a buffer already large enough: buffers are allocated on the call's stream alone."""
        ref = self.weights.get(tag)
        qweight = None if ref is None else ref()
        if qweight is None or self._holding(tag, qweight) is not None:
            return
        slot = self.slots[j]
        if weight_tag(qweight, self.dtype) != tag or slot.buf is None or slot.buf.numel() < qweight.numel():
            return  # changed in place since, or the buffer would have to grow (on the calls' stream only)
        slot.tag = None
        if self.streams.cuda:
            side = self.streams.side
            side.wait_event(after)
            for t in qweight._tensors():  # freed meanwhile (a model dropped), their memory waits for this read
                t.record_stream(side)
            with torch.cuda.stream(side):
                self.decode(qweight, slot.buf[:qweight.numel()], True)
            slot.ready = self.streams.mark(side)
        else:
            self.decode(qweight, slot.buf[:qweight.numel()], True)
        self.decodes += 1
        self.ahead += 1
        slot.tag, slot.owner = tag, ref

    def nbytes(self) -> int:
        return sum(s.buf.numel() * s.buf.element_size() for s in self.slots if s.buf is not None)

    def drain(self) -> None:
        """The current stream waits for any prefetch in flight (before the buffers are dropped)."""
        if self.streams.cuda:
            self.streams.current().wait_stream(self.streams.side)


_PREFETCHERS: dict[tuple[torch.device, torch.dtype], Prefetcher] = {}


def prefetcher(device: torch.device, dtype: torch.dtype, decode: Callable) -> Prefetcher:
    key = (device, dtype)
    if key not in _PREFETCHERS:
        _PREFETCHERS[key] = Prefetcher(device, dtype, decode)
    return _PREFETCHERS[key]


def nbytes() -> int:
    return sum(p.nbytes() for p in _PREFETCHERS.values())


def release() -> None:
    """Drop both buffers of every device and dtype (after any prefetch in flight) and the remembered order."""
    for p in _PREFETCHERS.values():
        p.drain()
    _PREFETCHERS.clear()
