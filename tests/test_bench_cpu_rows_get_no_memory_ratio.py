"""The markdown table leaves out "× peer memory" for CPU rows (an RSS delta sampled every 10 ms is too rough to
compare), but gives it for CUDA rows."""
from fastft.apps.bench.report import table_rows


def _row(peer, tps, gib, kind):
    return {"method": "lora", "peer": peer, "implementation": peer, "status": "ok", "tokens_per_s": tps,
            "step_ms": 1.0, "peak_gib": gib, "trainable_params": 10, "memory_kind": kind}


def _fastft(kind):
    rows = table_rows({"rows": [_row("peft", 1000.0, 4.0, kind), _row("fastft", 2000.0, 1.0, kind)]})
    return next(r for r in rows if r["implementation"] == "fastft")


def test_cpu_rows_have_a_speed_ratio_but_no_memory_ratio():
    cpu = _fastft("cpu peak RSS above the RSS before the model was built (sampled each 10 ms)")
    assert cpu["× peer tokens/s"] == "2.00"
    assert cpu["× peer memory"] == ""
    assert _fastft("cuda max_memory_allocated")["× peer memory"] == "0.25"
