import re
from importlib.resources import files
from pathlib import Path

import ase.io
import numpy as np
import pytest

from shallow_ensemble.data import (
    DataError,
    Structure,
    atomic_types_of,
    check_atomic_types,
    read_structures,
)


DATA = Path(__file__).resolve().parents[2] / "data"
RESOURCES = files("shallow_ensemble") / "resources"


def data(name: str) -> str:
    return str(DATA / name)


def where(name: str, frame: int) -> str:
    return re.escape(f"{data(name)}, frame {frame} (0-based): ")


@pytest.mark.parametrize(
    ("name", "frame", "message"),
    [
        (
            "missing_energy.xyz",
            1,
            r"no energy under key `energy`; available per-frame "
            r"keys: \['config_type'\]\. Pass the right key with `energy_key=\.\.\.`",
        ),
        (
            "missing_forces.xyz",
            0,
            r"no forces under key `forces`; available per-atom "
            r"keys: \['charges'\]\. Pass the right key with `forces_key=\.\.\.`",
        ),
        ("nan_energy.xyz", 1, r"energy `energy` is nan but must be finite"),
        (
            "nan_forces.xyz",
            0,
            r"forces `forces` contain NaN or inf values \(atoms \[1\]\)",
        ),
        (
            "nan_positions.xyz",
            0,
            r"positions contain NaN or inf values \(atoms \[2\]\)",
        ),
        (
            "forces_wrong_shape.xyz",
            0,
            r"forces `forces` have shape \(3, 2\) but must "
            r"have shape \(n_atoms, 3\) = \(3, 3\)",
        ),
        ("zero_atoms.xyz", 0, r"the frame has zero atoms"),
        (
            "zero_periodic_cell_vector.xyz",
            0,
            r"`pbc` is \[True, True, False\] but cell "
            r"vector 1 is zero; give a non-zero cell vector",
        ),
        (
            "truncated.xyz",
            1,
            r"could not be parsed as extended XYZ: .*Frame has 2 atoms, "
            r"expected 3",
        ),
        (
            "not_xyz.xyz",
            1,
            r"could not be parsed as extended XYZ: .*Expected xyz header",
        ),
    ],
)
def test_invalid_frames(name: str, frame: int, message: str) -> None:
    with pytest.raises(DataError, match=where(name, frame) + message):
        read_structures(data(name))


def test_missing_file() -> None:
    path = data("does_not_exist.xyz")
    with pytest.raises(DataError, match=re.escape(f"{path}: file not found")):
        read_structures(path)


def test_empty_file() -> None:
    path = data("empty.xyz")
    with pytest.raises(
        DataError, match=re.escape(f"{path}: the file contains no frames")
    ):
        read_structures(path)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_custom_keys() -> None:
    structures = read_structures(
        data("custom_keys.xyz"), energy_key="TotEnergy", forces_key="force"
    )
    assert [s.energy for s in structures] == [-14.2, -6.5]
    forces = structures[1].forces
    assert forces is not None
    np.testing.assert_allclose(forces, [[0.3, 0.0, 0.0], [-0.3, 0.0, 0.0]])
    assert structures[1].pbc.tolist() == [True, True, True]
    np.testing.assert_allclose(structures[1].cell, 4.0 * np.eye(3))

    message = r"no energy under key `energy`; available per-frame keys: \['TotEnergy'\]"
    with pytest.raises(DataError, match=where("custom_keys.xyz", 0) + message):
        read_structures(data("custom_keys.xyz"))
    message = r"no forces under key `forces`; available per-atom keys: \['force'\]"
    with pytest.raises(DataError, match=where("custom_keys.xyz", 0) + message):
        read_structures(data("custom_keys.xyz"), energy_key="TotEnergy")


def test_optional_targets() -> None:
    structures = read_structures(data("missing_energy.xyz"), require_energy=False)
    assert structures[0].energy == -14.2
    assert structures[1].energy is None
    assert structures[1].forces is not None

    structures = read_structures(data("missing_forces.xyz"), require_forces=False)
    assert structures[0].forces is None
    assert structures[0].energy == -14.2


def test_optional_targets_are_still_validated() -> None:
    with pytest.raises(DataError, match="energy `energy` is nan"):
        read_structures(data("nan_energy.xyz"), require_energy=False)


def test_mixed_pbc_slab() -> None:
    (slab,) = read_structures(data("mixed_pbc_slab.xyz"))
    assert slab.pbc.tolist() == [True, True, False]
    np.testing.assert_array_equal(slab.cell[2], 0.0)
    np.testing.assert_allclose(slab.cell[:2], [[3.0, 0.0, 0.0], [1.0, 3.2, 0.0]])


def _compare_with_ase(path: str, structures: list[Structure]) -> None:
    frames = ase.io.read(path, ":", format="extxyz")
    assert len(structures) == len(frames)
    for index, (structure, atoms) in enumerate(zip(structures, frames, strict=True)):
        assert structure.source == f"{path}:{index}"
        assert structure.n_atoms == len(atoms)
        assert structure.numbers.dtype == np.int64
        assert structure.positions.dtype == np.float64
        np.testing.assert_array_equal(structure.numbers, atoms.numbers)
        np.testing.assert_array_equal(structure.positions, atoms.positions)
        np.testing.assert_array_equal(structure.pbc, atoms.pbc)
        assert structure.energy == atoms.get_potential_energy()
        assert structure.forces is not None
        assert structure.forces.shape == (len(atoms), 3)
        np.testing.assert_array_equal(structure.forces, atoms.get_forces())


def test_ethanol_resource() -> None:
    path = str(RESOURCES / "ethanol.xyz")
    structures = read_structures(path)
    assert len(structures) == 200
    _compare_with_ase(path, structures)
    for structure in structures:
        assert structure.pbc.tolist() == [False, False, False]
        np.testing.assert_array_equal(structure.cell, np.zeros((3, 3)))
    assert atomic_types_of(structures) == [1, 6, 8]


def test_silicon_resource() -> None:
    path = str(RESOURCES / "silicon.xyz")
    structures = read_structures(path)
    assert len(structures) == 40
    _compare_with_ase(path, structures)
    frames = ase.io.read(path, ":", format="extxyz")
    for structure, atoms in zip(structures, frames, strict=True):
        assert structure.pbc.tolist() == [True, True, True]
        np.testing.assert_array_equal(structure.cell, atoms.cell.array)
        assert structure.n_atoms <= 64
    assert {atoms.info["config_type"] for atoms in frames} == {
        "AIMD-NVT",
        "Elastic",
        "Surface",
        "Vacancy",
    }
    assert atomic_types_of(structures) == [14]


def test_check_atomic_types() -> None:
    structures = read_structures(data("unknown_element.xyz"))
    assert atomic_types_of(structures) == [1, 6, 8, 17]
    check_atomic_types(structures, [1, 6, 8, 17])
    check_atomic_types(structures[::2], [8, 6, 1])

    source = f"{data('unknown_element.xyz')}:1"
    message = (
        f"`Cl` (Z=17) in {source} is not one of the model's atomic types [H, C, O]"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        check_atomic_types(structures, [1, 6, 8])


def test_check_atomic_types_several_unknown() -> None:
    structures = read_structures(data("unknown_element.xyz"))
    path = data("unknown_element.xyz")
    message = (
        f"`Cl` (Z=17) in {path}:1, `C` (Z=6) in {path}:2 are not among the model's "
        "atomic types [H, O]"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        check_atomic_types(structures, [1, 8])
