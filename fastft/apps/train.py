"""`fastft train` (kept importable here): the run lives in `fastft.apps.training`."""
from fastft.apps.training import ConfigError, TrainConfig, TrainingStopped, train, validate

__all__ = ["ConfigError", "TrainConfig", "TrainingStopped", "train", "validate"]
