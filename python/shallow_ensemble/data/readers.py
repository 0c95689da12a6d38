r"""Read extended XYZ files into validated :class:`Structure` objects.

Units: energies in eV, forces in eV/Å, stress in eV/Å³ with ASE's sign convention
(:math:`\sigma = \frac{1}{V} \partial E / \partial \varepsilon`, what
``atoms.get_stress()`` returns; positive along a direction that wants to shrink), or
the virial in eV (the extended XYZ convention of many DFT tools,
:math:`W = -V \sigma`), read as the stress :math:`-W / V`.

Every problem with the input is reported as a :class:`DataError` whose message names
the file, the frame (counted from 0) and what is wrong, so that a bad training set
fails before any model is built.

Besides the targets, every frame is checked for things that would make the model's
descriptors NaN or meaningless: non-finite positions, an invalid cell, the placeholder
species ``X`` (atomic number 0), and atoms closer than :data:`MIN_DISTANCE` to another
atom or to a periodic image of any atom (itself included).
"""

import os
from dataclasses import dataclass
from typing import Any

import ase
import ase.io
import numpy as np
import numpy.typing as npt

from ..errors import ShallowEnsembleError
from .geometry import cell_problem, overlap_problem


#: hints naming how a user sets the keys: in the configuration and on the command line
_ENERGY_KEY_HINT = (
    "set `data.energy_key` in the configuration (`--energy-key` for "
    "`shallow-ensemble evaluate`) to the key that holds the energy"
)
_FORCES_KEY_HINT = (
    "set `data.forces_key` in the configuration (`--forces-key` for "
    "`shallow-ensemble evaluate`) to the key that holds the forces, or evaluate "
    "energies only with `shallow-ensemble evaluate --no-forces`"
)


class DataError(ShallowEnsembleError, ValueError):
    """Invalid input data.

    The message names the file, the frame index (0-based) and the problem, and says
    how to fix it where that is obvious.
    """


@dataclass(eq=False)
class Structure:
    """One atomic structure with its (optional) reference energy and forces.

    :param numbers: atomic numbers, shape ``(n_atoms,)``, ``int64``
    :param positions: Cartesian positions, shape ``(n_atoms, 3)``, ``float64``, Å
    :param cell: cell vectors as rows, shape ``(3, 3)``, ``float64``, Å; rows along
        non-periodic directions are zero (all zeros for a molecule)
    :param pbc: periodicity along each cell vector, shape ``(3,)``, ``bool``
    :param energy: total potential energy in eV, or ``None`` when absent
    :param forces: forces, shape ``(n_atoms, 3)``, ``float64``, eV/Å, or ``None``
        when absent
    :param source: where the structure comes from, as ``"path:frame"`` (0-based)
    :param stress: stress, shape ``(3, 3)``, ``float64``, eV/Å³ (ASE's sign
        convention), or ``None`` when absent (only periodic frames have one)
    """

    numbers: npt.NDArray[np.int64]
    positions: npt.NDArray[np.float64]
    cell: npt.NDArray[np.float64]
    pbc: npt.NDArray[np.bool_]
    energy: float | None
    forces: npt.NDArray[np.float64] | None
    source: str
    stress: npt.NDArray[np.float64] | None = None

    @property
    def n_atoms(self) -> int:
        """Number of atoms in the structure."""
        return int(self.numbers.shape[0])


