"""The one benchmark harness: timing, peak memory, the card and versions, tables and results files.

Used by `fastft bench methods` and by the kernel micro-benchmarks (benchmarks/gpu_*.py, run by
`fastft bench kernels`). On CUDA, timings are medians of `triton.testing.do_bench` (CUDA events, warm-up
excluded) and memory is the peak allocated during one call above what was allocated before it. Without
CUDA (smoke runs only) a timing is the wall-clock median of `cpu_rep` calls and memory is not measured.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fastft.apps.bench.clocks import clock_log, record_round
from fastft.apps.host_memory import rss_bytes
from fastft.files import atomic_write

_T0 = time.time()
PEER_PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "unsloth")


def card_name() -> str:
    """The GPU's name, or "cpu (<the CPU's model>)": a CPU table resumed on another CPU model is refused."""
    from fastft.apps.provenance import device_name

    return device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# Datasheet HBM bandwidth (TB/s) by card name, first match wins: the yardstick of "x% of HBM bandwidth" targets
# (a measured device copy reaches less: the H200's anchors copy at 4.26 of its 4.8). GH200 comes before the H200
# its name contains (the 96 GB HBM3 one: 4.0; the 144 GB HBM3e one: 4.9).
HBM_SPEC_TBPS = (("GH200 144G", 4.9), ("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0),
                 ("H100", 3.35), ("A100-SXM4-80GB", 2.04), ("A100 80GB PCIe", 1.94), ("A100", 1.56))


def hbm_spec_tbps(card: str) -> float | None:
    """The card's datasheet memory bandwidth in TB/s (HBM_SPEC_TBPS), None for a card not in the table."""
    return next((tbps for name, tbps in HBM_SPEC_TBPS if name in card), None)


def versions() -> dict:
    """Installed versions of fastft and its peers (None where a package is not installed)."""
    from fastft.apps.provenance import library_versions

    return library_versions(PEER_PACKAGES)


def environment() -> dict:
    """What a results file records about where it was measured: the card, the versions, the commit of fastft's
    checkout (the version string does not change between commits), the FASTFT_* variables that choose kernels
    (provenance.KERNEL_ENV) and torch's CPU threads."""
    from fastft.apps.provenance import git_commit, kernel_environment

    env = {"card": card_name(), "versions": versions(), "git_commit": git_commit(),
           "kernel_env": kernel_environment(),
           "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "argv": sys.argv}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    return env


def log(msg: str) -> None:
    """A progress line with the seconds since the harness was imported."""
    print(f"[{time.time() - _T0:6.1f}s] {msg}", flush=True)


def time_ms(fn, warmup: int = 25, rep: int = 100, grad_to_none=None, cpu_rep: int = 1) -> float:
    """Median milliseconds of one call of `fn`."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(max(1, cpu_rep)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graphed(step):
    """`step` captured in a CUDA graph after a warm-up on a side stream (compiles, tunes, allocates); returns the
    replay (no host time: what torch.compile mode="reduce-overhead" gives), or raises when it cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def host_ms(fn, calls: int = 20) -> float:
    """CPU milliseconds per call with the calls queued back to back (launches are asynchronous): above the device
    time, the call is host-bound; equal to it, something in the call waits for the device."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) * 1e3 / calls
    sync()
    return elapsed


def time_cases(cases: list[dict], rounds: int, timer=time_ms) -> None:
    """Sets case["ms"] for each case dict (its "fn" called once first, so compiling and autotuning stay outside the
    timing): the best of `rounds` rounds, the cases interleaved in each so clock drift hits them alike; and
    case["ms_rounds"], each round's time, for `paired_ratio`. On a card NVML reads (fastft.apps.bench.clocks), also
    the SM clock and power each round ran at (case["sm_mhz_rounds"], ["power_w_rounds"]) and their means."""
    clocks = clock_log()
    for case in cases:
        case["fn"]()
        case["ms_rounds"], case["sm_mhz_rounds"], case["power_w_rounds"] = [], [], []
        case["sm_mhz"] = case["power_w"] = None
    for _ in range(rounds):
        for case in cases:
            ms, window = clocks.timed(lambda: timer(case["fn"]))
            case["ms_rounds"].append(ms)
            case["ms"] = min(case.get("ms", float("inf")), ms)
            record_round(case, window)


def paired_ratio(case: dict, base: dict) -> float:
    """The median over rounds of case ÷ base timed in the same round (time_cases' ms_rounds). Not best ÷ best: an
    H100's sustained clocks drift by ~10% within a run (the bf16 base read 2.42 and 2.72 ms at 4096->14336 in one
    run on 2026-12-05), and the best of each case may come from different clock states; a round's two timings are
    seconds apart."""
    pairs = [c / b for c, b in zip(case["ms_rounds"], base["ms_rounds"]) if b > 0]
    return statistics.median(pairs) if pairs else float("nan")


def shared_fraction(sides: list[tuple[float, float]], mains: list[tuple[float, float]]) -> float | None:
    """The share of the side kernels' time (intervals start, end) spent while a main interval was open (the main
    intervals do not overlap each other: one stream); None without side time."""
    total = sum(end - start for start, end in sides)
    if total <= 0:
        return None
    inside = sum(max(0.0, min(end, m_end) - max(start, m_start)) for start, end in sides for m_start, m_end in mains)
    return inside / total


def kernel_spans(step, steps: int = 3) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every CUDA kernel in a profiler trace of `steps` calls of step(), after one call
    untraced (CUDA only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]


def concurrency_share(step, side_kernels: tuple[str, ...], main_kernels: tuple[str, ...], steps: int = 3):
    """How much of the `side_kernels`' device time (kernel names containing one of these) ran while a `main_kernels`
    kernel ran, over a profiler trace of `steps` calls of step() (CUDA only): ~0 means two streams took turns on the
    SMs, whatever was launched on which, ~1 that the side work hid behind the main. None without side kernels."""
    spans = kernel_spans(step, steps)

    def pick(names):
        return [(start, end) for name, start, end in spans if any(n in name for n in names)]
    return shared_fraction(pick(side_kernels), pick(main_kernels))


def kernel_ms(spans: list[tuple[str, float, float]], steps: int, ours: str = "_") -> dict[str, float]:
    """Device ms a step spends in each kernel (kernel_spans of `steps` steps): fastft's Triton kernels (names starting
    with `ours`) by name, summed over their launches; torch's own (fills, elementwise) together as "torch"."""
    totals: dict[str, float] = {}
    for name, start, end in spans:
        key = name if name.startswith(ours) else "torch"
        totals[key] = totals.get(key, 0.0) + (end - start) / 1e3 / steps
    return totals


