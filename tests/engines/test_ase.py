"""An exported model in ASE through ``metatomic_ase.MetatomicCalculator``.

A tiny model is trained on bundled silicon data (periodic) and exported; the
calculator's forces and stress must be derivatives of its energy, NVE molecular
dynamics must conserve the total energy, and the uncertainties it reads must be the
ones of the exported model.
"""

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.md.verlet import VelocityVerlet
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator

from conftest import graph_of, tiny_config
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, run_model
from shallow_ensemble.training import train


try:  # ASE >= 3.29 deprecates MaxwellBoltzmannDistribution in favour of this
    from ase.md.velocitydistribution import thermalize_momenta as maxwell_boltzmann
except ImportError:
    from ase.md.velocitydistribution import (
        MaxwellBoltzmannDistribution as maxwell_boltzmann,
    )


#: frames of silicon.xyz used here, none of them seen in training (i % 5 == 4):
#: a 16-atom periodic slab (cheap: finite differences and MD) and a 64-atom
#: strained bulk cell (stress)
SLAB, BULK = 14, 29


@pytest.fixture(scope="module")
def trained(silicon_frames, tmp_path_factory):
    """Energy + force NLL, 3 epochs, float64, exported."""
    folder = tmp_path_factory.mktemp("silicon")
    train_frames = [f for i, f in enumerate(silicon_frames) if i % 5 in (0, 1, 3)]
    ase.io.write(folder / "train.xyz", train_frames)  # 24 frames
    ase.io.write(
        folder / "valid.xyz", [f for i, f in enumerate(silicon_frames) if i % 5 == 2]
    )
    config = tiny_config(
        folder, strategy="energy_force_nll", epochs=3, warmup_epochs=None, batch_size=8
    )
    result = train(config, folder / "run", progress=False)
    path = export_model(result.model, folder / "model.pt")
    assert not (folder / "extensions").exists()  # plain TorchScript, no extension
    return result.model, path


@pytest.fixture(scope="module")
def max_atom_uncertainty(trained, silicon_frames):
    """Largest calibrated per-atom uncertainty over the frames used here, eV."""
    model = load_exported(trained[1])
    atoms = [silicon_frames[SLAB], silicon_frames[BULK]]
    results, _ = run_model(model, atoms, {"energy_uncertainty": "atom"})
    return float(results["energy_uncertainty"].block().values.max())


@pytest.fixture(scope="module")
def calculator(trained, max_atom_uncertainty):
    """The uncertainty check is active, with a threshold no frame here reaches
    (a warning would be an error under pytest; see the dedicated test below)."""
    path = trained[1]
    return MetatomicCalculator(
        str(path),
        check_consistency=True,
        uncertainty_threshold=10 * max_atom_uncertainty,
    )


def energy_of(atoms, calculator) -> float:
    atoms = atoms.copy()
    atoms.calc = calculator
    return atoms.get_potential_energy()


# Central differences with h = 1e-4 A: the truncation error h^2/6 |E'''| is below
# 1e-7 eV/A for |E'''| <= 50 eV/A^3 (a stiff covalent bond), and rounding,
# 1e-16 * |E| / h with |E| ~ 100 eV, is ~1e-10 eV/A; forces are ~0.1-1 eV/A, so
# 1e-6 eV/A separates agreement from any real error by five orders of magnitude.
FORCE_H = 1e-4
FORCE_ATOL = 1e-6


