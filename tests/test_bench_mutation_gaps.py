"""`fastft bench` behaviours a mutation run found no test pinning: an out-of-memory run is an "oom" row (the resume
measures those again), the plot draws bars of measured rows only, a resume under other package versions is refused,
a resumed table keeps eager and compiled rows apart, random-init rows start from the seed's weights whatever ran
before, and --no-patch-model leaves fastft's rows unpatched."""
import torch

from fastft.apps.bench import methods as methods_module
from fastft.apps.bench import peers, report, resume
from fastft.apps.bench import run as run_module
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.harness import environment
from fastft.apps.bench.methods import bench_methods, planned_row
from fastft.apps.bench.shapes import build_model
from fastft.integration.methods import MethodOptions


def test_an_out_of_memory_run_is_an_oom_row(monkeypatch):
    def measure(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_module, "_measure", measure)
    row = run_module.run_one(BenchConfig(shape="tiny"), "lora", "fastft", torch.device("cpu"))
    assert row["status"] == "oom" and "Tried to allocate 2.00 GiB" in row["error"]


def test_the_plot_draws_bars_of_measured_rows_only():
    rows = [planned_row("lora", "fastft", "off") | {"status": "ok", "tokens_per_s": 100.0},
            planned_row("lora", "peft", "off") | {"status": "diverged", "tokens_per_s": 900.0}]
    config = dict(vars(BenchConfig(shape="tiny")), dtype_resolved="fp32")
    fig = report.plot_figure({"rows": rows, "config": config, "environment": {"card": "cpu"}})
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == [100.0], heights  # the diverged row: "n/a", no bar of its tokens/s
    assert any(text.get_text() == "n/a" for text in fig.axes[0].texts)


def test_a_resume_under_other_package_versions_is_refused():
    old = environment()
    assert resume._env_differences(old) == []
    old["versions"] = dict(old["versions"], torch="1.0.0")
    assert f"torch 1.0.0 there, {torch.__version__} now" in resume._env_differences(old)


def test_a_resume_keeps_eager_and_compiled_rows_apart(monkeypatch):
    calls = []

    def run_one(cfg, method, implementation, device, compile="off"):
        calls.append(compile)
        return planned_row(method, implementation, compile) | {"status": "ok", "tokens_per_s": 2.0, "step_ms": 1.0,
                                                               "peak_gib": 0.1}

    monkeypatch.setattr(methods_module, "run_one", run_one)
    monkeypatch.setattr(methods_module.peers, "preload", lambda: None)
    cfg = BenchConfig(shape="tiny", methods=("lora",), peers=(), compile="default", warmup=1)
    compiled = planned_row("lora", "fastft", "default") | {"status": "ok", "tokens_per_s": 7.0}
    previous = {"wall_s": 1.0, "rows": [planned_row("lora", "fastft", "off"), compiled]}
    result = bench_methods(cfg, torch.device("cpu"), progress=False, previous=previous)
    assert calls == ["off"]  # the eager run measured; the compiled row kept, not taken for the eager one
    assert [(r["compile"], r["tokens_per_s"]) for r in result["rows"]] == [("off", 2.0), ("default", 7.0)]


def test_random_init_rows_start_from_the_seeds_weights():
    torch.manual_seed(1)
    first = build_model(shape="tiny", seq_len=16, seed=5)
    torch.rand(100)  # whatever ran before the next row
    again = build_model(shape="tiny", seq_len=16, seed=5)
    for (name, p), q in zip(first.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


def test_no_patch_model_leaves_fastft_rows_unpatched():
    def build():
        return build_model(shape="tiny", seq_len=16, seed=0)

    options = MethodOptions(rank=4, alpha=8.0)
    model, notes = peers.prepare("fastft", "lora", options, build, patch_model=False)
    assert notes == {"patched": False} and getattr(model.base_model.model, "_fastft_patch", None) is None
    model, notes = peers.prepare("fastft", "lora", options, build, patch_model=True)
    assert notes == {"patched": True} and model.base_model.model._fastft_patch is not None
