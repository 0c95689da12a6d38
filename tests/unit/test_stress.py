"""Member stresses: strain derivatives of the member energies (finite differences),
rotation covariance, zero for molecules; the stress loss in closed form."""

import copy

import numpy as np
import pytest
import torch
from ase.build import bulk

from conftest import make_model
from shallow_ensemble import losses
from shallow_ensemble.data import GraphDataset, Structure, collate


def copper(seed: int, strain: float = 0.03) -> Structure:
    """A rattled, randomly strained 16-atom fcc copper cell."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    deformation = np.eye(3) + strain * rng.standard_normal((3, 3))
    atoms.set_cell(atoms.cell @ deformation, scale_atoms=True)
    atoms.rattle(0.08, seed=seed)
    return Structure(
        numbers=atoms.numbers.astype(np.int64),
        positions=atoms.positions.copy(),
        cell=np.array(atoms.cell),
        pbc=np.array([True, True, True]),
        energy=None,
        forces=None,
        source=f"copper:{seed}",
    )


@pytest.fixture(scope="module")
def model():
    return make_model([29], num_members=3)


def predict(model, structures, forces="members"):
    graphs = GraphDataset(structures, cutoff=model.cutoff, progress=False)
    batch = collate([graphs[i] for i in range(len(graphs))])
    return model.predict(batch, forces=forces, stress=forces != "none")


def strained(structure: Structure, strain: np.ndarray) -> Structure:
    result = copy.deepcopy(structure)
    deformation = np.eye(3) + strain
    result.positions = structure.positions @ deformation
    result.cell = structure.cell @ deformation
    return result


def test_member_stresses_are_strain_derivatives_of_member_energies(model):
    structures = [copper(1), copper(2)]
    stress = predict(model, structures).stress.detach().numpy()
    assert stress.shape == (3, 2, 3, 3)
    h = 1e-5
    for s, structure in enumerate(structures):
        volume = abs(np.linalg.det(structure.cell))
        for a in range(3):
            for b in range(3):
                step = np.zeros((3, 3))
                step[a, b] = h
                plus = predict(model, [strained(structure, step)], "none").energies
                minus = predict(model, [strained(structure, -step)], "none").energies
                numeric = ((plus - minus) / (2 * h * volume)).detach().numpy()[0]
                # central differences: error ~h^2 * third derivative, far below
                # the stresses (~1e-2 eV/A^3)
                np.testing.assert_allclose(stress[:, s, a, b], numeric, atol=1e-9)
    assert np.abs(stress).max() > 1e-3


def test_mean_stress_is_the_mean_of_the_member_stresses(model):
    structures = [copper(3), copper(4)]
    members = predict(model, structures, "members").stress
    mean = predict(model, structures, "mean").stress
    assert mean.shape == (1, 2, 3, 3)
    torch.testing.assert_close(members.mean(dim=0), mean[0], rtol=0, atol=1e-14)


def test_stresses_are_symmetric_and_rotate_with_the_structure(model):
    structure = copper(5)
    q, r = np.linalg.qr(np.random.default_rng(7).standard_normal((3, 3)))
    rotation = q * np.sign(np.diag(r))
    rotation *= np.linalg.det(rotation)  # a proper rotation
    turned = copy.deepcopy(structure)
    turned.positions = structure.positions @ rotation.T
    turned.cell = structure.cell @ rotation.T
    stress = predict(model, [structure]).stress[:, 0].detach().numpy()
    rotated = predict(model, [turned]).stress[:, 0].detach().numpy()
    np.testing.assert_allclose(stress, np.swapaxes(stress, 1, 2), atol=1e-14)
    expected = np.einsum("ab,kbc,dc->kad", rotation, stress, rotation)
    np.testing.assert_allclose(rotated, expected, atol=1e-12)


def test_a_molecule_has_no_stress(model):
    structure = copper(6)
    structure.cell = np.zeros((3, 3))
    structure.pbc = np.array([False, False, False])
    structure.positions = structure.positions[:4] * 0.8
    structure.numbers = structure.numbers[:4]
    stress = predict(model, [structure]).stress
    assert torch.equal(stress, torch.zeros_like(stress))


def test_stress_loss_in_closed_form():
    torch.manual_seed(0)
    members = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.01
    members = members + members.transpose(-1, -2)
    target = torch.randn(3, 3, 3, dtype=torch.float64) * 0.01
    target = target + target.transpose(-1, -2)
    cell = torch.diag_embed(torch.tensor([[4.0, 5, 6], [5, 5, 5], [3, 4, 5]]))
    cell = cell.to(torch.float64)
    n_atoms = torch.tensor([8, 10, 6])
    mask = torch.tensor([True, False, True])
    scale = torch.tensor([120.0 / 8, 125.0 / 10, 60.0 / 6], dtype=torch.float64)
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]

    def virials(stress):
        return torch.stack([stress[..., a, b] for a, b in voigt], -1) * scale[:, None]

    # two of the three structures have a stress: the loss is their mean times 2/3
    y = virials(target)[mask]
    v = virials(members)[:, mask]
    expected_mse = ((v.mean(0) - y) ** 2).mean() * 2 / 3
    mse = losses.stress_loss("mse", members, target, mask, cell, n_atoms)
    torch.testing.assert_close(mse, expected_mse)
    mu, var = v.mean(0), v.var(0)
    expected_nll = (0.5 * (torch.log(var) + (y - mu) ** 2 / var)).mean() * 2 / 3
    for name in ("gaussian_nll_ensemble", "gaussian_nll_full_ensemble"):
        nll = losses.stress_loss(name, members, target, mask, cell, n_atoms)
        torch.testing.assert_close(nll, expected_nll)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.stress_loss("hinge", members, target, mask, cell, n_atoms)
