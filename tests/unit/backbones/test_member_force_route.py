"""The SOAP-BPNN member-force route in all its layouts: atoms and members in chunks,
members pulled back one by one or through the folded per-atom matrix (from
FOLD_MEMBERS members), one product per Cartesian component or block-major products
(many members, or a graph for force losses), one to three hidden layers, several
atomic types; and the layouts it hands to pair_forces_to_atoms and the spherical
harmonics it uses."""

import pytest
import torch

from conftest import graph_of, make_model
from shallow_ensemble.backbones.soap_bpnn import BLOCK_MAJOR_MEMBERS, FOLD_MEMBERS
from shallow_ensemble.backbones.spherical_harmonics import SphericalHarmonics
from shallow_ensemble.model import pair_forces_to_atoms


def loop_and_batched(model, atoms, create_graph=False):
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff, requires_grad=True
    )
    species = model.species_index(numbers)
    vectors = positions[neighbors] - positions[centers] + shifts
    energies = model(vectors, centers, neighbors, species).sum(dim=0)
    loop = torch.stack(
        [
            -torch.autograd.grad(
                energies[k], positions, retain_graph=True, create_graph=create_graph
            )[0]
            for k in range(model.num_members)
        ]
    )
    cotangents = model.head.member_cotangents().unsqueeze(1).expand(-1, len(atoms), -1)
    pair_grads = model.backbone.vectors_vjp(
        vectors.detach(), centers, neighbors, species, cotangents, create_graph
    )
    batched = pair_forces_to_atoms(pair_grads, centers, neighbors, len(atoms))
    return loop, batched


@pytest.mark.parametrize("hidden_sizes", [[7], [9, 6], [8, 7, 5]])
@pytest.mark.parametrize("num_members", [3, FOLD_MEMBERS, BLOCK_MAJOR_MEMBERS])
@pytest.mark.parametrize("chunk_elements", [None, 20_000])
def test_batched_member_forces_equal_a_loop_over_members(
    ethanol_frames, hidden_sizes, num_members, chunk_elements
):
    """Three atomic types; with 20k numbers per chunk the 9 atoms are taken a few
    at a time and the members in several chunks."""
    model = make_model([1, 6, 8], num_members=num_members, hidden_sizes=hidden_sizes)
    if chunk_elements is not None:
        model.backbone.chunk_elements = chunk_elements
    loop, batched = loop_and_batched(model, ethanol_frames[3])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_members", [3, FOLD_MEMBERS])
@pytest.mark.parametrize("chunk_elements", [None, 20_000])
def test_force_loss_gradients_with_chunked_atoms(
    ethanol_frames, num_members, chunk_elements
):
    """The graph of the batched route (block-major products, atoms in chunks) gives
    the parameter gradients of double backpropagation through a loop."""
    model = make_model([1, 6, 8], num_members=num_members, hidden_sizes=[9, 6])
    if chunk_elements is not None:
        model.backbone.chunk_elements = chunk_elements
    loop, batched = loop_and_batched(model, ethanol_frames[20], create_graph=True)
    target = torch.randn_like(loop)
    parameters = [p for p in model.parameters() if p is not model.head.bias]
    reference = torch.autograd.grad(((loop - target) ** 2).sum(), parameters)
    result = torch.autograd.grad(((batched - target) ** 2).sum(), parameters)
    for res, ref in zip(result, reference, strict=True):
        torch.testing.assert_close(res, ref, rtol=1e-8, atol=1e-10)


def test_pair_forces_to_atoms_is_the_same_in_every_layout():
    torch.manual_seed(0)
    n_members, n_pairs, n_atoms = 5, 40, 7
    centers = torch.randint(0, n_atoms, (n_pairs,))
    neighbors = torch.randint(0, n_atoms, (n_pairs,))
    grads = torch.randn(n_members, n_pairs, 3, dtype=torch.float64)
    stored = grads.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # as the route
    assert not stored.is_contiguous()
    expected = torch.zeros(n_members, n_atoms, 3, dtype=torch.float64)
    for p in range(n_pairs):
        expected[:, centers[p]] += grads[:, p]
        expected[:, neighbors[p]] -= grads[:, p]
    for layout in (grads, stored):
        forces = pair_forces_to_atoms(layout, centers, neighbors, n_atoms)
        torch.testing.assert_close(forces, expected, rtol=1e-12, atol=1e-12)


def test_spherical_harmonics_with_the_pairs_last():
    torch.manual_seed(0)
    vectors = torch.randn(30, 3, dtype=torch.float64)
    module = SphericalHarmonics(4)
    values, gradients = module.compute_with_gradients(vectors)
    values_t, gradients_t = module.compute_with_gradients(vectors, pairs_last=True)
    torch.testing.assert_close(values_t, values.t(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        gradients_t, gradients.permute(2, 1, 0), rtol=1e-14, atol=1e-14
    )
