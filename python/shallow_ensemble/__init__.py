"""Calibrated, cheap uncertainties for machine-learning interatomic potentials.

A shallow ensemble shares one backbone between many last-layer heads; this package
trains such ensembles, calibrates them and exports them as metatomic models.

The workflow, from Python (what the ``shallow-ensemble`` command does)::

    import shallow_ensemble

    config = shallow_ensemble.load_config("config.yaml", ["training.epochs=50"])
    result = shallow_ensemble.train(config, "run")
    report = shallow_ensemble.evaluate_model("run/model.ckpt", "test.xyz").report
    shallow_ensemble.export_model(result.model, "model.pt")
    model = shallow_ensemble.load_model("run/model.ckpt")

Importing the package is cheap and has no side effects: the names below are
imported from their modules (and torch with them) when first used.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .backbones import Backbone, SoapBpnn
    from .config import load_config
    from .errors import ShallowEnsembleError
    from .export import export_model
    from .heads import ShallowEnsembleHead
    from .model import EnsembleModel
    from .training import train
    from .workflows import EvaluationResult, evaluate_model, load_model, run_quickstart


try:
    __version__ = version("shallow-ensemble")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

#: public name -> module (relative to this package) that defines it
_LAZY = {
    # the workflow verbs
    "load_config": "config",
    "train": "training",
    "evaluate_model": "workflows",
    "EvaluationResult": "workflows",
    "export_model": "export",
    # checkpoints only; the docstring says how exported .pt models are loaded
    "load_model": "workflows",
    "run_quickstart": "workflows",
    "ShallowEnsembleError": "errors",
    # the model's parts
    "Backbone": "backbones",
    "EnsembleModel": "model",
    "ShallowEnsembleHead": "heads",
    "SoapBpnn": "backbones",
}

__all__ = [
    "Backbone",
    "EnsembleModel",
    "EvaluationResult",
    "ShallowEnsembleError",
    "ShallowEnsembleHead",
    "SoapBpnn",
    "__version__",
    "evaluate_model",
    "export_model",
    "load_config",
    "load_model",
    "run_quickstart",
    "train",
]


def __getattr__(name: str) -> Any:
    """Import the public names on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
