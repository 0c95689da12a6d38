"""Model kinds: every kind of ensemble model is found here by its name.

A *kind* is a class implementing the model contract (building itself from its
hyper-parameters, predicting member energies and forces of a batch, giving the
design matrix of its heads, exporting itself); checkpoints store the kind's name
and hyper-parameters, and ``model.kind`` of the configuration picks the kind of a
freshly trained model. Kinds register themselves with :py:func:`register_kind`.
"""

from typing import Any, TypeVar

from .errors import ShallowEnsembleError


class UnknownKindError(ShallowEnsembleError, ValueError):
    """No model kind of this name is registered."""


_KINDS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_kind(cls: T) -> T:
    """Class decorator: register ``cls`` under its ``kind`` attribute."""
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a `kind` name to be registered")
    if name in _KINDS and _KINDS[name] is not cls:
        raise ValueError(
            f"model kind '{name}' is already registered by {_KINDS[name].__name__}"
        )
    _KINDS[name] = cls
    return cls


def _load_builtin_kinds() -> None:
    from . import extended, model  # noqa: F401  (they register their kinds)


def kind_names() -> list[str]:
    """Names of the registered model kinds."""
    _load_builtin_kinds()
    return sorted(_KINDS)


def get_kind(name: str) -> Any:
    """The class of the model kind ``name``."""
    _load_builtin_kinds()
    if name not in _KINDS:
        raise UnknownKindError(
            f"model kind '{name}' is unknown; registered kinds: "
            f"{', '.join(sorted(_KINDS))}"
        )
    return _KINDS[name]