def rows_per_shape(shapes, bench_shape, columns: list[str], label: str = "method", on_shape=None) -> list[dict]:
    """bench_shape(k, n) -> rows for each (k, n) in `shapes`, each shape's table printed as it finishes; a shape
    that raises becomes one row (its `label` column saying FAILED and why) and the others are still measured.
    on_shape(rows so far) after each shape: write the results there, so a run cut short (gpu_check.sh's section
    timeout) keeps the shapes it finished."""
    rows = []
    for k, n in shapes:
        shape = f"{k}->{n}"
        try:
            rows += bench_shape(k, n)
        except Exception as err:  # noqa: BLE001 - report and keep measuring the other shapes
            rows.append({"shape": shape, label: f"FAILED: {type(err).__name__}: {err}"[:200]})
        print(markdown_table([r for r in rows if r.get("shape") == shape], columns), flush=True)
        if on_shape is not None:
            on_shape(rows)
    return rows


def peak_memory_mib(fn) -> float | None:
    """CUDA memory allocated at the peak of one call of `fn`, above what was allocated before (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_memory_gib(fn) -> float | None:
    mib = peak_memory_mib(fn)
    return None if mib is None else mib / 1024


def fmt(value, spec: str = ".3f") -> str:
    """A table cell: numbers formatted with `spec`, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format(value, spec)


def fmt_gib(value) -> str:
    """A memory cell in GiB: two decimals, and two significant digits below 0.01 GiB, where two decimals read
    0.00 (a tiny model's CPU rows) as if nothing had been allocated."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < abs(value) < 0.01:
        return format(value, ".2g")
    return fmt(value, ".2f")


def markdown_table(rows: list[dict], columns: list[str], formats: dict | None = None) -> str:
    """A markdown table of `rows` (dicts) over `columns`; floats with 3 decimals unless `formats` says."""
    formats = formats or {}

    def cell(row, col):
        v = row.get(col)
        if v is None:
            return ""
        return fmt(v, formats.get(col, ".3f")) if isinstance(v, float) or col in formats else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def finite_or_none(value):
    """`value` with every NaN / inf float (in nested dicts, lists, tuples) replaced by None: strict JSON has no
    token for them, and jq, JavaScript and strict parsers reject Python's bare NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Standard JSON (non-finite floats written as null; anything else not JSON, e.g. a Path, as its str)."""
    return atomic_write(path, json.dumps(finite_or_none(payload), indent=2, default=str, allow_nan=False))


def write_results(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path | None:
    """Write payload as JSON to <out_dir>/<name>.json, out_dir defaulting to $OUT (the GPU machine's result
    folder); nothing is written when neither is set."""
    out = out_dir or os.environ.get("OUT")
    if not out:
        return None
    return write_json(Path(out) / f"{name}.json", payload)


class PeakMemory:
    """Peak memory over a stretch of code: `with meter: ...`, then `meter.peak_gib`.

    CUDA: `torch.cuda.max_memory_allocated` over the stretch (reset at its start): everything live at the
    peak, weights and optimizer state included. CPU: the process's peak resident set size during the stretch,
    sampled every 10 ms from /proc/self/statm, above `baseline_rss` (taken when the meter is made: make it
    before building the model, after `release_freed_memory()`, or memory freed earlier and kept by the allocator
    hides part of it).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.kind = ("cuda max_memory_allocated" if self.cuda
                     else "cpu peak RSS above the RSS before the model was built (sampled each 10 ms)")
        self.baseline_rss = None if self.cuda else rss_bytes()
        self.peak_gib: float | None = None
        self._stop = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import threading

        self._peak_rss = rss_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.01):  # coarse: each wake-up takes the GIL from the step
                self._peak_rss = max(self._peak_rss, rss_bytes())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak_rss, rss_bytes())
            self.peak_gib = max(0, peak - self.baseline_rss) / 2**30
        return False


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's freed pages back to the OS (glibc's malloc_trim), so that the CPU
    resident set measured next starts from what is live: memory freed by an earlier run stays in the process
    otherwise, and the next run's model reuses it unseen (a LoRA row after a full fine-tuning row read 0.00 GiB)."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim with
            pass
