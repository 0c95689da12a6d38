"""The package's own errors: one base class, so callers (and the command line) can
tell a problem with the user's input or run from a bug.

Every error raised on purpose by ``shallow_ensemble`` derives from
:py:class:`ShallowEnsembleError`; the subclasses also derive from the built-in
exception that best describes them (``ValueError``, ``RuntimeError``), so code that
catches those keeps working.
"""


class ShallowEnsembleError(Exception):
    """Base class of every error raised on purpose by ``shallow_ensemble``."""


class CalibrationError(ShallowEnsembleError, ValueError):
    """Uncertainties cannot be calibrated or evaluated as asked (for instance, the
    ensemble has collapsed to one prediction)."""


class TrainingError(ShallowEnsembleError, RuntimeError):
    """Training cannot start or continue as asked."""
