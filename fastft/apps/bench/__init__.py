"""`fastft bench`: the end-to-end method table (`methods`) and the kernel micro-benchmarks (`kernels`),
on one harness (`harness`: timing, memory, card, results files).

Files, one job each: `shapes` (the named model shapes, building a random-init model), `peers` (how each
implementation — fastft, peft, peft+bnb, peft+Liger, Unsloth — builds a model for a method), `run` (one
timed training run), `methods` (every run of a table, with a progress bar), `report` (JSON, markdown, PNG),
`resume` (carrying on a table cut short), `kernels` (the benchmarks/gpu_*.py families), `clocks` (the card's SM clock
and power during each timing, through NVML).
"""
from fastft.apps.bench.harness import (  # noqa: F401 - the harness API the kernel benchmarks import
    card_name,
    concurrency_share,
    environment,
    graphed,
    host_ms,
    log,
    markdown_table,
    paired_ratio,
    peak_memory_gib,
    peak_memory_mib,
    rows_per_shape,
    shared_fraction,
    time_cases,
    time_ms,
    write_results,
)
