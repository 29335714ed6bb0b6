"""`fastft train`, one job per module: config (flags, YAML, validation), data (records, tokenizing, packing,
the batch plan), objectives (sft/dpo/distill losses), loop (the run), checkpoints (atomic files, resume),
logs (JSON lines, TensorBoard, progress figures)."""
from fastft.apps.training.config import ConfigError, TrainConfig, validate
from fastft.apps.training.loop import TrainingStopped, train

__all__ = ["ConfigError", "TrainConfig", "TrainingStopped", "train", "validate"]
