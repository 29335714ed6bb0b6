"""A compiled fastft row's "× peer" ratios are against the peft row compiled the same way, not the eager one."""
from fastft.apps.bench.report import table_rows


def _row(peer, mode, tps, gib):
    return {"method": "lora", "peer": peer, "implementation": peer, "status": "ok", "compile": mode,
            "tokens_per_s": tps, "step_ms": 1.0, "peak_gib": gib, "trainable_params": 10,
            "memory_kind": "cuda max_memory_allocated"}


def test_each_compile_mode_is_compared_with_its_own_peer_row():
    rows = table_rows({"rows": [_row("peft", "off", 1000.0, 4.0), _row("peft", "default", 4000.0, 2.0),
                                _row("fastft", "off", 2000.0, 1.0), _row("fastft", "default", 2000.0, 1.0)]})
    fastft = {r["compile"]: r for r in rows if r["implementation"] == "fastft"}
    assert fastft["off"]["× peer tokens/s"] == "2.00" and fastft["off"]["× peer memory"] == "0.25"
    assert fastft["default"]["× peer tokens/s"] == "0.50" and fastft["default"]["× peer memory"] == "0.50"
