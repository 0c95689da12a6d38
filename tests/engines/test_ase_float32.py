"""A float32 export in ASE (``metatomic_ase.MetatomicCalculator``): a few MD steps,
energies and forces against the float64 export of the same model, and forces against
finite differences of the float32 energy.

Tolerances come from the float32 unit roundoff ``u = 2**-24 = 6.0e-8``:

- energies: the total energy (here ~ -84 eV, dominated by the composition baseline)
  is a sum of per-atom energies each rounded at ~u of its size, so the float32
  energy is within a few ``u |E|`` of the float64 one; we allow ``8 u |E|``
  (~4e-5 eV, measured ~2 u |E|);
- forces: float32 keeps 7 significant digits; the backward pass through the spline
  tables, the power spectrum and the MLP, and the sums over pairs, lose some of
  them; we ask for 4 (``1e-4`` times the largest force, ~1e-4 eV/A);
- finite differences of the float32 energy, 4-point stencil
  ``(E(-2h) - 8 E(-h) + 8 E(h) - E(2h)) / 12h``: each energy carries an error of up
  to ``8 u |E|``, so the stencil carries up to ``(1 + 8 + 8 + 1) / 12 * 8 u |E| / h``;
  with ``h = 0.02`` A that is ~3e-3 eV/A, against forces above 0.1 eV/A. The
  truncation error of the stencil (``h^4/30`` times the fifth derivative) is
  measured on the float64 export at the same points and added.
"""

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.md.verlet import VelocityVerlet
from metatomic_ase import MetatomicCalculator

from conftest import SILICON, tiny_config
from shallow_ensemble.data import GraphDataset, read_structures
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported
from shallow_ensemble.training.initialization import build_model, init_data_dependent


try:  # ASE >= 3.29 deprecates MaxwellBoltzmannDistribution in favour of this
    from ase.md.velocitydistribution import thermalize_momenta as maxwell_boltzmann
except ImportError:
    from ase.md.velocitydistribution import (
        MaxwellBoltzmannDistribution as maxwell_boltzmann,
    )


U32 = 2.0**-24
SLAB = 14  # a 16-atom periodic slab of silicon.xyz
H = 0.02
STENCIL = {-2: 1 / 12, -1: -8 / 12, 1: 8 / 12, 2: -1 / 12}  # of dE/dx, times 1/h


def energy_tolerance(energy: float) -> float:
    return 8 * U32 * abs(energy)


def force_tolerance(forces: np.ndarray) -> float:
    return 1e-4 * float(np.abs(forces).max())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny model with data-dependent normalisation and baseline (untrained, random
    heads), exported in float64 and float32."""
    folder = tmp_path_factory.mktemp("float32")
    structures = read_structures(SILICON)
    dataset = GraphDataset([structures[i] for i in range(0, 40, 5)], 3.5)
    torch.manual_seed(0)
    model = build_model(tiny_config(folder), [14], 4)
    init_data_dependent(model, dataset)
    model = model.to(torch.float64)
    paths = {
        dtype: export_model(model, folder / dtype / "model.pt", dtype=dtype)
        for dtype in ("float64", "float32")
    }
    assert load_exported(paths["float32"]).capabilities().dtype == "float32"
    return {
        dtype: MetatomicCalculator(
            str(path), check_consistency=True, uncertainty_threshold=None
        )
        for dtype, path in paths.items()
    }


def evaluate(atoms, calculator):
    atoms = atoms.copy()
    atoms.calc = calculator
    return atoms.get_potential_energy(), atoms.get_forces()


def test_float32_md_matches_float64(exports):
    atoms = ase.io.read(SILICON, SLAB)
    atoms.calc = exports["float32"]
    maxwell_boltzmann(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.positions.copy()
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    frames = []

    def record():
        frames.append(
            (atoms.copy(), atoms.get_potential_energy(), atoms.get_forces().copy())
        )

    dynamics.attach(record, interval=1)
    dynamics.run(8)
    assert len(frames) == 9
    assert np.abs(atoms.positions - start).max() > 1e-2
    for frame, energy32, forces32 in frames:
        energy64, forces64 = evaluate(frame, exports["float64"])
        assert energy32 != energy64  # really a float32 evaluation
        assert abs(energy32 - energy64) <= energy_tolerance(energy64)
        assert np.abs(forces32 - forces64).max() <= force_tolerance(forces64)


def test_float32_forces_are_finite_differences_of_its_energy(exports):
    atoms = ase.io.read(SILICON, SLAB)
    energy32, forces32 = evaluate(atoms, exports["float32"])
    _, forces64 = evaluate(atoms, exports["float64"])
    checked = 0
    for atom in range(len(atoms)):
        for component in range(3):
            if abs(forces32[atom, component]) < 0.1:
                continue
            derivative = {"float32": 0.0, "float64": 0.0}
            for step, weight in STENCIL.items():
                moved = atoms.copy()
                moved.positions[atom, component] += step * H
                for dtype, calculator in exports.items():
                    derivative[dtype] += weight * evaluate(moved, calculator)[0] / H
            truncation = abs(-derivative["float64"] - forces64[atom, component])
            rounding = 18 / 12 * energy_tolerance(energy32) / H
            error = abs(-derivative["float32"] - forces32[atom, component])
            assert error <= rounding + truncation, (atom, component)
            checked += 1
            if checked == 6:
                return
    pytest.fail(f"only {checked} force components above 0.1 eV/A")
