"""Random, reproducible train/validation/test splits."""

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np


T = TypeVar("T")


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Randomly split ``range(n)`` into disjoint parts of the given fractions.

    The boundaries are the rounded cumulative fractions times ``n``, so the sizes
    add up to ``round(sum(fractions) * n)``; indices not covered when
    ``sum(fractions) < 1`` are left out. The same ``seed`` always gives the same
    split.

    :param n: number of items to split, positive
    :param fractions: fraction of the items in each split, each in ``(0, 1]``,
        summing to at most 1
    :param seed: seed of the random permutation
    :return: one sorted list of indices per fraction
    :raises ValueError: on invalid arguments, or if a split would be empty
    """
    if n <= 0:
        raise ValueError(f"`n` is {n} but must be positive")
    if len(fractions) == 0:
        raise ValueError("`fractions` is empty but must hold at least one fraction")
    for k, fraction in enumerate(fractions):
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(
                f"`fractions[{k}]` is {fraction} but must be in the interval (0, 1]"
            )
    total = math.fsum(fractions)
    if total > 1.0 + 1e-9:
        raise ValueError(
            f"`fractions` {list(fractions)} sum to {total:g} but must sum to at most 1"
        )

    permutation = np.random.default_rng(seed).permutation(n)
    cumulative = np.cumsum(np.asarray(fractions, dtype=np.float64))
    bounds = [0] + [min(n, round(float(c) * n)) for c in cumulative]
    splits: list[list[int]] = []
    for k in range(len(fractions)):
        part = permutation[bounds[k] : bounds[k + 1]]
        if part.size == 0:
            raise ValueError(
                f"`fractions[{k}]` is {fractions[k]}, which gives an empty split of "
                f"{n} items; use a fraction of at least {1 / n:.3g} or more data"
            )
        splits.append(sorted(part.tolist()))
    return splits


def train_valid_test(
    structures: Sequence[T], valid_fraction: float, test_fraction: float, seed: int
) -> tuple[list[T], list[T], list[T]]:
    """Randomly split ``structures`` into training, validation and test sets.

    The training set gets the remaining ``1 - valid_fraction - test_fraction``. A
    fraction of exactly 0 gives an empty set; any other fraction gives a non-empty
    one.

    :param structures: items to split (structures, graphs, ...)
    :param valid_fraction: fraction of the items in the validation set, in ``[0, 1)``
    :param test_fraction: fraction of the items in the test set, in ``[0, 1)``
    :param seed: seed of the random permutation
    :return: ``(train, valid, test)`` lists, in the original relative order
    :raises ValueError: if the fractions are invalid or a split would be empty
    """
    arguments = {"valid_fraction": valid_fraction, "test_fraction": test_fraction}
    for name, value in arguments.items():
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise ValueError(f"`{name}` is {value} but must be in the interval [0, 1)")
    train_fraction = 1.0 - valid_fraction - test_fraction
    if train_fraction <= 0.0:
        raise ValueError(
            f"`valid_fraction` + `test_fraction` is {valid_fraction + test_fraction:g} "
            "but must be below 1 to leave structures for training"
        )
    fractions = [train_fraction, valid_fraction, test_fraction]
    nonzero = [k for k, fraction in enumerate(fractions) if fraction > 0.0]
    parts = split_indices(len(structures), [fractions[k] for k in nonzero], seed)
    indices: list[list[int]] = [[], [], []]
    for k, part in zip(nonzero, parts, strict=True):
        indices[k] = part
    train, valid, test = ([structures[i] for i in part] for part in indices)
    return train, valid, test
