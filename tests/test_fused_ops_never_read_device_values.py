"""The fused ops' eager forward+backward never read a device value on the host (`.item()`, `bool(t)`, `nonzero`,
...): on a GPU each such read waits for every queued kernel, so one per layer would make a training step
host-bound. benchmarks/host_overhead.py's cases (launches stubbed: the host path alone) under a dispatch-mode spy
that records every aten op which copies a value to the host. Looked for as a cause of the GPU's host-bound 4096²
calls (docs/gpu-results.md, 2026-12-04): there was none.
Not here: the fused linear losses, whose two reads are by design (fastft.ops.linear_losses_compiled
check_label_range, skipped inside `checked_on_host` as fastft train runs it; chunked_logits._unit_gradient, free on
the CPU and, on a GPU, taken only where it saves a pass over the head's weight gradient)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]

# aten ops whose result is sized or valued by the data: on CUDA each waits for the device
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "_unique2", "unique_consecutive",
              "masked_select", "repeat_interleave", "bincount", "histc", "unique_dim"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def host_overhead():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import host_overhead
        yield host_overhead
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_the_spy_sees_a_host_read():
    with HostReads() as spy:
        x = torch.ones(3)
        x.sum().item()
        bool(x[0] > 0)
        x.nonzero()
    assert spy.seen == ["_local_scalar_dense.default", "_local_scalar_dense.default", "nonzero.default"]


@pytest.mark.parametrize("op", ["lora", "qlora", "dora", "rms_norm", "rms_norm_residual", "rope", "rope_", "swiglu",
                                "attention", "attention_varlen", "ia3", "adapter"])
def test_fused_op_reads_no_device_value_on_the_host(host_overhead, op):
    assert op in host_overhead.CASES
    with host_overhead.benchmark_settings(), host_overhead.launches_stubbed():
        call = host_overhead.CASES[op]()["fastft"]
        call()  # the first call fills the caches (tuner keys, seeds) as a training step's first layer does
        with HostReads() as spy:
            call()
    assert spy.seen == [], f"{op}: the eager forward+backward read device values on the host: {spy.seen}"
