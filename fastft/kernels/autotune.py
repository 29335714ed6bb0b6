"""A small autotuner: time each launch config once per problem key, keep the fastest.

Unlike `triton.autotune` it skips configs that fail to compile on this triton/GPU (so one
broken variant, e.g. warp specialization on an older triton, never breaks the op), and under
the interpreter or with FASTFT_AUTOTUNE=0 it takes the first config without timing anything.
A key first seen while a CUDA graph is being captured is not timed either (timing syncs the device, which breaks
the capture): the first config that runs is launched into the graph and the key stays untuned for later calls.
"""
from __future__ import annotations

import logging
import os
import statistics
from typing import Callable, Hashable, Sequence

from fastft.kernels.runtime import INTERPRET, deterministic

log = logging.getLogger(__name__)

Config = dict  # kernel meta-parameters, including num_warps / num_stages


def bench(fn: Callable[[], None], warmup_ms: float = 5.0, timed_ms: float = 20.0) -> float:
    """Median milliseconds of fn() on the current CUDA device: the one timing helper the tuners use (tests replace
    it). CUDA events around each call, the L2 cache flushed before each by zeroing a buffer of the L2's size.
    Not triton.testing.do_bench: it allocates 256 MB for its flush on every call, which counted in the peak memory
    of every step that tunes a kernel (a first step's: +0.25 GiB on a small model's ~2 GiB). About `warmup_ms` of
    untimed calls, then `timed_ms` of timed ones (3 to 1000 calls)."""
    import torch

    flush = _l2_flush_buffer()
    fn()  # (compiled already: the tuner launched it once)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(min(100, max(1, int(warmup_ms / estimate)))):
        fn()
    calls = min(1000, max(3, int(timed_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _l2_flush_buffer():
    """A buffer the size of the current GPU's L2 cache (64 MiB where torch does not say)."""
    import torch

    device = torch.cuda.current_device()
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    return torch.empty(size // 4, dtype=torch.int32, device=torch.device("cuda", device))


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (torch.cuda.graph, torch.compile reduce-overhead)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Tuner:
    def __init__(self, name: str, configs: Sequence[Config], *, timed: bool | None = None):
        """timed: None times the configs except under the interpreter, for a single config or with
        FASTFT_AUTOTUNE=0; True/False force it (e.g. a test with a stubbed `bench`)."""
        if not configs:
            raise ValueError(f"{name}: at least one config is needed")
        self.name = name
        self.configs = list(configs)
        self.timed = timed
        self.best: dict[Hashable, Config] = {}

    def run(self, key: Hashable, launch: Callable[[Config], None]) -> None:
        """Launch with the best config for `key`; tune first if `key` is new.

        `launch(config)` must be idempotent (it overwrites its outputs), since tuning runs it repeatedly.
        """
        config = self.best.get(key)
        if config is None:
            config, outputs_written = self._tune(key, launch)
            if outputs_written:  # untimed: the one launch that picked the config already wrote the outputs
                return
        launch(config)

    def _tune(self, key: Hashable, launch: Callable[[Config], None]) -> tuple[Config, bool]:
        """(best config, whether the last launch was that config's, so its outputs stand)."""
        timed = self.timed
        if timed is None:
            timed = not (INTERPRET or len(self.configs) == 1 or os.environ.get("FASTFT_AUTOTUNE", "1") == "0")
        in_capture = capturing()
        # deterministic mode: the first config, untimed and not remembered (timing could pick a config that sums in
        # another order in the next run, or after --resume: other bits)
        fixed = deterministic()
        timed = timed and not in_capture and not fixed
        timings, last_error = [], None
        for config in self.configs:
            try:
                launch(config)  # compiles; raises for a config this GPU cannot run (e.g. too much shared memory)
            except Exception as err:  # noqa: BLE001 - a config that cannot compile or run is skipped
                log.debug("%s: config %s failed: %s", self.name, config, err)
                last_error = err
                continue
            if not timed:  # untimed: the first config that runs
                if not (in_capture or fixed):
                    self.best[key] = config
                return config, True
            timings.append((bench(lambda: launch(config)), config))
        if not timings:
            # the last config's error named: the same for every config when the cause is not the config (an input
            # the kernel cannot read, a torch.func wrapper), which "no config" alone would hide
            raise RuntimeError(f"{self.name}: no launch config compiled for {key}; the last one failed with "
                               f"{type(last_error).__name__}: {last_error}") from last_error
        best = min(timings, key=lambda t: t[0])[1]
        log.info("%s %s -> %s", self.name, key, best)
        for ms, config in sorted(timings, key=lambda t: t[0]):
            log.debug("  %.4f ms  %s", ms, config)
        self.best[key] = best
        return best, False


_REGISTRY: dict = {}


def tuner(name: str, configs: Sequence[Config]) -> Tuner:
    """The shared Tuner for a kernel name and config list, so tuning results persist across calls.

    Looked up by the list's identity first (config functions wrapped in functools.lru_cache return the same
    list every time: a dict hit on the hot path), then by content.
    """
    fast = (name, id(configs))
    found = _REGISTRY.get(fast)
    if found is not None and found[0] is configs:
        return found[1]
    slow = (name, tuple(tuple(sorted(c.items())) for c in configs))
    if slow not in _REGISTRY:
        _REGISTRY[slow] = Tuner(name, configs)
    _REGISTRY[fast] = (configs, _REGISTRY[slow])  # keeps `configs` alive, so its id is not reused
    return _REGISTRY[slow]

