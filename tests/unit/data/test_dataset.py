import itertools
from importlib.resources import files
from pathlib import Path

import ase.build
import numpy as np
import pytest
import torch

from shallow_ensemble.data import (
    DataError,
    Graph,
    GraphDataset,
    Structure,
    build_graph,
    read_structures,
)


DATA = Path(__file__).resolve().parents[2] / "data"
RESOURCES = files("shallow_ensemble") / "resources"
# pairs closer than this to the cutoff are ignored (rounding may go either way)
TOLERANCE = 1e-8

Pair = tuple[int, ...]


@pytest.fixture(scope="module")
def ethanol() -> list[Structure]:
    return read_structures(str(RESOURCES / "ethanol.xyz"))


@pytest.fixture(scope="module")
def silicon() -> list[Structure]:
    return read_structures(str(RESOURCES / "silicon.xyz"))


def bulk_silicon() -> Structure:
    """Primitive 2-atom diamond cell, much smaller than the cutoffs used here."""
    atoms = ase.build.bulk("Si", "diamond", a=5.43)
    atoms.positions += [[0.1, -0.05, 0.2], [0.0, 0.03, -0.1]]
    return Structure(
        numbers=atoms.numbers.astype(np.int64),
        positions=atoms.positions.astype(np.float64),
        cell=atoms.cell.array.astype(np.float64),
        pbc=np.array([True, True, True]),
        energy=-10.8,
        forces=np.zeros((2, 3)),
        source="bulk_silicon",
    )


def brute_force_pairs(structure: Structure, cutoff: float) -> set[Pair]:
    """All (i, j, shift) with |r_j - r_i + shift @ cell| < cutoff, by enumeration."""
    positions, cell, pbc = structure.positions, structure.cell, structure.pbc
    n_images = [0, 0, 0]
    if pbc.any():
        dual = np.linalg.pinv(cell[pbc])  # (3, n_periodic): columns are dual vectors
        fractional = positions @ dual
        spread = fractional.max(axis=0) - fractional.min(axis=0)
        limits = np.ceil(cutoff * np.linalg.norm(dual, axis=0) + spread) + 1
        for direction, limit in zip(np.flatnonzero(pbc), limits, strict=True):
            n_images[direction] = int(limit)
    pairs = set()
    for shift in itertools.product(*(range(-n, n + 1) for n in n_images)):
        vectors = positions[None, :, :] - positions[:, None, :] + np.array(shift) @ cell
        distances = np.linalg.norm(vectors, axis=-1)
        for i, j in zip(*np.nonzero(distances < cutoff), strict=True):
            if i == j and shift == (0, 0, 0):
                continue
            if abs(distances[i, j] - cutoff) > TOLERANCE:
                pairs.add((int(i), int(j), *shift))
    return pairs


def graph_pairs(structure: Structure, graph: Graph, cutoff: float) -> set[Pair]:
    """(i, j, integer shift) of the graph's pairs, recovering the integer shifts."""
    pbc = structure.pbc
    shifts = np.zeros((graph.n_pairs, 3))
    if pbc.any():
        shifts[:, pbc] = graph.cell_shifts.numpy() @ np.linalg.pinv(structure.cell[pbc])
    integers = np.rint(shifts).astype(int)
    np.testing.assert_allclose(shifts, integers, atol=1e-8)
    np.testing.assert_allclose(
        graph.cell_shifts.numpy(), integers @ structure.cell, atol=1e-10
    )
    distances = graph.pair_vectors().norm(dim=-1).numpy()
    return {
        (i, j, *shift)
        for i, j, shift, distance in zip(
            graph.centers.tolist(),
            graph.neighbors.tolist(),
            integers.tolist(),
            distances,
            strict=True,
        )
        if abs(distance - cutoff) > TOLERANCE
    }


def check_against_brute_force(structure: Structure, cutoff: float) -> Graph:
    graph = build_graph(structure, cutoff)
    assert graph.centers.dtype == torch.int64
    assert graph.neighbors.dtype == torch.int64
    assert graph.cell_shifts.shape == (graph.n_pairs, 3)
    assert graph.n_pairs > 0

    vectors = graph.pair_vectors()
    assert torch.all(vectors.norm(dim=-1) < cutoff)
    expected = (
        graph.positions[graph.neighbors]
        - graph.positions[graph.centers]
        + graph.cell_shifts
    )
    torch.testing.assert_close(vectors, expected)

    found = graph_pairs(structure, graph, cutoff)
    assert len(found) == graph.n_pairs - int(
        (torch.abs(vectors.norm(dim=-1) - cutoff) <= TOLERANCE).sum()
    )
    assert found == brute_force_pairs(structure, cutoff)
    # full list: (i, j, S) comes with (j, i, -S)
    assert found == {(j, i, -a, -b, -c) for i, j, a, b, c in found}
    return graph


