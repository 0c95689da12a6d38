"""Reading stresses and virials: Voigt and 3x3 forms, the virial's sign and volume,
frames without stress beside frames with one, and clear errors."""

import ase
import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from shallow_ensemble.data import DataError, GraphDataset, collate, read_structures


def labelled_copper(seed: int) -> ase.Atoms:
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True)
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    atoms.get_potential_energy()
    return atoms


def test_stress_written_by_ase_is_read_as_ase_computes_it(tmp_path):
    frames = [labelled_copper(0), labelled_copper(1)]
    ase.io.write(tmp_path / "cu.xyz", frames)
    structures = read_structures(tmp_path / "cu.xyz")
    for atoms, structure in zip(frames, structures, strict=True):
        expected = atoms.get_stress(voigt=False)
        assert np.abs(expected).max() > 1e-3
        np.testing.assert_allclose(structure.stress, expected, rtol=1e-12)


def test_a_virial_is_read_as_minus_the_stress_times_the_volume(tmp_path):
    atoms = labelled_copper(2)
    stress = atoms.get_stress(voigt=False)
    bare = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
    bare.info["energy"] = atoms.get_potential_energy()
    bare.info["virial"] = -stress * atoms.get_volume()
    bare.arrays["forces"] = atoms.get_forces()
    ase.io.write(tmp_path / "virial.xyz", bare)
    (structure,) = read_structures(tmp_path / "virial.xyz")
    np.testing.assert_allclose(structure.stress, stress, rtol=1e-10, atol=1e-14)
    bare.info["pressure_tensor"] = bare.info.pop("virial")
    ase.io.write(tmp_path / "renamed.xyz", bare)
    (renamed,) = read_structures(tmp_path / "renamed.xyz", virial_key="pressure_tensor")
    np.testing.assert_allclose(renamed.stress, stress, rtol=1e-10, atol=1e-14)


def test_frames_without_stress_are_masked_in_a_batch(tmp_path):
    with_stress = labelled_copper(3)
    without = labelled_copper(4)
    without.calc.results.pop("stress")
    ase.io.write(tmp_path / "mixed.xyz", [without, with_stress])
    structures = read_structures(tmp_path / "mixed.xyz")
    assert structures[0].stress is None and structures[1].stress is not None
    dataset = GraphDataset(structures, cutoff=3.0, progress=False)
    batch = collate([dataset[0], dataset[1]])
    assert batch.stress_mask.tolist() == [False, True]
    assert float(batch.stress[0].abs().max()) == 0.0
    np.testing.assert_allclose(batch.stress[1].numpy(), structures[1].stress)
    assert collate([dataset[0]]).stress is None


def frame_with_info(tmp_path, name, value, pbc=True):
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True)
    atoms.pbc = pbc
    if not pbc:
        atoms.cell = np.zeros((3, 3))
    atoms.info["energy"] = -1.0
    atoms.info[name] = value
    atoms.arrays["forces"] = np.zeros((len(atoms), 3))
    path = tmp_path / f"{name}.xyz"
    ase.io.write(path, atoms)
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.array([0.1, 0.2, 0.3, 0.4]), "has 4 values but must have 6"),
        (np.array([0.1, np.nan, 0.3, 0.0, 0.0, 0.0]), "contains NaN or inf"),
        (np.arange(9.0), "is not a symmetric 3x3 matrix"),
    ],
)
def test_a_bad_stress_is_named(tmp_path, value, message):
    # a key that ASE does not parse itself (it checks `stress` and `virial`)
    path = frame_with_info(tmp_path, "dft_stress", value)
    with pytest.raises(DataError, match=f"frame 0 .*stress `dft_stress` {message}"):
        read_structures(path, stress_key="dft_stress")


def test_a_stress_without_a_periodic_cell_is_an_error(tmp_path):
    path = frame_with_info(tmp_path, "virial", np.eye(3).ravel(), pbc=False)
    with pytest.raises(DataError, match="not periodic in all three directions"):
        read_structures(path)