def read_structures(
    path: str | os.PathLike[str],
    energy_key: str = "energy",
    forces_key: str = "forces",
    require_energy: bool = True,
    require_forces: bool = True,
    *,
    origin: str | None = None,
    stress_key: str = "stress",
    virial_key: str = "virial",
) -> list[Structure]:
    """Read and validate all frames of an extended XYZ file.

    The energy is looked up in ``atoms.info[energy_key]`` and the forces in
    ``atoms.arrays[forces_key]``; since ASE (>= 3.23) moves the keys ``energy`` and
    ``forces`` into a ``SinglePointCalculator`` on read, the calculator results are
    searched as well.

    :param path: path to an extended XYZ file
    :param energy_key: name of the per-frame total energy (eV)
    :param forces_key: name of the per-atom forces column (eV/Å)
    :param require_energy: raise when a frame has no energy; if ``False`` such
        frames get ``energy=None``
    :param require_forces: raise when a frame has no forces; if ``False`` such
        frames get ``forces=None``
    :param stress_key: name of the per-frame stress (eV/Å³, 6 Voigt components
        ``xx yy zz yz xz xy`` or 9 of a 3x3 matrix); frames without it are read
        without stress (they may be mixed with frames that have one)
    :param virial_key: name of the per-frame virial (eV, 9 components or 3x3),
        read as the stress :math:`-W/V` when a frame has no ``stress_key``
    :param origin: where ``path`` was given, for the message of a missing file, e.g.
        ``"`data.train` in /runs/config.yaml, relative to that file's folder"``;
        without it, a relative ``path`` is said to be taken from the current directory
    :return: one :class:`Structure` per frame, in file order
    :raises DataError: if the file is missing, a directory, unreadable or empty, or
        if any frame is invalid (missing or non-finite targets, wrong shapes, bad
        cell, no atoms, the placeholder species ``X``, atoms closer than
        :data:`MIN_DISTANCE`)
    """
    filename = os.fspath(path)
    _check_file(filename, origin)
    try:
        frames = ase.io.read(filename, ":", format="extxyz")
    except Exception as error:  # ASE raises many different exception types
        index = _locate_parse_error(filename)
        raise DataError(
            f"{filename}, frame {index} (0-based): could not be parsed as extended "
            f"XYZ: {error}"
        ) from error
    if isinstance(frames, ase.Atoms):
        frames = [frames]
    if len(frames) == 0:
        raise DataError(
            f"{filename}: the file contains no frames; it must hold at least one "
            "extended XYZ frame"
        )
    return [
        _to_structure(
            atoms,
            f"{filename}, frame {index} (0-based)",
            f"{filename}:{index}",
            energy_key,
            forces_key,
            require_energy,
            require_forces,
            stress_key,
            virial_key,
        )
        for index, atoms in enumerate(frames)
    ]


def _check_file(filename: str, origin: str | None) -> None:
    """Raise a :class:`DataError` unless ``filename`` is a readable regular file."""
    given = f" ({origin})" if origin else ""
    if os.path.isdir(filename):
        raise DataError(
            f"{filename}{given}: is a directory, not a file; give the path of an "
            "extended XYZ file"
        )
    if not os.path.exists(filename):
        hint = "check the path"
        if not origin and not os.path.isabs(filename):
            hint += (
                f" (a relative path is taken from the current directory, {os.getcwd()})"
            )
        raise DataError(f"{filename}{given}: file not found; {hint}")
    if not os.path.isfile(filename):
        raise DataError(
            f"{filename}{given}: is not a regular file; give the path of an extended "
            "XYZ file"
        )
    if not os.access(filename, os.R_OK):
        raise DataError(
            f"{filename}{given}: the file cannot be read (permission denied); check "
            "its permissions"
        )


def _locate_parse_error(filename: str) -> int:
    """Index of the first frame that ASE fails to parse (best effort)."""
    # ASE first scans the headers (atom counts) of the whole file; a bad header
    # fails there before any frame is parsed, so find it by the same scan.
    with open(filename, encoding="utf-8", errors="replace") as file:
        lines = file.read().splitlines()
    line, frame = 0, 0
    while line < len(lines) and lines[line].strip() != "":
        try:
            n_atoms = int(lines[line])
        except ValueError:
            return frame
        if n_atoms < 0:
            return frame
        line += n_atoms + 2
        while line < len(lines) and lines[line].lstrip().startswith("VEC"):
            line += 1
        frame += 1
    # otherwise the header scan succeeded: count the frames parsed before failing
    count = 0
    try:
        for _ in ase.io.iread(filename, ":", format="extxyz"):
            count += 1
    except Exception:
        pass
    return count


def _lookup(atoms: ase.Atoms, key: str, per_atom: bool) -> Any:
    """Value stored under ``key`` in info/arrays or in the calculator results."""
    storage = atoms.arrays if per_atom else atoms.info
    if key in storage:
        return storage[key]
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    return results.get(key)


def _available_keys(atoms: ase.Atoms, per_atom: bool) -> list[str]:
    """Names of the per-atom (or per-frame) quantities stored for ``atoms``."""
    if per_atom:
        keys = [k for k in atoms.arrays if k not in ("numbers", "positions")]
    else:
        keys = list(atoms.info)
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    keys += [k for k, v in results.items() if (np.ndim(v) > 0) == per_atom]
    return sorted(set(keys))


def _read_energy(
    atoms: ase.Atoms, where: str, key: str, required: bool
) -> float | None:
    value = _lookup(atoms, key, per_atom=False)
    if value is None:
        if not required:
            return None
        raise DataError(
            f"{where}: no energy under key `{key}`; available per-frame keys: "
            f"{_available_keys(atoms, per_atom=False)}; {_ENERGY_KEY_HINT}, or "
            "remove the frames without energy"
        )
    try:
        energy = float(value)
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: energy `{key}` is {value!r}, which is not a single number"
        )
    if not np.isfinite(energy):
        raise DataError(f"{where}: energy `{key}` is {energy} but must be finite")
    return energy


