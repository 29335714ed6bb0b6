"""The markdown table's "× peer" columns are fastft over peer (2.00 when fastft is twice as fast / uses twice the
memory), not the other way round."""
from fastft.apps.bench.report import table_rows


def _row(peer, tps, gib):
    return {"method": "lora", "peer": peer, "implementation": peer, "status": "ok", "tokens_per_s": tps,
            "step_ms": 1.0, "peak_gib": gib, "trainable_params": 10, "memory_kind": "cuda max_memory_allocated"}


def test_peer_ratios_are_row_over_peer():
    rows = table_rows({"rows": [_row("peft", 1000.0, 4.0), _row("fastft", 2000.0, 1.0)]})
    mine = next(r for r in rows if r["implementation"] == "fastft")
    assert mine["× peer tokens/s"] == "2.00"
    assert mine["× peer memory"] == "0.25"
    peft = next(r for r in rows if r["implementation"] == "peft")
    assert peft["× peer tokens/s"] == "" and peft["× peer memory"] == ""
