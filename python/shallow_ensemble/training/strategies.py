"""The objective of a one-stage ``training.strategy``, by its configuration.

Strategies are presets of stages (:py:mod:`.presets`); the training loop
optimises the :py:class:`~.stages.Objective` of each stage. :py:func:`get_strategy`
gives that objective for the strategies of one stage, for code that computes their
losses outside :py:func:`.trainer.train` (tests, ``benchmarks/training_step.py``).
"""

from ..config import Config, ConfigError, DataConfig, TrainingConfig
from .presets import preset_stages
from .stages import LossParts, Objective


__all__ = ["LossParts", "Strategy", "get_strategy"]


class Strategy(Objective):
    """The objective of a one-stage strategy, and the members it trains."""

    def num_members(self, requested: int) -> int:
        """Members of the model it trains, given ``model.num_members``."""
        return 1 if self.stage.num_members == 1 else requested


def get_strategy(training: TrainingConfig) -> Strategy:
    """The objective of ``training.strategy`` (a strategy of one stage)."""
    config = Config(data=DataConfig(train="", valid=""), training=training)
    stages = preset_stages(config)
    if len(stages) != 1:
        raise ConfigError(
            f"strategy '{training.strategy}' has {len(stages)} stages: see "
            "shallow_ensemble.training.presets"
        )
    return Strategy(stages[0], training)
