"""Read extended XYZ files into validated :class:`Structure` objects.

Every problem with the input is reported as a :class:`DataError` whose message names
the file, the frame (counted from 0) and what is wrong, so that a bad training set
fails before any model is built.
"""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ase
import ase.io
import numpy as np
import numpy.typing as npt
from ase.data import chemical_symbols

from ..errors import ShallowEnsembleError


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
    """

    numbers: npt.NDArray[np.int64]
    positions: npt.NDArray[np.float64]
    cell: npt.NDArray[np.float64]
    pbc: npt.NDArray[np.bool_]
    energy: float | None
    forces: npt.NDArray[np.float64] | None
    source: str

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
    :return: one :class:`Structure` per frame, in file order
    :raises DataError: if the file is missing, unreadable or empty, or if any frame
        is invalid (missing or non-finite targets, wrong shapes, bad cell, no atoms)
    """
    filename = os.fspath(path)
    if not os.path.isfile(filename):
        raise DataError(
            f"{filename}: file not found; check the path (relative paths are "
            f"resolved from {os.getcwd()})"
        )
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
        )
        for index, atoms in enumerate(frames)
    ]


def check_atomic_types(
    structures: Iterable[Structure], atomic_types: Sequence[int]
) -> None:
    """Check that every atom of ``structures`` has one of the ``atomic_types``.

    :param structures: structures to check
    :param atomic_types: atomic numbers the model knows
    :raises DataError: naming each unknown element with the first structure
        (``path:frame``) that contains it
    """
    allowed = set(int(z) for z in atomic_types)
    first_seen: dict[int, str] = {}
    for structure in structures:
        for z in np.unique(structure.numbers).tolist():
            if z not in allowed and z not in first_seen:
                first_seen[z] = structure.source
    if not first_seen:
        return
    unknown = ", ".join(
        f"`{_symbol(z)}` (Z={z}) in {source}" for z, source in first_seen.items()
    )
    known = ", ".join(_symbol(z) for z in sorted(allowed))
    verb = "is not one" if len(first_seen) == 1 else "are not"
    among = "of" if len(first_seen) == 1 else "among"
    raise DataError(
        f"{unknown} {verb} {among} the model's atomic types [{known}]; remove these "
        "structures or use a model trained with these atomic types"
    )


def atomic_types_of(structures: Iterable[Structure]) -> list[int]:
    """Sorted unique atomic numbers found in ``structures``.

    :param structures: structures to scan
    :return: sorted list of distinct atomic numbers
    """
    found: set[int] = set()
    for structure in structures:
        found.update(np.unique(structure.numbers).tolist())
    return sorted(found)


def _symbol(z: int) -> str:
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z{z}"


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


def _cell_problem(cell: npt.NDArray[np.float64], pbc: npt.NDArray[np.bool_]) -> str:
    """Describe what is wrong with a cell, or return an empty string."""
    if not np.all(np.isfinite(cell)):
        return "the cell contains NaN or inf values"
    lengths = np.linalg.norm(cell, axis=1)
    for direction in range(3):
        if pbc[direction] and lengths[direction] == 0.0:
            return (
                f"`pbc` is {pbc.tolist()} but cell vector {direction} is zero; give a "
                "non-zero cell vector (`Lattice`) for every periodic direction, or "
                "mark that direction non-periodic in `pbc`"
            )
    n_periodic = int(pbc.sum())
    if n_periodic > 0 and np.linalg.matrix_rank(cell[pbc]) < n_periodic:
        return "the periodic cell vectors are linearly dependent (zero volume)"
    return ""


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
            f"{_available_keys(atoms, per_atom=False)}. Pass the right key with "
            "`energy_key=...`, or `require_energy=False` to allow frames without "
            "energy"
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
            f"{_available_keys(atoms, per_atom=True)}. Pass the right key with "
            "`forces_key=...`, or `require_forces=False` to allow frames without "
            "forces"
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


def _to_structure(
    atoms: ase.Atoms,
    where: str,
    source: str,
    energy_key: str,
    forces_key: str,
    require_energy: bool,
    require_forces: bool,
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
    problem = _cell_problem(cell, pbc)
    if problem:
        raise DataError(f"{where}: {problem}")
    cell[~pbc] = 0.0  # metatomic requires zero cell vectors along non-periodic axes
    return Structure(
        numbers=np.array(atoms.numbers, dtype=np.int64),
        positions=positions,
        cell=cell,
        pbc=pbc,
        energy=_read_energy(atoms, where, energy_key, require_energy),
        forces=_read_forces(atoms, where, forces_key, require_forces),
        source=source,
    )
