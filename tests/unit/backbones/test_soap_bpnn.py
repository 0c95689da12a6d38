"""Contract tests of the SOAP-BPNN backbone and its batched member forces."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import graph_of, make_model
from shallow_ensemble.model import pair_forces_to_atoms


def member_energies(model, positions, centers, neighbors, shifts, numbers):
    vectors = positions[neighbors] - positions[centers] + shifts
    species = model.species_index(numbers)
    return model(vectors, centers, neighbors, species).sum(dim=0)


@pytest.fixture(scope="module")
def water_like():
    """A periodic H/O structure made from the silicon cell geometry (types swapped)."""
    import ase

    rng = np.random.default_rng(1)
    positions = rng.uniform(0, 6.0, size=(18, 3))
    numbers = np.array([8, 1, 1] * 6)
    return ase.Atoms(
        numbers=numbers, positions=positions, cell=np.eye(3) * 6.0, pbc=True
    )


def test_rotation_translation_invariance(water_like):
    model = make_model([1, 8])
    atoms = water_like.copy()
    graph = graph_of(atoms, model.backbone.cutoff)
    reference = member_energies(model, *graph[:4], graph[4])

    rotation = Rotation.from_rotvec([0.3, -1.1, 0.7]).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + np.array([0.3, -2.0, 1.5])
    moved.cell = atoms.cell.array @ rotation.T
    rotated = member_energies(
        model, *graph_of(moved, model.backbone.cutoff)[:4], graph[4]
    )
    torch.testing.assert_close(rotated, reference, rtol=1e-10, atol=1e-10)


def test_permutation_invariance(ethanol_frames):
    model = make_model([1, 6, 8])
    atoms = ethanol_frames[3]
    graph = graph_of(atoms, model.backbone.cutoff)
    reference = member_energies(model, *graph[:4], graph[4])
    order = np.random.default_rng(0).permutation(len(atoms))
    permuted = atoms[order]
    graph_p = graph_of(permuted, model.backbone.cutoff)
    result = member_energies(model, *graph_p[:4], graph_p[4])
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)


def test_smooth_at_cutoff():
    """Energy and forces go continuously to their isolated-atom values at the cutoff."""
    import ase

    model = make_model([1, 8])
    cutoff = model.backbone.cutoff
    values = []
    for r in (cutoff - 1e-6, cutoff + 1e-6):
        atoms = ase.Atoms("OH", positions=[[0, 0, 0], [r, 0, 0]])
        graph = graph_of(atoms, cutoff + 0.5, requires_grad=True)
        energy = member_energies(model, *graph[:4], graph[4]).sum()
        (grad,) = torch.autograd.grad(energy, graph[0])
        values.append((energy.detach(), grad))
    assert abs(float(values[0][0] - values[1][0])) < 1e-8
    assert float(values[0][1].abs().max()) < 1e-6
    assert float(values[1][1].abs().max()) == 0.0


@pytest.mark.parametrize("frame", [0, 57])
def test_member_forces_match_finite_differences(ethanol_frames, frame):
    model = make_model([1, 6, 8], num_members=3)
    atoms = ethanol_frames[frame]
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff
    )
    vectors = positions[neighbors] - positions[centers] + shifts
    species = model.species_index(numbers)
    cotangents = model.head.member_cotangents().unsqueeze(1).expand(-1, len(atoms), -1)
    pair_grads = model.backbone.vectors_vjp(
        vectors, centers, neighbors, species, cotangents
    )
    forces = pair_forces_to_atoms(pair_grads, centers, neighbors, len(atoms))

    delta = 1e-5
    for atom in (0, 4):
        for xyz in range(3):
            plus, minus = positions.clone(), positions.clone()
            plus[atom, xyz] += delta
            minus[atom, xyz] -= delta
            e_plus = member_energies(model, plus, centers, neighbors, shifts, numbers)
            e_minus = member_energies(model, minus, centers, neighbors, shifts, numbers)
            numeric = -(e_plus - e_minus) / (2 * delta)
            torch.testing.assert_close(
                forces[:, atom, xyz], numeric, rtol=1e-6, atol=1e-8
            )


@pytest.mark.parametrize("cutoff", [3.5, 6.0])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_batched_member_forces_equal_loop(silicon_frames, chunk, cutoff):
    """Also when the members are taken in chunks (1, 4 and 2: uneven), and with
    centres whose pairs fill several blocks of the batched route (cutoff 6)."""
    from shallow_ensemble.backbones.soap_bpnn import BLOCK

    model = make_model([14], num_members=6, cutoff=cutoff)
    atoms = silicon_frames[5]
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff, requires_grad=True
    )
    largest_slot = int(torch.bincount(centers).max())
    assert (largest_slot > 2 * BLOCK) == (cutoff > 5)
    energies = member_energies(model, positions, centers, neighbors, shifts, numbers)
    loop = torch.stack(
        [
            -torch.autograd.grad(energies[k], positions, retain_graph=True)[0]
            for k in range(model.num_members)
        ]
    )
    vectors = (positions[neighbors] - positions[centers] + shifts).detach()
    species = model.species_index(numbers)
    cotangents = model.head.member_cotangents().unsqueeze(1).expand(-1, len(atoms), -1)
    if chunk is not None:
        model.backbone.member_chunk = chunk
    pair_grads = model.backbone.vectors_vjp(
        vectors, centers, neighbors, species, cotangents
    )
    batched = pair_forces_to_atoms(pair_grads, centers, neighbors, len(atoms))
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


def test_force_loss_parameter_gradients_match_double_backward(ethanol_frames):
    """The batched route gives the same parameter gradients of a force loss as
    plain double backpropagation through autograd forces."""
    model = make_model([1, 6, 8], num_members=3)
    atoms = ethanol_frames[10]
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff, requires_grad=True
    )
    target = torch.randn(model.num_members, len(atoms), 3, dtype=torch.float64)
    parameters = list(model.parameters())

    energies = member_energies(model, positions, centers, neighbors, shifts, numbers)
    forces = torch.stack(
        [
            -torch.autograd.grad(energies[k], positions, create_graph=True)[0]
            for k in range(model.num_members)
        ]
    )
    reference = torch.autograd.grad(
        ((forces - target) ** 2).sum(), parameters, allow_unused=True
    )

    vectors = (positions[neighbors] - positions[centers] + shifts).detach()
    species = model.species_index(numbers)
    cotangents = model.head.member_cotangents().unsqueeze(1).expand(-1, len(atoms), -1)
    pair_grads = model.backbone.vectors_vjp(
        vectors, centers, neighbors, species, cotangents, create_graph=True
    )
    batched = pair_forces_to_atoms(pair_grads, centers, neighbors, len(atoms))
    result = torch.autograd.grad(
        ((batched - target) ** 2).sum(), parameters, allow_unused=True
    )
    n_used = 0
    for ref, res in zip(reference, result, strict=True):
        # the head biases do not change forces: unused on both routes
        assert (ref is None) == (res is None)
        if ref is not None:
            n_used += 1
            torch.testing.assert_close(res, ref, rtol=1e-8, atol=1e-10)
    assert n_used == len(parameters) - 1


def test_scripted_backbone_matches_eager(ethanol_frames):
    model = make_model([1, 6, 8])
    positions, centers, neighbors, shifts, numbers = graph_of(
        ethanol_frames[0], model.backbone.cutoff
    )
    vectors = positions[neighbors] - positions[centers] + shifts
    species = model.species_index(numbers)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(
        scripted(vectors, centers, neighbors, species),
        model(vectors, centers, neighbors, species),
        rtol=0,
        atol=0,
    )


def test_bad_hypers_are_rejected():
    from shallow_ensemble.backbones import SoapBpnn

    with pytest.raises(ValueError, match="`cutoff_width` is 5.0"):
        SoapBpnn([1], cutoff=4.0, cutoff_width=5.0)
    with pytest.raises(ValueError, match="`atomic_types` is empty"):
        SoapBpnn([])
