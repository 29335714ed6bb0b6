"""fastft train's settings as they reach accelerate: `accelerate launch`'s mixed precision is noted only when it
differs from --mixed-precision (the same value is no override), and --compile's mode and backend reach
accelerate's dynamo plugin (compile off: backend "no", so a launcher's dynamo setting cannot compile the run)."""
from fastft.apps.training import run_setup
from fastft.apps.training.config import TrainConfig


def test_the_launchers_precision_is_noted_only_when_it_differs(monkeypatch):
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert run_setup.launcher_notes(TrainConfig(mixed_precision="bf16")) == []
    (note,) = run_setup.launcher_notes(TrainConfig(mixed_precision="no"))
    assert "not accelerate's bf16" in note


def test_compile_mode_and_backend_reach_the_dynamo_plugin():
    plugin = run_setup.dynamo_plugin(TrainConfig(compile="max-autotune", compile_backend="aot_eager"))
    assert plugin.mode == "max-autotune" and plugin.backend.value.lower() == "aot_eager" and not plugin.fullgraph
    assert run_setup.dynamo_plugin(TrainConfig()).backend.value.lower() == "no"

