"""Reading the configured datasets: files or random fractions of the training file,
held in memory with their neighbour lists or streamed from a frame cache."""

import os
import shutil
import tempfile
import weakref
from typing import Any

from ..config import Config
from ..data import (
    GraphDataset,
    Structure,
    atomic_types_of,
    check_atomic_types,
    read_structures,
    split_indices,
)
from ..data.streaming import FrameCache, StreamingDataset, build_frame_cache
from ..errors import ShallowEnsembleError


class DatasetError(ShallowEnsembleError, ValueError):
    """The configured data cannot be split or combined as asked."""


def reader_options(config: Config) -> dict[str, Any]:
    """The keyword arguments of :func:`~shallow_ensemble.data.read_structures` that
    ``config.data`` sets (the same for the in-memory and the streaming datasets)."""
    d = config.data
    return {
        "energy_key": d.energy_key,
        "forces_key": d.forces_key,
        "stress_key": d.stress_key,
        "virial_key": d.virial_key,
    }


def _fraction_splits(config: Config, n: int) -> dict[str, list[int]]:
    """Indices of ``train``, ``valid`` and ``test`` in the training file when
    ``valid`` or ``test`` are fractions of it (empty otherwise)."""
    d = config.data
    fractions = {
        name: value
        for name, value in (("valid", d.valid), ("test", d.test))
        if isinstance(value, float)
    }
    if not fractions:
        return {}
    if not all(0 < f < 1 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise DatasetError(
            f"fractions {fractions} of `data.train` must be in (0, 1) and sum to "
            "less than 1"
        )
    parts = split_indices(
        n, [1 - sum(fractions.values()), *fractions.values()], d.split_seed
    )
    return dict(zip(["train", *fractions], parts, strict=True))


def _origin(name: str) -> str:
    return f"`data.{name}` of the configuration"


def load_structures(config: Config) -> dict[str, list[Structure]]:
    """Train, validation (and test) structures; fractions split ``train`` at random."""
    d = config.data

    def read(name: str, path: str) -> list[Structure]:
        return read_structures(path, origin=_origin(name), **reader_options(config))

    train = read("train", d.train)
    sets = {"train": train}
    for name, part in _fraction_splits(config, len(train)).items():
        sets[name] = [train[i] for i in part]
    for name in ("valid", "test"):
        value = getattr(d, name)
        if isinstance(value, str):
            sets[name] = read(name, value)
    types = atomic_types_of(sets["train"])
    for name, structures in sets.items():
        if name != "train":
            check_atomic_types(structures, types)
    return sets


def load_datasets(
    config: Config, cutoff: float | None = None, progress: bool = True
) -> tuple[list[int], dict[str, GraphDataset]]:
    """Atomic types of the training set and neighbour graphs of every set.

    With ``data.streaming``, the sets are
    :class:`~shallow_ensemble.data.streaming.StreamingDataset` objects (see
    :func:`load_streaming_datasets`).

    :param cutoff: neighbour-list cutoff (default ``config.model.cutoff``; a model
        that starts from a checkpoint uses the checkpoint's)
    :param progress: show progress bars while neighbour lists are built (or, when
        streaming, while the files are validated)
    """
    cutoff = config.model.cutoff if cutoff is None else cutoff
    if config.data.streaming:
        return load_streaming_datasets(config, cutoff, progress)
    sets = load_structures(config)
    types = atomic_types_of(sets["train"])
    datasets = {
        name: GraphDataset(structures, cutoff, progress=progress)
        for name, structures in sets.items()
    }
    return types, datasets


def load_streaming_datasets(
    config: Config, cutoff: float, progress: bool = True
) -> tuple[list[int], dict[str, GraphDataset]]:
    """The sets of :func:`load_datasets` as streaming datasets: the same structures
    in the same order (so the same training), with no neighbour list kept.

    Each file is validated once into a frame cache under ``data.cache_dir`` (reused
    while the file does not change), or under a temporary folder removed when the
    datasets are no longer used; ``valid`` and ``test`` are checked against the atomic
    types of ``train``.

    :param cutoff: neighbour-list cutoff
    :param progress: show progress bars while the files are validated
    """
    d = config.data
    if d.cache_dir is None:
        root = _TemporaryFolder()
        folder = root.path
    else:
        root, folder = None, d.cache_dir

    def cache(name: str, path: str) -> FrameCache:
        frames = build_frame_cache(
            path,
            folder,
            reader_options(config),
            origin=_origin(name),
            progress=progress,
        )
        frames.owner = root  # the temporary folder lives as long as its caches
        return frames

    def dataset(frames: FrameCache, indices: list[int] | None) -> StreamingDataset:
        return StreamingDataset(
            frames, cutoff, indices=indices, num_workers=d.num_workers
        )

    train = cache("train", d.train)
    sets: dict[str, StreamingDataset] = {"train": dataset(train, None)}
    for name, part in _fraction_splits(config, len(train)).items():
        sets[name] = dataset(train, part)
    for name in ("valid", "test"):
        value = getattr(d, name)
        if isinstance(value, str):
            sets[name] = dataset(cache(name, value), None)
    types = sets["train"].atomic_types()
    for name, streaming in sets.items():
        if name != "train":
            check_atomic_types(streaming.numbers(), types)
    return types, dict(sets)


class _TemporaryFolder:
    """A temporary folder removed with this object (by the process that made it)."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="shallow-ensemble-cache-")
        weakref.finalize(self, _remove, self.path, os.getpid())


def _remove(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a worker process started by fork
        shutil.rmtree(path, ignore_errors=True)
