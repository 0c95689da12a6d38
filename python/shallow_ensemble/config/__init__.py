"""Configuration: one frozen dataclass per component, loaded from YAML with checks.

The allowed values of a key are its annotation: a ``Literal[...]`` lists the choices,
which :py:func:`config_from_dict` checks and names in its messages. Every key is
documented by the string under its field; :py:func:`configuration_reference` turns
them into ``docs/configuration.md`` (``python -m shallow_ensemble.config PATH``
rewrites that file).

The package: :py:mod:`.schema` (the sections), :py:mod:`.checks` (types, choices,
ranges), :py:mod:`.loading` (dictionaries, YAML files, overrides) and
:py:mod:`.reference` (the generated documentation).
"""

from .checks import choices
from .loading import apply_overrides, config_from_dict, load_config
from .reference import configuration_reference
from .schema import (
    CHECKPOINT_STRATEGIES,
    ONE_MEMBER_STRATEGIES,
    PROBABILISTIC_STRATEGIES,
    CalibrationConfig,
    Config,
    ConfigError,
    DataConfig,
    EnergyLossName,
    ForcesLossName,
    LaplaceConfig,
    ModelConfig,
    ProtocolConfig,
    StrategyName,
    Target,
    TrainingConfig,
)


__all__ = [
    "CHECKPOINT_STRATEGIES",
    "ONE_MEMBER_STRATEGIES",
    "PROBABILISTIC_STRATEGIES",
    "CalibrationConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EnergyLossName",
    "ForcesLossName",
    "LaplaceConfig",
    "ModelConfig",
    "ProtocolConfig",
    "StrategyName",
    "Target",
    "TrainingConfig",
    "apply_overrides",
    "choices",
    "config_from_dict",
    "configuration_reference",
    "load_config",
]