@pytest.mark.parametrize("cutoff", [3.0, 5.5])
def test_small_periodic_silicon_cell(cutoff: float) -> None:
    graph = check_against_brute_force(bulk_silicon(), cutoff)
    # beyond the lattice spacing a / sqrt(2) = 3.84 A, atoms pair with their images
    assert bool(torch.any(graph.centers == graph.neighbors)) == (cutoff > 3.84)


def test_silicon_frames(silicon: list[Structure]) -> None:
    smallest = min(silicon, key=lambda structure: structure.n_atoms)
    assert smallest.n_atoms == 12
    check_against_brute_force(smallest, 5.0)
    check_against_brute_force(silicon[0], 4.0)


def test_ethanol(ethanol: list[Structure]) -> None:
    for structure in ethanol[:3] + ethanol[-2:]:
        graph = check_against_brute_force(structure, 2.5)
        torch.testing.assert_close(
            graph.cell_shifts, torch.zeros_like(graph.cell_shifts)
        )
    # a cutoff larger than the molecule gives all 9 * 8 ordered pairs
    assert build_graph(ethanol[0], 10.0).n_pairs == 72


def test_mixed_pbc_slab() -> None:
    (slab,) = read_structures(str(DATA / "mixed_pbc_slab.xyz"))
    graph = check_against_brute_force(slab, 4.0)
    torch.testing.assert_close(
        graph.cell_shifts[:, 2], torch.zeros(graph.n_pairs, dtype=torch.float64)
    )


def test_graph_content(silicon: list[Structure]) -> None:
    structure = silicon[3]
    graph = build_graph(structure, 4.0)
    assert graph.n_atoms == structure.n_atoms
    assert graph.numbers.dtype == torch.int64
    np.testing.assert_array_equal(graph.numbers.numpy(), structure.numbers)
    np.testing.assert_array_equal(graph.positions.numpy(), structure.positions)
    np.testing.assert_array_equal(graph.cell.numpy(), structure.cell)
    assert graph.energy is not None and graph.energy.dim() == 0
    assert graph.energy.item() == structure.energy
    assert graph.forces is not None
    np.testing.assert_array_equal(graph.forces.numpy(), structure.forces)


def test_no_pairs_and_no_targets() -> None:
    atom = Structure(
        numbers=np.array([8], dtype=np.int64),
        positions=np.zeros((1, 3)),
        cell=np.zeros((3, 3)),
        pbc=np.zeros(3, dtype=bool),
        energy=None,
        forces=None,
        source="isolated",
    )
    graph = build_graph(atom, 3.0)
    assert graph.n_pairs == 0
    assert graph.centers.shape == (0,) and graph.neighbors.shape == (0,)
    assert graph.cell_shifts.shape == (0, 3)
    assert graph.energy is None and graph.forces is None


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"`cutoff` is -1\.0 but must be a positive"):
        build_graph(bulk_silicon(), -1.0)
    with pytest.raises(ValueError, match=r"`dtype` is torch.int64 but must be"):
        build_graph(bulk_silicon(), 3.0, dtype=torch.int64)

    broken = bulk_silicon()
    broken.cell[1] = 0.0
    with pytest.raises(
        DataError,
        match=r"bulk_silicon: `pbc` is \[True, True, True\] "
        r"but cell vector 1 is zero",
    ):
        build_graph(broken, 3.0)


def test_dataset(ethanol: list[Structure]) -> None:
    dataset = GraphDataset(ethanol[:5], cutoff=3.0, dtype=torch.float32)
    assert len(dataset) == 5
    assert dataset.cutoff == 3.0
    for index, graph in enumerate(dataset.graphs):
        assert dataset[index] is graph
        assert graph.n_atoms == ethanol[index].n_atoms
        assert graph.positions.dtype == torch.float32
        assert graph.cell_shifts.dtype == torch.float32
        assert graph.energy is not None and graph.energy.dtype == torch.float32
        assert graph.forces is not None and graph.forces.dtype == torch.float32
        assert graph.numbers.dtype == torch.int64
        assert graph.centers.dtype == torch.int64


def test_progress_bar(
    ethanol: list[Structure], capsys: pytest.CaptureFixture[str]
) -> None:
    GraphDataset(ethanol[:50], cutoff=2.0)
    assert "neighbour lists" not in capsys.readouterr().err
    GraphDataset(ethanol[:51], cutoff=2.0)
    assert "neighbour lists" in capsys.readouterr().err
