"""Issue 8's targets in `fastft bench`'s report: each is met only when every condition it states holds — the
memory limit as well as the speed (a faster row over the memory limit misses) — and only eager rows count (the
targets were set for them: a compiled row alone leaves a target not measured)."""
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.targets import check_targets


def _result(rows, **config):
    settings = dict(vars(BenchConfig(**config)), device="cuda", dtype_resolved="bf16")
    return {"config": settings, "environment": {"card": "NVIDIA H200"}, "rows": rows}


def _row(method, peer, tokens_per_s, peak_gib, **extra):
    return dict(method=method, peer=peer, status="ok", tokens_per_s=tokens_per_s, peak_gib=peak_gib, step_ms=80.0,
                **extra)


def _line(lines, start):
    return next(line for line in lines if line.startswith(f"- {start}"))


def test_lora_and_qlora_targets_hold_their_memory_limit():
    lines = check_targets(_result([_row("lora", "fastft", 95e3, 14.9), _row("qlora", "fastft", 85e3, 12.5)]))
    assert _line(lines, "lora ≥ 90k").endswith("**met**")
    assert _line(lines, "qlora ≥ 80k").endswith("**missed**")  # fast enough, 0.5 GiB over 12


def test_the_methods_ratio_target_holds_peft_memory():
    rows = [_row("dora", "fastft", 2e4, 10.0), _row("dora", "peft", 1e4, 9.0),
            _row("ia3", "fastft", 2e4, 8.0), _row("ia3", "peft", 1e4, 9.0)]
    lines = check_targets(_result(rows))
    assert _line(lines, "dora ≥ 1.5×").endswith("**missed**")  # 2× peft's speed with more memory than peft
    assert _line(lines, "ia3 ≥ 1.5×").endswith("**met**")


def test_the_8b_qlora_target_holds_its_memory_ratio():
    def verdict(peak):
        rows = [_row("qlora", "fastft", 3e3, peak), _row("qlora", "peft", 1e3, 10.0)]
        lines = check_targets(_result(rows, shape="llama-8b", batch_size=1, gradient_checkpointing=True))
        return _line(lines, "8B QLoRA")

    assert verdict(5.5).endswith("**met**")
    assert verdict(7.0).endswith("**missed**")  # 3× the speed at 0.7× the memory


def test_compiled_rows_do_not_count_for_the_targets():
    rows = [_row("lora", "fastft", 95e3, 14.0, compile="default")]
    assert "lora ≥ 90k tokens/s at ≤ 15 GiB (H200): not measured" in _line(check_targets(_result(rows)), "lora ≥")
    rows.append(_row("lora", "fastft", 91e3, 14.0, compile="off"))
    assert _line(check_targets(_result(rows)), "lora ≥").startswith("- lora ≥ 90k tokens/s at ≤ 15 GiB (H200): 91.0k")
