import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from shallow_ensemble.data import (
    MIN_DISTANCE,
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
            r"keys: \['config_type'\]; set `data\.energy_key` in the configuration "
            r"\(`--energy-key` for `shallow-ensemble evaluate`\) to the key that "
            r"holds the energy, or remove the frames without energy$",
        ),
        (
            "missing_forces.xyz",
            0,
            r"no forces under key `forces`; available per-atom "
            r"keys: \['charges'\]; set `data\.forces_key` in the configuration "
            r"\(`--forces-key` for `shallow-ensemble evaluate`\) to the key that "
            r"holds the forces, or evaluate energies only with "
            r"`shallow-ensemble evaluate --no-forces`$",
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


# ----------------------------------------------------------- file not found --
def test_missing_absolute_path_is_not_said_to_be_relative() -> None:
    path = data("does_not_exist.xyz")
    with pytest.raises(DataError) as info:
        read_structures(path)
    assert str(info.value) == f"{path}: file not found; check the path"


def test_missing_relative_path_names_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        read_structures("nowhere.xyz")
    assert str(info.value) == (
        "nowhere.xyz: file not found; check the path (a relative path is taken "
        f"from the current directory, {tmp_path})"
    )


def test_missing_file_names_where_the_caller_got_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path from a configuration file is not relative to the current directory:
    the caller says where it comes from, and the cwd hint is left out."""
    monkeypatch.chdir(tmp_path)
    origin = "`data.train` in /runs/config.yaml, relative to /runs"
    with pytest.raises(DataError) as info:
        read_structures("train.xyz", origin=origin)
    assert str(info.value) == f"train.xyz ({origin}): file not found; check the path"


def test_directory_is_not_reported_as_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_structures(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: is a directory, not a file; give the path of an extended XYZ file"
    )


def test_key_hints_name_the_configuration_keys_not_python_arguments() -> None:
    for name in ("missing_energy.xyz", "missing_forces.xyz"):
        with pytest.raises(DataError) as info:
            read_structures(data(name))
        message = str(info.value)
        assert "_key=" not in message and "require_" not in message, message
        assert "`data." in message and "shallow-ensemble evaluate" in message


# ----------------------------------------------------- species and overlaps --
def test_placeholder_species_x_is_rejected() -> None:
    with pytest.raises(DataError) as info:
        read_structures(data("placeholder_species.xyz"))
    assert str(info.value) == (
        f"{data('placeholder_species.xyz')}, frame 1 (0-based): atoms [1, 3] have the "
        "species `X` (atomic number 0), a placeholder that is not a chemical "
        "element; give these atoms their element or remove them"
    )


def test_coincident_atoms_in_a_molecule_are_rejected() -> None:
    with pytest.raises(DataError) as info:
        read_structures(data("overlapping_atoms.xyz"))
    assert str(info.value) == (
        f"{data('overlapping_atoms.xyz')}, frame 1 (0-based): atoms 1 and 3 are 0 Å "
        f"apart, closer than the minimum of {MIN_DISTANCE} Å; overlapping atoms make "
        "the descriptors NaN: remove the duplicate atom or correct its position"
    )


def test_atom_on_a_periodic_image_of_another_atom_is_rejected() -> None:
    """Frame 1: atom 2 sits at x = 8.1 in a 4 Å cube, i.e. two cells away from atom
    0 (positions need not be wrapped into the cell)."""
    with pytest.raises(DataError, match=where("periodic_image_overlap.xyz", 1)) as info:
        read_structures(data("periodic_image_overlap.xyz"))
    assert str(info.value).endswith(
        "atom 0 and the periodic image of atom 2 (shifted by [-2, 0, 0] cell vectors) "
        f"are 0 Å apart, closer than the minimum of {MIN_DISTANCE} Å; overlapping "
        "atoms make the descriptors NaN: the same atom is probably written twice, "
        "e.g. at fractional coordinates 0 and 1; remove the duplicate or correct its "
        "position"
    )


def write_frame(path: Path, atoms: ase.Atoms) -> str:
    atoms.calc = SinglePointCalculator(
        atoms, energy=-1.0, forces=np.zeros((len(atoms), 3))
    )
    ase.io.write(path, atoms, format="extxyz")
    return str(path)


def test_atom_on_its_own_periodic_image_is_rejected(tmp_path: Path) -> None:
    """a - b is 0.071 Å long: every atom nearly sits on its own image, which a
    minimum-image check between distinct atoms never sees."""
    cell = [[5.0, 0.0, 0.0], [5.05, 0.05, 0.0], [0.0, 0.0, 5.0]]
    atoms = ase.Atoms("H2", positions=[[1, 1, 1], [1, 3, 3]], cell=cell, pbc=True)
    path = write_frame(tmp_path / "thin.xyz", atoms)
    with pytest.raises(DataError) as info:
        read_structures(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}, frame 0 (0-based): atom 0 and its own periodic image (shifted by "
        f"[1, -1, 0] cell vectors) are 0.0707 Å apart, closer than the minimum of "
        f"{MIN_DISTANCE} Å ("
    )
    assert message.endswith(
        "the periodic cell is too small; check the cell (`Lattice`)"
    )


def test_non_periodic_direction_is_not_wrapped(tmp_path: Path) -> None:
    """Atoms one cell vector apart along a non-periodic direction do not overlap."""
    atoms = ase.Atoms(
        "H2",
        positions=[[1, 1, 0], [1, 1, 5]],
        cell=np.diag([4.0, 4.0, 5.0]),
        pbc=[True, True, False],
    )
    (structure,) = read_structures(write_frame(tmp_path / "slab.xyz", atoms))
    assert structure.pbc.tolist() == [True, True, False]
    atoms.pbc = True
    with pytest.raises(DataError, match="atom 0 and the periodic image of atom 1"):
        read_structures(write_frame(tmp_path / "bulk.xyz", atoms))


@pytest.mark.parametrize("pbc", [False, True])
def test_min_distance_is_the_threshold(tmp_path: Path, pbc: bool) -> None:
    def frame(distance: float) -> str:
        if pbc:  # across the boundary of a 6 Å cube
            positions = [[distance / 2, 3, 3], [6 - distance / 2, 3, 3]]
        else:
            positions = [[3, 3, 3], [3 + distance, 3, 3]]
        atoms = ase.Atoms("H2", positions=positions, cell=6 * np.eye(3), pbc=pbc)
        return write_frame(tmp_path / f"{distance}.xyz", atoms)

    (structure,) = read_structures(frame(1.01 * MIN_DISTANCE))
    assert structure.n_atoms == 2
    pair = "atom 0 and the periodic image of atom 1" if pbc else "atoms 0 and 1"
    with pytest.raises(DataError) as info:
        read_structures(frame(0.99 * MIN_DISTANCE))
    assert re.search(
        re.escape(pair) + r".* are " + re.escape(f"{0.99 * MIN_DISTANCE:.3g} Å apart"),
        str(info.value),
    ), str(info.value)


def test_wide_flat_structure_does_not_crash_the_neighbour_list(tmp_path: Path) -> None:
    """vesin 0.6 crashes (SIGFPE) when it shrinks a very flat cell list to fit its
    maximum number of cells; the reader's cutoff keeps below that maximum. Run in a
    subprocess so that a crash fails this test, not the whole session."""
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [1000, 1000, 0]])
    path = write_frame(tmp_path / "flat.xyz", atoms)
    script = (
        "import sys\n"
        "from shallow_ensemble.data import read_structures\n"
        "print(read_structures(sys.argv[1])[0].n_atoms)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, path], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout) == (0, "2\n"), result.stderr
