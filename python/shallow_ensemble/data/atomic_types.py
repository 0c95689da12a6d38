"""Atomic types: which elements a set of structures holds, and whether a model
knows them (the package's one Python-side check)."""

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from .readers import DataError, Structure


def check_atomic_types(
    structures: Iterable[Any],
    atomic_types: Sequence[int],
    *,
    model: str | None = None,
    where: str = "the data",
) -> None:
    """Check that every atom of ``structures`` has one of the ``atomic_types``.

    This is the package's one Python-side check of atomic types (the model's own
    TorchScript lookup, :py:meth:`~shallow_ensemble.model.EnsembleModel.species_index`,
    only guards the compiled path): use it before running a model on data.

    :param structures: what to check: :class:`Structure` objects (named by their
        ``source``, ``path:frame``), other objects with a ``numbers`` array (e.g.
        :class:`~shallow_ensemble.data.Graph`), or plain atomic numbers (e.g. from
        :func:`atomic_types_of`); the last two are named by ``where``
    :param atomic_types: atomic numbers the model knows
    :param model: the model, in words, e.g. ``"the model in 'run/model.ckpt'
        (`training.init_from`)"``; without it, "the model"
    :param where: the data, in words, for items without a ``source``
    :raises DataError: naming each unknown element with the first structure
        (``path:frame``, or ``where``) that contains it, and the known elements
    """
    allowed = set(int(z) for z in atomic_types)
    first_seen: dict[int, str] = {}
    for item in structures:
        if isinstance(item, int | np.integer):
            numbers, source = [int(item)], where
        else:
            numbers = np.unique(np.asarray(item.numbers)).tolist()
            source = getattr(item, "source", None) or where
        for z in numbers:
            if z not in allowed and z not in first_seen:
                first_seen[z] = source
    if not first_seen:
        return
    unknown = ", ".join(
        f"`{_symbol(z)}` (Z={z}) in {source}" for z, source in first_seen.items()
    )
    symbols = "[" + ", ".join(_symbol(z) for z in sorted(allowed)) + "]"
    if model is None:
        known = f"the model's atomic types {symbols}"
    else:
        known = f"the atomic types {symbols} of {model}"
    verb = "is not one" if len(first_seen) == 1 else "are not"
    among = "of" if len(first_seen) == 1 else "among"
    raise DataError(
        f"{unknown} {verb} {among} {known}; remove these structures or use a model "
        "trained with these atomic types"
    )


def atomic_types_of(structures: Iterable[Structure]) -> list[int]:
    """Sorted unique atomic numbers found in ``structures``.

    :param structures: structures to scan
    :return: sorted list of distinct atomic numbers
    """
    found: set[int] = set()
    for structure in structures:
        found.update(np.unique(structure.numbers).tolist())
    return sorted(found)


def _symbol(z: int) -> str:
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z{z}"
