"""Reading the configured datasets: files or random fractions of the training file."""

from ..config import Config
from ..data import (
    GraphDataset,
    Structure,
    atomic_types_of,
    check_atomic_types,
    read_structures,
    split_indices,
)
from ..errors import ShallowEnsembleError


class DatasetError(ShallowEnsembleError, ValueError):
    """The configured data cannot be split or combined as asked."""


def load_structures(config: Config) -> dict[str, list[Structure]]:
    """Train, validation (and test) structures; fractions split ``train`` at random."""
    d = config.data

    def read(name: str, path: str) -> list[Structure]:
        return read_structures(
            path,
            energy_key=d.energy_key,
            forces_key=d.forces_key,
            stress_key=d.stress_key,
            virial_key=d.virial_key,
            origin=f"`data.{name}` of the configuration",
        )

    train = read("train", d.train)
    sets = {"train": train}
    fractions = {
        name: value
        for name, value in (("valid", d.valid), ("test", d.test))
        if isinstance(value, float)
    }
    if fractions:
        if (
            not all(0 < f < 1 for f in fractions.values())
            or sum(fractions.values()) >= 1
        ):
            raise DatasetError(
                f"fractions {fractions} of `data.train` must be in (0, 1) and sum to "
                "less than 1"
            )
        parts = split_indices(
            len(train),
            [1 - sum(fractions.values()), *fractions.values()],
            config.data.split_seed,
        )
        sets["train"] = [train[i] for i in parts[0]]
        for name, part in zip(fractions, parts[1:], strict=True):
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

    :param cutoff: neighbour-list cutoff (default ``config.model.cutoff``; a model
        that starts from a checkpoint uses the checkpoint's)
    :param progress: show progress bars while neighbour lists are built
    """
    sets = load_structures(config)
    types = atomic_types_of(sets["train"])
    cutoff = config.model.cutoff if cutoff is None else cutoff
    datasets = {
        name: GraphDataset(structures, cutoff, progress=progress)
        for name, structures in sets.items()
    }
    return types, datasets
