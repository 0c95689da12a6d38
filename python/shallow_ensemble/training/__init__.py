"""Training: the one loop, strategies and checkpoints."""

from .checkpoints import load_model, save_checkpoint
from .protocol import run_protocol
from .strategies import STRATEGIES, Strategy, get_strategy
from .trainer import TrainingError, TrainResult, train


__all__ = [
    "STRATEGIES",
    "Strategy",
    "TrainResult",
    "TrainingError",
    "get_strategy",
    "load_model",
    "run_protocol",
    "save_checkpoint",
    "train",
]
