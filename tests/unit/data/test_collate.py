from importlib.resources import files

import numpy as np
import pytest
import torch

from shallow_ensemble.data import (
    Batch,
    Graph,
    GraphDataset,
    build_graph,
    collate,
    iterate_batches,
    read_structures,
)


RESOURCES = files("shallow_ensemble") / "resources"
CUTOFF = 4.0


def energy(item: Graph | Batch) -> torch.Tensor:
    assert item.energy is not None
    return item.energy


def forces(item: Graph | Batch) -> torch.Tensor:
    assert item.forces is not None
    return item.forces


@pytest.fixture(scope="module")
def graphs() -> list[Graph]:
    """Molecules and periodic cells of different sizes, mixed."""
    ethanol = read_structures(str(RESOURCES / "ethanol.xyz"))[:4]
    silicon = read_structures(str(RESOURCES / "silicon.xyz"))
    silicon = sorted(silicon, key=lambda structure: structure.n_atoms)[:3]
    structures = [ethanol[0], silicon[0], ethanol[1], silicon[1], silicon[2]]
    structures += ethanol[2:]
    return [build_graph(structure, CUTOFF) for structure in structures]


def test_collate(graphs: list[Graph]) -> None:
    batch = collate(graphs)
    n_atoms = [graph.n_atoms for graph in graphs]
    assert batch.n_systems == len(graphs)
    assert batch.n_atoms.tolist() == n_atoms
    assert batch.n_atoms.dtype == torch.int64
    assert batch.system_index.tolist() == [
        k for k, n in enumerate(n_atoms) for _ in range(n)
    ]
    assert batch.numbers.shape == (sum(n_atoms),)
    assert batch.positions.shape == (sum(n_atoms), 3)

    offsets = np.cumsum([0] + n_atoms[:-1]).tolist()
    expected_centers = torch.cat(
        [graph.centers + offset for graph, offset in zip(graphs, offsets, strict=True)]
    )
    expected_neighbors = torch.cat(
        [
            graph.neighbors + offset
            for graph, offset in zip(graphs, offsets, strict=True)
        ]
    )
    assert torch.equal(batch.centers, expected_centers)
    assert torch.equal(batch.neighbors, expected_neighbors)
    # the atoms of each pair belong to the same system
    assert torch.equal(
        batch.system_index[batch.centers], batch.system_index[batch.neighbors]
    )

    vectors = batch.pair_vectors()
    assert torch.equal(vectors, torch.cat([graph.pair_vectors() for graph in graphs]))
    assert torch.all(vectors.norm(dim=-1) < CUTOFF)

    assert energy(batch).shape == (len(graphs),)
    assert torch.equal(energy(batch), torch.stack([energy(g) for g in graphs]))
    assert torch.equal(forces(batch), torch.cat([forces(g) for g in graphs]))


def test_collate_missing_targets(graphs: list[Graph]) -> None:
    first = graphs[0]
    no_energy = Graph(**{**first.__dict__, "energy": None})
    no_forces = Graph(**{**first.__dict__, "forces": None})

    batch = collate([graphs[1], no_energy])
    assert batch.energy is None and batch.forces is not None
    batch = collate([no_forces, graphs[1]])
    assert batch.forces is None and batch.energy is not None


def test_collate_empty() -> None:
    with pytest.raises(ValueError, match="`graphs` is empty"):
        collate([])


def test_to(graphs: list[Graph]) -> None:
    batch = collate(graphs[:3])
    converted = batch.to(dtype=torch.float32)
    assert isinstance(converted, Batch)
    for name in ("positions", "cell_shifts", "energy", "forces"):
        assert getattr(converted, name).dtype == torch.float32
    for name in ("numbers", "system_index", "n_atoms", "centers", "neighbors"):
        assert getattr(converted, name).dtype == torch.int64
        assert torch.equal(getattr(converted, name), getattr(batch, name))
    torch.testing.assert_close(converted.pair_vectors(), batch.pair_vectors().float())
    moved = batch.to(device="cpu")
    assert moved.positions.dtype == torch.float64
    assert moved.positions.device == torch.device("cpu")


def test_iterate_batches(graphs: list[Graph]) -> None:
    batches = list(iterate_batches(graphs, batch_size=3, shuffle=False))
    assert [batch.n_systems for batch in batches] == [3, 3, 1]
    energies = torch.cat([energy(batch) for batch in batches])
    assert torch.equal(energies, torch.stack([energy(g) for g in graphs]))


def test_iterate_batches_shuffled(graphs: list[Graph]) -> None:
    def energies(seed: int) -> list[float]:
        generator = torch.Generator().manual_seed(seed)
        batches = iterate_batches(graphs, 2, shuffle=True, generator=generator)
        return [e for batch in batches for e in energy(batch).tolist()]

    first = energies(0)
    assert first == energies(0)
    assert sorted(first) == sorted(energy(g).item() for g in graphs)
    assert any(energies(seed) != first for seed in range(1, 5))


def test_iterate_dataset() -> None:
    structures = read_structures(str(RESOURCES / "ethanol.xyz"))[:5]
    dataset = GraphDataset(structures, cutoff=CUTOFF)
    batches = list(iterate_batches(dataset, batch_size=2, shuffle=False))
    assert [batch.n_systems for batch in batches] == [2, 2, 1]
    assert sum(batch.n_atoms.sum().item() for batch in batches) == 45


def test_iterate_batches_invalid(graphs: list[Graph]) -> None:
    with pytest.raises(ValueError, match="`batch_size` is 0 but must be positive"):
        iterate_batches(graphs, 0, shuffle=False)
    assert list(iterate_batches([], 4, shuffle=True)) == []
