"""The workflows behind the ``shallow-ensemble`` command, callable from Python.

The command line (:py:mod:`shallow_ensemble.cli`) only parses arguments, calls these
functions and prints; everything it does can be done from Python::

    import shallow_ensemble

    config = shallow_ensemble.load_config("config.yaml", ["training.epochs=50"])
    result = shallow_ensemble.train(config, "run")
    evaluation = shallow_ensemble.evaluate_model("run/model.ckpt", "test.xyz")
    evaluation.write_json("test.json")
    shallow_ensemble.export_model(result.model, "model.pt")

Importing this module is cheap: torch, the models and matplotlib are imported by
the functions that need them. Progress messages go to the ``logging`` logger
``shallow_ensemble.workflows.*`` (the command line shows them).
"""

from ._models import export_checkpoint, is_main_process, is_torchscript, load_model
from .evaluation import (
    EvaluateError,
    EvaluationResult,
    check_evaluation_outputs,
    check_finite,
    evaluate_model,
    predict_structures,
    write_plots,
)
from .quickstart import (
    MDStep,
    QuickstartResult,
    quickstart_config,
    run_md,
    run_quickstart,
)


__all__ = [
    "EvaluateError",
    "EvaluationResult",
    "MDStep",
    "QuickstartResult",
    "check_evaluation_outputs",
    "check_finite",
    "evaluate_model",
    "export_checkpoint",
    "is_main_process",
    "is_torchscript",
    "load_model",
    "predict_structures",
    "quickstart_config",
    "run_md",
    "run_quickstart",
    "write_plots",
]
