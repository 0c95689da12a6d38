"""The SOAP-BPNN backbone's batched member forces (blocks, chunks, parameter
gradients) and its hypers; the contract every kind meets (invariances, smoothness,
scripting) is checked in tests/contract."""

import pytest
import torch

from conftest import graph_of, make_model
from shallow_ensemble.model import pair_forces_to_atoms


def member_energies(model, positions, centers, neighbors, shifts, numbers):
    vectors = positions[neighbors] - positions[centers] + shifts
    species = model.species_index(numbers)
    return model(vectors, centers, neighbors, species).sum(dim=0)


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


def test_bad_hypers_are_rejected():
    from shallow_ensemble.backbones import SoapBpnn

    with pytest.raises(ValueError, match="`cutoff_width` is 5.0"):
        SoapBpnn([1], cutoff=4.0, cutoff_width=5.0)
    with pytest.raises(ValueError, match="`atomic_types` is empty"):
        SoapBpnn([])


def test_hypers_rebuild_the_backbone():
    from shallow_ensemble.backbones import SoapBpnn

    backbone = make_model([1, 8], hidden_sizes=[6, 5]).backbone
    hypers = backbone.hypers()
    assert hypers["hidden_sizes"] == [6, 5] and hypers["atomic_types"] == [1, 8]
    hypers["hidden_sizes"].append(3)  # a copy: the backbone's do not change
    assert backbone.hypers()["hidden_sizes"] == [6, 5]
    rebuilt = SoapBpnn.from_hypers(backbone.hypers())
    assert rebuilt.hypers() == backbone.hypers()
    assert rebuilt.state_dict().keys() == backbone.state_dict().keys()
