"""--resume compares the settings that decide what is trained: each of these changed is refused, naming it (only
RESUME_MAY_CHANGE's, which decide what is evaluated and saved or how the same values are computed, may change).
--seed decides the data order, the initialisation and the dropout masks: a resumed run with another seed mixes two
runs."""
import dataclasses

import pytest

from fastft.apps.training import resume_checks
from fastft.apps.training.config import ConfigError, TrainConfig, to_yaml_dict

CHANGED = {"seed": 7, "lr": 3e-4, "rank": 4, "alpha": 3.0, "dropout": 0.3, "max_length": 77, "weight_decay": 0.5,
           "optimizer": "sgd", "schedule": "linear", "method": "dora", "max_grad_norm": 0.25}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_changed_training_setting_is_refused_on_resume(tmp_path, name):
    cfg = TrainConfig(schedule="cosine")
    saved = to_yaml_dict(cfg)
    resume_checks.check_resumed_settings(cfg, saved, tmp_path)  # the same settings resume
    assert name not in resume_checks.resume_may_change(cfg, saved)
    changed = dataclasses.replace(cfg, **{name: CHANGED[name]})
    with pytest.raises(ConfigError, match=rf"other settings \(--{name.replace('_', '-')} "):
        resume_checks.check_resumed_settings(changed, saved, tmp_path)
