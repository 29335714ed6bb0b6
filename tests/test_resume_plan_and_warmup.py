"""What a resumed run restores and refuses, unit-level (no training run): the batch plan's epoch, and --steps under
a constant schedule with warm-up (the warm-up's length is a share of --steps)."""
import pytest

from fastft.apps.training.config import ConfigError, TrainConfig, to_yaml_dict
from fastft.apps.training.data import BatchPlan
from fastft.apps.training.resume_checks import check_resumed_settings


def test_a_plan_restored_past_its_first_epoch_takes_the_same_records():
    """5 steps an epoch: saved at step 7 (epoch 1, index 4), a restored plan must continue epoch 1's order, not
    take epoch 0's order at the same index (other records, silently)."""
    plan = BatchPlan(10, batch_size=2, grad_accum=1, processes=1, seed=0)
    for _ in range(7):
        plan.next_step(0)
    state = plan.state_dict()
    assert state["epoch"] == 1
    resumed = BatchPlan(10, batch_size=2, grad_accum=1, processes=1, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_step(0) for _ in range(8)] == [plan.next_step(0) for _ in range(8)]


def test_steps_may_not_change_under_a_constant_schedule_with_warm_up(tmp_path):
    """ceil(warmup_ratio · steps) warm-up steps: another --steps moves the warm-up's end, so the resumed steps would
    get other learning rates than the run had planned."""
    saved = to_yaml_dict(TrainConfig(steps=20, schedule="constant", warmup_ratio=0.5))
    with pytest.raises(ConfigError, match="--steps 20 -> 40"):
        check_resumed_settings(TrainConfig(steps=40, schedule="constant", warmup_ratio=0.5), saved, tmp_path)
    # without warm-up it may (as documented)
    flat = to_yaml_dict(TrainConfig(steps=20, schedule="constant", warmup_ratio=0.0))
    check_resumed_settings(TrainConfig(steps=40, schedule="constant", warmup_ratio=0.0), flat, tmp_path)