def _read_forces(
    atoms: ase.Atoms, where: str, key: str, required: bool
) -> npt.NDArray[np.float64] | None:
    value = _lookup(atoms, key, per_atom=True)
    if value is None:
        if not required:
            return None
        raise DataError(
            f"{where}: no forces under key `{key}`; available per-atom keys: "
            f"{_available_keys(atoms, per_atom=True)}; {_FORCES_KEY_HINT}"
        )
    try:
        forces = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: forces `{key}` are not numeric")
    if forces.shape != (len(atoms), 3):
        raise DataError(
            f"{where}: forces `{key}` have shape {forces.shape} but must have shape "
            f"(n_atoms, 3) = ({len(atoms)}, 3)"
        )
    bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
    if bad.size > 0:
        raise DataError(
            f"{where}: forces `{key}` contain NaN or inf values (atoms {bad.tolist()})"
        )
    return forces


def _as_matrix(value: Any, where: str, what: str) -> npt.NDArray[np.float64]:
    """A stress or virial given as 6 Voigt components or 9 numbers, as 3x3."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {what} is not numeric")
    if array.size == 6:
        xx, yy, zz, yz, xz, xy = array.reshape(6)
        array = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    elif array.size == 9:
        array = array.reshape(3, 3)
    else:
        raise DataError(
            f"{where}: {what} has {array.size} values but must have 6 (Voigt order "
            "xx yy zz yz xz xy) or 9 (a 3x3 matrix)"
        )
    if not np.isfinite(array).all():
        raise DataError(f"{where}: {what} contains NaN or inf values")
    if not np.allclose(array, array.T, rtol=1e-6, atol=1e-10):
        raise DataError(f"{where}: {what} is not a symmetric 3x3 matrix")
    return array


def _read_stress(
    atoms: ase.Atoms,
    where: str,
    cell: npt.NDArray[np.float64],
    pbc: npt.NDArray[np.bool_],
    stress_key: str,
    virial_key: str,
) -> npt.NDArray[np.float64] | None:
    """The stress of a frame (eV/Å³), from ``stress_key`` or ``virial_key``."""
    stress = _lookup(atoms, stress_key, per_atom=False)
    virial = None if stress is not None else _lookup(atoms, virial_key, per_atom=False)
    if stress is None and virial is None:
        return None
    key = stress_key if stress is not None else virial_key
    if not pbc.all():
        raise DataError(
            f"{where}: has a {'stress' if stress is not None else 'virial'} "
            f"(`{key}`) but is not periodic in all three directions; a stress needs "
            'a periodic cell (`pbc="T T T"`)'
        )
    if stress is not None:
        return _as_matrix(stress, where, f"stress `{key}`")
    volume = abs(float(np.linalg.det(cell)))
    return -_as_matrix(virial, where, f"virial `{key}`") / volume


def _to_structure(
    atoms: ase.Atoms,
    where: str,
    source: str,
    energy_key: str,
    forces_key: str,
    require_energy: bool,
    require_forces: bool,
    stress_key: str = "stress",
    virial_key: str = "virial",
) -> Structure:
    """Validate one ASE frame and convert it to a :class:`Structure`."""
    if len(atoms) == 0:
        raise DataError(f"{where}: the frame has zero atoms; remove it from the file")
    positions = np.array(atoms.positions, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size > 0:
        raise DataError(
            f"{where}: positions contain NaN or inf values (atoms {bad.tolist()})"
        )
    pbc = np.array(atoms.pbc, dtype=np.bool_)
    cell = np.array(atoms.cell.array, dtype=np.float64)
    problem = cell_problem(cell, pbc)
    if problem:
        raise DataError(f"{where}: {problem}")
    cell[~pbc] = 0.0  # metatomic requires zero cell vectors along non-periodic axes
    numbers = np.array(atoms.numbers, dtype=np.int64)
    placeholders = np.flatnonzero(numbers <= 0)
    if placeholders.size > 0:
        raise DataError(
            f"{where}: atoms {placeholders.tolist()} have the species `X` (atomic "
            "number 0), a placeholder that is not a chemical element; give these "
            "atoms their element or remove them"
        )
    problem = overlap_problem(positions, cell, pbc)
    if problem:
        raise DataError(f"{where}: {problem}")
    return Structure(
        numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=pbc,
        energy=_read_energy(atoms, where, energy_key, require_energy),
        forces=_read_forces(atoms, where, forces_key, require_forces),
        source=source,
        stress=_read_stress(atoms, where, cell, pbc, stress_key, virial_key),
    )