def test_forces_are_minus_energy_gradient(calculator, silicon_frames):
    atoms = silicon_frames[SLAB].copy()
    atoms.calc = calculator
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2  # not a trivially zero comparison
    for atom, component in [(0, 0), (3, 2), (7, 1), (11, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, component] += FORCE_H
        minus.positions[atom, component] -= FORCE_H
        numeric = -(energy_of(plus, calculator) - energy_of(minus, calculator)) / (
            2 * FORCE_H
        )
        assert forces[atom, component] == pytest.approx(numeric, abs=FORCE_ATOL)


# Strain steps of 1e-5 move atoms by <= 1e-4 A in these cells; with the same error
# estimates as for the forces, divided by a volume of ~1300 A^3, the finite
# difference is good to ~1e-10 eV/A^3, against stresses of ~1e-3 eV/A^3.
STRAIN_H = 1e-5
STRESS_ATOL = 1e-8


def strained(atoms, strain):
    """``atoms`` deformed by ``1 + strain`` (cell and positions, row vectors)."""
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return atoms


def test_stress_is_the_strain_derivative_of_the_energy(calculator, silicon_frames):
    atoms = silicon_frames[BULK].copy()
    assert atoms.pbc.all()
    atoms.calc = calculator
    stress = atoms.get_stress(voigt=False)  # ASE: (1/V) dE/d(strain)
    assert np.abs(stress).max() > 1e-4
    volume = atoms.get_volume()
    for i, j in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        direction = np.zeros((3, 3))
        direction[i, j] += 0.5
        direction[j, i] += 0.5  # symmetric strain: d E / d t = V sigma_ij
        e_plus = energy_of(strained(atoms, STRAIN_H * direction), calculator)
        e_minus = energy_of(strained(atoms, -STRAIN_H * direction), calculator)
        numeric = (e_plus - e_minus) / (2 * STRAIN_H) / volume
        assert stress[i, j] == pytest.approx(numeric, abs=STRESS_ATOL), (i, j)


def test_nve_dynamics_conserves_energy(calculator, silicon_frames):
    atoms = silicon_frames[SLAB].copy()
    atoms.calc = calculator
    maxwell_boltzmann(atoms, temperature_K=300, rng=np.random.default_rng(42))
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    potential, kinetic = [], []

    def record():
        potential.append(atoms.get_potential_energy())
        kinetic.append(atoms.get_kinetic_energy())

    dynamics.attach(record, interval=1)
    dynamics.run(100)
    potential, kinetic = np.array(potential), np.array(kinetic)
    total = potential + kinetic
    assert len(total) == 101

    # the atoms moved and exchanged energy: kinetic energy swings by a sizeable
    # fraction of 3/2 N kT (0.62 eV for 16 atoms at 300 K)
    swing = kinetic.max() - kinetic.min()
    assert swing > 0.05
    # Velocity Verlet conserves a shadow Hamiltonian: for a harmonic mode the true
    # energy oscillates with a relative amplitude (omega dt)^2 / 4 of the mode's
    # energy. For Si (highest phonon ~16 THz, omega dt ~ 0.05) that is <= 6e-4 of
    # the kinetic energy swing; we allow 5e-3 (anharmonicity, a barely trained and
    # possibly stiffer model). Forces that differ from minus the energy gradient by
    # more than ~0.5 % change the total energy by about that fraction of the swing.
    deviation = np.abs(total - total[0]).max()
    assert deviation < 5e-3 * swing, (deviation, swing)
    # no systematic drift: a bounded oscillation fits a slope whose change over the
    # run is at most its amplitude (<= 6e-4 of the swing, see above), while errors
    # in the forces accumulate steadily
    drift = np.polyfit(np.arange(len(total)), total, 1)[0] * len(total)
    assert abs(drift) < 1e-3 * swing, (drift, swing)


def test_uncertainties_match_the_exported_model(calculator, trained, silicon_frames):
    model, path = trained
    exported = load_exported(path)
    atoms = silicon_frames[BULK]
    values = {}
    for kind in ("system", "atom"):
        request = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind=kind)}
        block = calculator.run_model(atoms, request)["energy_uncertainty"].block()
        reference, _ = run_model(exported, [atoms], {"energy_uncertainty": kind})
        expected = reference["energy_uncertainty"].block()
        values[kind] = block.values.detach()
        assert values[kind].shape == ((1, 1) if kind == "system" else (len(atoms), 1))
        torch.testing.assert_close(values[kind], expected.values, rtol=1e-10, atol=0)
        assert block.samples == expected.samples

    # ... and they are the calibrated spreads of the eager model that was exported
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff
    )
    vectors = positions[neighbors] - positions[centers] + shifts
    atomic = model(vectors, centers, neighbors, model.species_index(numbers)).detach()
    torch.testing.assert_close(
        values["system"][0, 0],
        model.alpha_energy * atomic.sum(dim=0).std(),
        rtol=1e-9,
        atol=0,
    )
    torch.testing.assert_close(
        values["atom"][:, 0], model.alpha_atom * atomic.std(dim=1), rtol=1e-9, atol=0
    )


def test_small_uncertainty_threshold_warns(trained, silicon_frames):
    """The calculator warns about the atoms whose uncertainty is above threshold."""
    path = trained[1]
    atoms = silicon_frames[SLAB].copy()
    results, _ = run_model(load_exported(path), [atoms], {"energy_uncertainty": "atom"})
    uncertainties = results["energy_uncertainty"].block().values[:, 0].numpy()
    threshold = 0.9 * uncertainties.max()
    above = np.where(uncertainties > threshold)[0]
    assert 0 < len(above) < len(atoms)
    atoms.calc = MetatomicCalculator(
        str(path),
        check_consistency=True,
        uncertainty_threshold=threshold,
    )
    with pytest.warns(UserWarning, match="larger than the threshold") as record:
        atoms.get_potential_energy()
    assert len(record) == 1
    assert f"threshold for atoms {above}" in str(record[0].message)


# The fresh-process check (no shallow_ensemble, no sphericart imported) lives in
# test_fresh_process.py.
