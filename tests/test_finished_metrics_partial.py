"""finished_metrics: a metrics.json for the same --steps that does not hold every step's loss is not a finished
run (the resumed run must finish its evaluation and saves, not return the stale metrics); one for other --steps
is not this run's end (a larger --steps continues it)."""
import json

from fastft.apps.training.config import TrainConfig
from fastft.apps.training.resume_checks import finished_metrics


def test_metrics_missing_steps_are_not_a_finished_run(tmp_path):
    cfg = TrainConfig(steps=4, output_dir=str(tmp_path))
    metrics = {"config": {"steps": 4}, "train_losses": [1.0, 0.9, 0.8, 0.7]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert finished_metrics(cfg) == metrics
    assert finished_metrics(TrainConfig(steps=5, output_dir=str(tmp_path))) is None
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "train_losses": [1.0, 0.9, 0.8]}))
    assert finished_metrics(cfg) is None
