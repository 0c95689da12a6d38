"""Calibrated, cheap uncertainties for machine-learning interatomic potentials.

A shallow ensemble shares one backbone between many last-layer heads; this package
trains such ensembles, calibrates them and exports them as metatomic models.
"""

from importlib.metadata import PackageNotFoundError, version

from .backbones import Backbone, SoapBpnn
from .heads import ShallowEnsembleHead
from .model import EnsembleModel


try:
    __version__ = version("shallow-ensemble")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = [
    "Backbone",
    "EnsembleModel",
    "ShallowEnsembleHead",
    "SoapBpnn",
    "__version__",
]
