"""--max-length 8 is the smallest fastft train accepts (the message says "at least 8"): 8 passes validation, 7 is
refused with that one line."""
import pytest

from fastft.apps.training.config import ConfigError, TrainConfig, validate


def test_max_length_8_is_the_smallest_accepted():
    assert validate(TrainConfig(max_length=8)).max_length == 8
    with pytest.raises(ConfigError, match="--max-length must be at least 8, got 7"):
        validate(TrainConfig(max_length=7))
