"""Batch several :class:`~shallow_ensemble.data.Graph` objects into one."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .dataset import Graph, GraphDataset


@dataclass(eq=False)
class Batch:
    """Several graphs concatenated along the atom and pair dimensions.

    Pair indices are global: they index the concatenated atoms of the batch.

    :param numbers: atomic numbers, shape ``(n_atoms,)``, ``int64``
    :param positions: Cartesian positions, shape ``(n_atoms, 3)``, Å
    :param system_index: index of the system of each atom, shape ``(n_atoms,)``,
        ``int64``
    :param n_atoms: number of atoms of each system, shape ``(n_systems,)``, ``int64``
    :param centers: global index of the first atom of each pair, shape
        ``(n_pairs,)``, ``int64``
    :param neighbors: global index of the second atom of each pair, shape
        ``(n_pairs,)``, ``int64``
    :param cell_shifts: Cartesian periodic shift of each pair, shape
        ``(n_pairs, 3)``, Å
    :param energy: total energies, shape ``(n_systems,)``, eV, or ``None``
    :param forces: forces, shape ``(n_atoms, 3)``, eV/Å, or ``None``
    :param cell: cell vectors (rows) of each system, shape ``(n_systems, 3, 3)``, Å;
        zero rows along non-periodic directions (``None`` if unknown)
    :param stress: stresses, shape ``(n_systems, 3, 3)``, eV/Å³, zero for the
        systems without one, or ``None`` if no system has one
    :param stress_mask: which systems have a stress, shape ``(n_systems,)``,
        ``bool`` (``None`` with ``stress``)
    """

    numbers: torch.Tensor
    positions: torch.Tensor
    system_index: torch.Tensor
    n_atoms: torch.Tensor
    centers: torch.Tensor
    neighbors: torch.Tensor
    cell_shifts: torch.Tensor
    energy: torch.Tensor | None
    forces: torch.Tensor | None
    cell: torch.Tensor | None = None
    stress: torch.Tensor | None = None
    stress_mask: torch.Tensor | None = None

    @property
    def n_systems(self) -> int:
        """Number of systems in the batch."""
        return int(self.n_atoms.shape[0])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "Batch":
        """Move the batch to ``device`` and cast its float tensors to ``dtype``.

        :param device: target device; ``None`` keeps the current one
        :param dtype: target floating-point dtype, applied to positions, shifts,
            energy and forces only; ``None`` keeps the current one
        :return: a new :class:`Batch` (integer tensors keep their dtype)
        """

        def floats(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=device, dtype=dtype)

        def ints(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=device)

        return Batch(
            numbers=ints(self.numbers),
            positions=floats(self.positions),
            system_index=ints(self.system_index),
            n_atoms=ints(self.n_atoms),
            centers=ints(self.centers),
            neighbors=ints(self.neighbors),
            cell_shifts=floats(self.cell_shifts),
            energy=None if self.energy is None else floats(self.energy),
            forces=None if self.forces is None else floats(self.forces),
            cell=None if self.cell is None else floats(self.cell),
            stress=None if self.stress is None else floats(self.stress),
            stress_mask=None if self.stress_mask is None else ints(self.stress_mask),
        )

    def pair_vectors(self) -> torch.Tensor:
        """Vectors from center to neighbour, shape ``(n_pairs, 3)``, Å.

        :return: ``positions[neighbors] - positions[centers] + cell_shifts``
        """
        return (
            self.positions[self.neighbors]
            - self.positions[self.centers]
            + self.cell_shifts
        )


def collate(graphs: Sequence[Graph]) -> Batch:
    """Concatenate graphs into one :class:`Batch`, offsetting the pair indices.

    :param graphs: graphs to batch (at least one)
    :return: the batch; ``energy``/``forces`` are ``None`` if any graph lacks them,
        ``stress`` is ``None`` if all do (zeros where some do, see ``stress_mask``)
    :raises ValueError: if ``graphs`` is empty
    """
    if len(graphs) == 0:
        raise ValueError("`graphs` is empty but must hold at least one graph")
    n_atoms = torch.tensor([graph.n_atoms for graph in graphs], dtype=torch.int64)
    offsets = torch.cumsum(n_atoms, dim=0) - n_atoms
    n_pairs = torch.tensor([graph.n_pairs for graph in graphs], dtype=torch.int64)
    pair_offsets = torch.repeat_interleave(offsets, n_pairs)

    energies = [graph.energy for graph in graphs]
    forces = [graph.forces for graph in graphs]
    stress, stress_mask = _stack_stress(graphs)
    return Batch(
        numbers=torch.cat([graph.numbers for graph in graphs]),
        positions=torch.cat([graph.positions for graph in graphs]),
        system_index=torch.repeat_interleave(
            torch.arange(len(graphs), dtype=torch.int64), n_atoms
        ),
        n_atoms=n_atoms,
        centers=torch.cat([graph.centers for graph in graphs]) + pair_offsets,
        neighbors=torch.cat([graph.neighbors for graph in graphs]) + pair_offsets,
        cell_shifts=torch.cat([graph.cell_shifts for graph in graphs]),
        energy=None
        if any(e is None for e in energies)
        else torch.stack([e for e in energies if e is not None]),
        forces=None
        if any(f is None for f in forces)
        else torch.cat([f for f in forces if f is not None]),
        cell=torch.stack([graph.cell for graph in graphs]),
        stress=stress,
        stress_mask=stress_mask,
    )


def _stack_stress(
    graphs: Sequence[Graph],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stresses ``(n_systems, 3, 3)`` (zeros where missing) and their mask."""
    mask = torch.tensor([graph.stress is not None for graph in graphs])
    if not bool(mask.any()):
        return None, None
    zeros = graphs[0].positions.new_zeros((3, 3))
    stresses = [zeros if g.stress is None else g.stress for g in graphs]
    return torch.stack(stresses), mask


def batch_indices(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Indices of the structures of each batch (the last batch may be smaller).

    :param n: number of structures
    :param batch_size: number of structures per batch, positive
    :param shuffle: visit the structures in a random order (drawn with ``generator``)
    :param generator: random number generator for the shuffling; ``None`` uses
        torch's global generator
    :raises ValueError: if ``batch_size`` is not positive
    """
    if batch_size <= 0:
        raise ValueError(f"`batch_size` is {batch_size} but must be positive")
    order = torch.randperm(n, generator=generator).tolist() if shuffle else range(n)
    order = list(order)
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def iterate_batches(
    dataset: GraphDataset | Sequence[Graph],
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """Yield batches of ``batch_size`` graphs (the last one may be smaller).

    :param dataset: the graphs to iterate over
    :param batch_size: number of graphs per batch, positive
    :param shuffle: visit the graphs in a random order (drawn with ``generator``)
    :param generator: random number generator for the shuffling; ``None`` uses
        torch's global generator
    :return: an iterator over :class:`Batch` objects; the order is drawn when
        this function is called
    :raises ValueError: if ``batch_size`` is not positive
    """
    batches = batch_indices(len(dataset), batch_size, shuffle, generator)
    return (collate([dataset[i] for i in indices]) for indices in batches)
