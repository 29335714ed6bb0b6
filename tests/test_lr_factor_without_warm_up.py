"""--warmup-ratio 0 (allowed by validate): the first step still trains at the peak, then the decay starts."""
import math

import pytest

from fastft.apps.training.config import TrainConfig
from fastft.apps.training.loop import lr_factor


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_no_warm_up_starts_at_the_peak(schedule):
    factor = lr_factor(TrainConfig(steps=10, warmup_ratio=0.0, schedule=schedule))
    values = [factor(s) for s in range(10)]
    assert values[0] == pytest.approx(1.0)
    p = 1 / 10  # the step after the peak: one step warm-up (the peak), 9 decaying
    assert values[1] == pytest.approx(1 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p)))
    assert values[-1] > 0
