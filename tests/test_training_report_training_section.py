"""report.md's run summary: the loss goes from the first step's to the last step's, peak memory is in GiB with its
kind, the device line counts the processes, trainable parameters are out of the total, a resumed run names its
checkpoint, and the evaluations are listed in order (before, each step's, after) with their numbers."""
from fastft.apps.training.report import report_markdown

METRICS = {"config": {"method": "lora", "steps": 3}, "device": "cpu", "processes": 2,
           "trainable_parameters": 1000, "total_parameters": 2_000_000,
           "train_losses": [2.0, 1.7, 1.5], "tokens_per_second": 321.5, "train_seconds": 12.25,
           "peak_memory_gib": 1.25, "peak_memory_kind": "cuda max_memory_allocated",
           "resumed_from": "runs/x/checkpoints/step-2",
           "eval_before": {"loss": 2.25, "examples": 8}, "evals": [{"step": 2, "loss": 1.875, "examples": 8}],
           "eval_after": {"loss": 1.625, "examples": 8}}


def test_training_section_reads_the_runs_figures():
    text = report_markdown(METRICS)
    assert "- 3 steps, loss 2 → 1.5\n" in text
    assert "- 321.5 tokens/s (leaving out" in text and "; 12.25 s of training steps in all" in text
    assert "- peak memory 1.25 GiB (cuda max_memory_allocated)" in text
    assert "- resumed from runs/x/checkpoints/step-2" in text
    assert "| device | cpu × 2 process(es) |" in text
    assert "| trainable parameters | 1,000 of 2,000,000 |" in text


def test_evaluations_are_listed_in_the_runs_order():
    text = report_markdown(METRICS)
    rows = [line for line in text.splitlines() if line.startswith("| before") or line.startswith("| step ")
            or line.startswith("| after")]
    assert rows == ["| before training | 2.25 | 8 |", "| step 2 | 1.875 | 8 |", "| after training | 1.625 | 8 |"]


def test_settings_list_only_what_the_method_reads():
    """report.md listed `rank | 16` (the default) for ia3, prefix, full...: methods that have no rank."""
    assert "| rank | 16 |" in report_markdown({"config": {"method": "dora", "rank": 16}})
    for method in ("ia3", "prefix", "prompt", "adapter", "full"):
        text = report_markdown({"config": {"method": method, "rank": 16, "steps": 3}})
        assert "| rank |" not in text and f"| method | {method} |" in text and "| steps | 3 |" in text
