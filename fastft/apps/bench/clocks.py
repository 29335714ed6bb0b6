"""The card's SM clock and board power while a benchmark times something, sampled in the background through NVML.

Ratios of two timings are only fair when both ran at the same clocks. A Hopper card in a long GEMM-heavy run lowers
its SM clock as it reaches its power limit, and a memory-heavy kernel (a dequantize) draws power the GEMMs then
lack: on 2026-12-05 an H100 read the same bf16 base at 2.42 and 2.72 ms in one run, and dequantize + cuBLAS cost
~0.4 ms more than its two dequantizations explain (docs/gpu-results.md). A `ClockLog` samples NVML (the driver's
libnvidia-ml, through ctypes: no package needed) every few milliseconds on a thread for the whole benchmark and
keeps (time, MHz, W); `window(t0, t1)` is their mean over one timing's span. Without a CUDA card or without NVML it
samples nothing and every window is None: the benchmarks run the same without it.
"""
from __future__ import annotations

import atexit
import ctypes
import threading
import time

import torch

NVML_CLOCK_SM = 1


class _Nvml:
    """The few NVML calls needed: a handle for the current CUDA device, its SM clock (MHz) and power draw (W)."""

    def __init__(self, lib=None):
        self.lib = lib if lib is not None else ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit_v2 failed")
        self.handle = ctypes.c_void_p()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        # NVML numbers the cards by PCI bus, CUDA (by default) fastest first, and CUDA_VISIBLE_DEVICES renumbers
        # them again: the UUID names the same card in both
        name = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        if self.lib.nvmlDeviceGetHandleByUUID(name.encode(), ctypes.byref(self.handle)) == 0:
            return
        count = ctypes.c_uint()  # a UUID written another way: with one card there is no doubt which
        if (self.lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value != 1
                or self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)) != 0):
            raise OSError(f"no NVML device with UUID {name}")

    def read(self) -> tuple[float, float | None] | None:
        """(SM MHz, W), W None where the card does not report power (some virtual machines); None without a clock."""
        mhz, milliwatts = ctypes.c_uint(), ctypes.c_uint()
        if self.lib.nvmlDeviceGetClockInfo(self.handle, NVML_CLOCK_SM, ctypes.byref(mhz)) != 0:
            return None
        power = self.lib.nvmlDeviceGetPowerUsage(self.handle, ctypes.byref(milliwatts))
        return float(mhz.value), (milliwatts.value / 1e3 if power == 0 else None)


class ClockLog:
    """Samples the current CUDA card's SM clock and power every `interval_ms` on a thread until `stop()`.
    `source`: something with read() -> (MHz, W) or None (tests pass a stand-in); by default NVML, when a CUDA
    card and the driver's NVML library are there."""

    def __init__(self, interval_ms: float = 10, source=None):
        self.samples: list[tuple[float, float, float | None]] = []  # (time.monotonic(), MHz, W or None)
        self.interval = interval_ms / 1e3
        self._stop = threading.Event()
        self._thread = None
        if source is None and torch.cuda.is_available():
            try:
                source = _Nvml()
            except Exception:  # noqa: BLE001 - no libnvidia-ml, a torch without .uuid, ...: a diagnostic, never fatal
                source = None
        if source is None:
            return
        self._source = source
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @property
    def sampling(self) -> bool:
        return self._thread is not None

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                reading = self._source.read()  # ctypes releases the GIL during the call: the benchmark's thread runs
            except Exception:  # noqa: BLE001 - a failing read ends the sampling (windows after it are None), no more
                return
            if reading is not None:
                self.samples.append((time.monotonic(), *reading))
            self._stop.wait(self.interval)

    def window(self, start: float, end: float) -> dict | None:
        """Mean and lowest SM MHz and mean W (None where no sample had power) of the samples taken between the
        time.monotonic() readings `start` and `end`; None without a sample there (no card, no NVML, or a window
        shorter than the interval)."""
        inside = [(mhz, watts) for t, mhz, watts in list(self.samples) if start <= t <= end]
        if not inside:
            return None
        mhz = [m for m, _ in inside]
        watts = [w for _, w in inside if w is not None]
        return dict(sm_mhz=sum(mhz) / len(mhz), sm_mhz_min=min(mhz),
                    power_w=sum(watts) / len(watts) if watts else None, samples=len(inside))

    def mark(self) -> float:
        """Now, for `since`."""
        return time.monotonic()

    def since(self, mark: float) -> dict | None:
        """The window from `mark` (a `mark()`) to now."""
        return self.window(mark, time.monotonic())

    def timed(self, fn):
        """(fn(), the window over its call)."""
        start = self.mark()
        out = fn()
        return out, self.since(start)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None


_SHARED: ClockLog | None = None


def clock_log() -> ClockLog:
    """The process's one ClockLog, started on first use (it samples nothing without a CUDA card)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = ClockLog()
        atexit.register(_SHARED.stop)  # the thread ends before the interpreter does, not inside an NVML call
    return _SHARED


def rounded(window: dict | None, key: str) -> int | None:
    """window[key] rounded, or None (no window, or no power reading in it)."""
    value = None if window is None else window.get(key)
    return None if value is None else round(value)


def mean_or_none(values) -> int | None:
    """The rounded mean of the values that are not None (a round without samples), or None."""
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values)) if values else None


def record_round(record: dict, window: dict | None, mhz_key: str = "sm_mhz", w_key: str = "power_w") -> None:
    """Appends one timing round's SM clock and power (`window`, rounded) to record[mhz_key + "_rounds"] and
    record[w_key + "_rounds"], and keeps record[mhz_key] / record[w_key] at the mean of the rounds so far."""
    for key, field in ((mhz_key, "sm_mhz"), (w_key, "power_w")):
        rounds = record.setdefault(key + "_rounds", [])
        rounds.append(rounded(window, field))
        record[key] = mean_or_none(rounds)
