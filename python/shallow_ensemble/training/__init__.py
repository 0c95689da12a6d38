"""Training: stages and their presets, the one loop, checkpoints."""

from .checkpoints import load_model, save_checkpoint
from .presets import PRESETS, preset_stages, protocol_stages
from .stages import Objective, Stage
from .strategies import get_strategy
from .trainer import TrainingError, TrainResult, run_protocol, train


__all__ = [
    "PRESETS",
    "Objective",
    "Stage",
    "TrainResult",
    "TrainingError",
    "get_strategy",
    "load_model",
    "preset_stages",
    "protocol_stages",
    "run_protocol",
    "save_checkpoint",
    "train",
]
