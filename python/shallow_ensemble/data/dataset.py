"""Neighbour-list graphs of structures, computed once with vesin."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import vesin
from tqdm import tqdm

from .geometry import cell_problem
from .readers import DataError, Structure


#: number of structures above which :class:`GraphDataset` shows a progress bar
PROGRESS_THRESHOLD = 50


@dataclass(eq=False)
class Graph:
    """One structure with its full neighbour list, as torch tensors.

    A pair ``k`` connects atom ``centers[k]`` to atom ``neighbors[k]``; its vector is
    ``positions[neighbors] - positions[centers] + cell_shifts``. The list is full:
    every pair appears as both ``(i, j)`` and ``(j, i)``.

    :param numbers: atomic numbers, shape ``(n_atoms,)``, ``int64``
    :param positions: Cartesian positions, shape ``(n_atoms, 3)``, Å
    :param cell: cell vectors as rows, shape ``(3, 3)``, Å; zero rows along
        non-periodic directions
    :param centers: index of the first atom of each pair, shape ``(n_pairs,)``,
        ``int64``
    :param neighbors: index of the second atom of each pair, shape ``(n_pairs,)``,
        ``int64``
    :param cell_shifts: Cartesian periodic shift of each pair (integer shifts times
        ``cell``), shape ``(n_pairs, 3)``, Å
    :param energy: total energy, 0-dimensional tensor, eV, or ``None``
    :param forces: forces, shape ``(n_atoms, 3)``, eV/Å, or ``None``
    :param stress: stress, shape ``(3, 3)``, eV/Å³ (ASE's sign convention), or
        ``None``
    """

    numbers: torch.Tensor
    positions: torch.Tensor
    cell: torch.Tensor
    centers: torch.Tensor
    neighbors: torch.Tensor
    cell_shifts: torch.Tensor
    energy: torch.Tensor | None
    forces: torch.Tensor | None
    stress: torch.Tensor | None = None

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(self.numbers.shape[0])

    @property
    def n_pairs(self) -> int:
        """Number of (directed) pairs in the neighbour list."""
        return int(self.centers.shape[0])

    def pair_vectors(self) -> torch.Tensor:
        """Vectors from center to neighbour, shape ``(n_pairs, 3)``, Å.

        :return: ``positions[neighbors] - positions[centers] + cell_shifts``
        """
        return (
            self.positions[self.neighbors]
            - self.positions[self.centers]
            + self.cell_shifts
        )


def build_graph(
    structure: Structure, cutoff: float, dtype: torch.dtype = torch.float64
) -> Graph:
    """Compute the full neighbour list of ``structure`` within ``cutoff``.

    The neighbour list is computed in ``float64`` by :py:class:`vesin.NeighborList`
    (periodic along the directions where ``structure.pbc`` is ``True``), then
    float tensors are converted to ``dtype``.

    :param structure: the structure
    :param cutoff: spherical cutoff radius, Å; pairs with distance ``< cutoff``
        are kept
    :param dtype: floating-point dtype of positions, cell, shifts and targets
    :return: the structure's :class:`Graph`
    :raises ValueError: if ``cutoff`` is not a positive finite number
    :raises DataError: if the cell is invalid along a periodic direction
    """
    if not (np.isfinite(cutoff) and cutoff > 0.0):
        raise ValueError(f"`cutoff` is {cutoff} but must be a positive number")
    if not dtype.is_floating_point:
        raise ValueError(f"`dtype` is {dtype} but must be a floating-point dtype")

    pbc = np.asarray(structure.pbc, dtype=np.bool_)
    positions = np.ascontiguousarray(structure.positions, dtype=np.float64)
    cell = np.array(structure.cell, dtype=np.float64)
    cell[~pbc] = 0.0
    problem = cell_problem(cell, pbc)
    if problem:
        raise DataError(f"{structure.source}: {problem}")

    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    periodic: bool | np.ndarray = pbc if pbc.any() else False
    try:
        i, j, shifts = calculator.compute(positions, cell, periodic, "ijS")
    except RuntimeError as error:
        raise DataError(
            f"{structure.source}: the neighbour list failed: {error}"
        ) from error
    cell_shifts = np.asarray(shifts, dtype=np.float64) @ cell

    def as_float(array: np.ndarray) -> torch.Tensor:
        return torch.tensor(array, dtype=dtype)

    return Graph(
        numbers=torch.tensor(structure.numbers, dtype=torch.int64),
        positions=as_float(positions),
        cell=as_float(cell),
        centers=torch.tensor(np.asarray(i, dtype=np.int64)),
        neighbors=torch.tensor(np.asarray(j, dtype=np.int64)),
        cell_shifts=as_float(cell_shifts.reshape(-1, 3)),
        energy=None
        if structure.energy is None
        else torch.tensor(structure.energy, dtype=dtype),
        forces=None if structure.forces is None else as_float(structure.forces),
        stress=None if structure.stress is None else as_float(structure.stress),
    )


class GraphDataset:
    """Structures with their neighbour lists, built once at construction.

    :param structures: the structures
    :param cutoff: neighbour-list cutoff radius, Å
    :param dtype: floating-point dtype of the graphs' float tensors
    :param progress: show a progress bar (for more than
        :data:`PROGRESS_THRESHOLD` structures)

    >>> from importlib.resources import files
    >>> from shallow_ensemble.data import GraphDataset, read_structures
    >>> path = files("shallow_ensemble") / "resources" / "ethanol.xyz"
    >>> structures = read_structures(str(path))
    >>> dataset = GraphDataset(structures[:3], cutoff=5.0)
    >>> len(dataset), dataset[0].n_atoms
    (3, 9)
    """

    def __init__(
        self,
        structures: Sequence[Structure],
        cutoff: float,
        dtype: torch.dtype = torch.float64,
        progress: bool = True,
    ) -> None:
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.sources: Sequence[str] = [structure.source for structure in structures]
        bar = tqdm(
            structures,
            desc="neighbour lists",
            disable=not progress or len(structures) <= PROGRESS_THRESHOLD,
        )
        self.graphs: Sequence[Graph] = [
            build_graph(structure, self.cutoff, dtype) for structure in bar
        ]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> Graph:
        return self.graphs[index]
