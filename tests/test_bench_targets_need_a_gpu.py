"""Issue 8's targets are for bf16 on a GPU: a bf16 run on the CPU at the reference shape is "not checked", never
scored met or missed against H200 figures."""
from fastft.apps.bench.targets import check_targets


def _result(device):
    cfg = dict(shape="llama-1b", model=None, batch_size=4, seq_len=2048, gradient_checkpointing=False,
               dtype_resolved="bf16", device=device, rank=16, alpha=32.0, num_virtual_tokens=32, patch_model=True,
               optimizer="adamw", warmup=2)
    rows = [dict(method="lora", peer="fastft", status="ok", tokens_per_s=95e3, peak_gib=14.0, step_ms=86.0)]
    return {"config": cfg, "environment": {"card": "cpu"}, "rows": rows}


def test_bf16_on_the_cpu_is_not_checked():
    lines = check_targets(_result("cpu"))
    assert len(lines) == 1 and lines[0].startswith("- not checked"), lines
    on_gpu = check_targets(_result("cuda:0"))
    assert on_gpu[0].startswith("- lora ≥ 90k") and on_gpu[0].endswith("**met**")
