"""Read extended XYZ files into validated :class:`Structure` objects.

Every problem with the input is reported as a :class:`DataError` whose message names
the file, the frame (counted from 0) and what is wrong, so that a bad training set
fails before any model is built.

Besides the targets, every frame is checked for things that would make the model's
descriptors NaN or meaningless: non-finite positions, an invalid cell, the placeholder
species ``X`` (atomic number 0), and atoms closer than :data:`MIN_DISTANCE` to another
atom or to a periodic image of any atom (itself included).
"""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ase
import ase.io
import numpy as np
import numpy.typing as npt
import vesin
from ase.data import chemical_symbols

from ..errors import ShallowEnsembleError


MIN_DISTANCE = 0.1
"""Smallest allowed distance between two atoms, Å, periodic images included.

Real structures never come close: the shortest bond, in H2, is 0.74 Å. Atoms closer
than 0.1 Å are a duplicated atom (often the same atom written at fractional
coordinates 0 and 1 of a periodic cell) or a cell too small for its content; at
distance 0 the descriptors are NaN."""

#: vesin's cell list shrinks its grid above this many cells (``MAX_NUMBER_OF_CELLS``
#: in vesin 0.6), and a very flat grid may then get zero cells along one direction and
#: crash the process (SIGFPE); :func:`_overlap_cutoff` keeps below it.
_VESIN_MAX_CELLS = 1e5

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
    *,
    origin: str | None = None,
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


def check_atomic_types(
    structures: Iterable[Any],
    atomic_types: Sequence[int],
    *,
    model: str | None = None,
    where: str = "the data",
) -> None:
    """Check that every atom of ``structures`` has one of the ``atomic_types``.

    This is the package's one Python-side check of atomic types (the model's own
    TorchScript lookup, :py:meth:`~shallow_ensemble.model.EnsembleModel.species_index`,
    only guards the compiled path): use it before running a model on data.

    :param structures: what to check: :class:`Structure` objects (named by their
        ``source``, ``path:frame``), other objects with a ``numbers`` array (e.g.
        :class:`~shallow_ensemble.data.Graph`), or plain atomic numbers (e.g. from
        :func:`atomic_types_of`); the last two are named by ``where``
    :param atomic_types: atomic numbers the model knows
    :param model: the model, in words, e.g. ``"the model in 'run/model.ckpt'
        (`training.init_from`)"``; without it, "the model"
    :param where: the data, in words, for items without a ``source``
    :raises DataError: naming each unknown element with the first structure
        (``path:frame``, or ``where``) that contains it, and the known elements
    """
    allowed = set(int(z) for z in atomic_types)
    first_seen: dict[int, str] = {}
    for item in structures:
        if isinstance(item, int | np.integer):
            numbers, source = [int(item)], where
        else:
            numbers = np.unique(np.asarray(item.numbers)).tolist()
            source = getattr(item, "source", None) or where
        for z in numbers:
            if z not in allowed and z not in first_seen:
                first_seen[z] = source
    if not first_seen:
        return
    unknown = ", ".join(
        f"`{_symbol(z)}` (Z={z}) in {source}" for z, source in first_seen.items()
    )
    symbols = "[" + ", ".join(_symbol(z) for z in sorted(allowed)) + "]"
    if model is None:
        known = f"the model's atomic types {symbols}"
    else:
        known = f"the atomic types {symbols} of {model}"
    verb = "is not one" if len(first_seen) == 1 else "are not"
    among = "of" if len(first_seen) == 1 else "among"
    raise DataError(
        f"{unknown} {verb} {among} {known}; remove these structures or use a model "
        "trained with these atomic types"
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


def _overlap_cutoff(
    positions: npt.NDArray[np.float64],
    cell: npt.NDArray[np.float64],
    pbc: npt.NDArray[np.bool_],
) -> float:
    """Cutoff of the neighbour list that finds the atoms closer than
    :data:`MIN_DISTANCE`; the pairs are then filtered by distance.

    vesin's cell list has cells about one cutoff wide, and its cost grows with the
    number of cells: a cutoff of about the mean spacing of the atoms (but at most 3 Å)
    gives about one atom per cell, and a larger one where needed keeps the cell list
    below vesin's maximum number of cells (see ``_VESIN_MAX_CELLS``).
    """
    # upper bounds of the sizes of vesin's bounding box: the length of a periodic
    # cell vector bounds the distance between its faces; along a non-periodic axis
    # vesin takes the spread of the positions plus 1%, and at least 1 Å
    spread = positions.max(axis=0) - positions.min(axis=0)
    sizes = np.where(pbc, np.linalg.norm(cell, axis=1), np.maximum(1.0, 1.02 * spread))
    spacing = float(np.prod(sizes) / len(positions)) ** (1.0 / 3.0)
    cutoff = max(MIN_DISTANCE, min(spacing, 3.0))
    while np.prod(np.maximum(1.0, np.floor(sizes / cutoff))) > _VESIN_MAX_CELLS / 2:
        cutoff *= 1.1
    return cutoff


def _overlap_problem(
    positions: npt.NDArray[np.float64],
    cell: npt.NDArray[np.float64],
    pbc: npt.NDArray[np.bool_],
) -> str:
    """Describe the atoms closer than :data:`MIN_DISTANCE` (periodic images
    included), or return an empty string."""
    calculator = vesin.NeighborList(
        cutoff=_overlap_cutoff(positions, cell, pbc), full_list=False
    )
    periodic: bool | npt.NDArray[np.bool_] = pbc if pbc.any() else False
    try:
        i, j, shifts, distances = calculator.compute(
            np.ascontiguousarray(positions), cell, periodic, "ijSd"
        )
    except RuntimeError as error:
        return f"the distances between atoms could not be computed: {error}"
    close = np.flatnonzero(np.asarray(distances) < MIN_DISTANCE)
    if close.size == 0:
        return ""
    pairs = []
    for k in close.tolist():
        first, second = int(i[k]), int(j[k])
        shift = np.asarray(shifts[k], dtype=np.int64)
        # report (min, max) with the shift seen from the first; an image of the
        # atom itself is seen along +shift and -shift: report the first that
        # starts with a positive component
        if second < first or (
            second == first and shift.any() and shift[shift != 0][0] < 0
        ):
            first, second, shift = second, first, -shift
        pairs.append((first, second, float(distances[k]), tuple(shift.tolist())))
    first, second, distance, image_shift = min(pairs)
    if not any(image_shift):
        what = f"atoms {first} and {second} are"
        fix = "remove the duplicate atom or correct its position"
    elif first == second:
        what = (
            f"atom {first} and its own periodic image (shifted by {list(image_shift)} "
            "cell vectors) are"
        )
        fix = "the periodic cell is too small; check the cell (`Lattice`)"
    else:
        what = (
            f"atom {first} and the periodic image of atom {second} (shifted by "
            f"{list(image_shift)} cell vectors) are"
        )
        fix = (
            "the same atom is probably written twice, e.g. at fractional "
            "coordinates 0 and 1; remove the duplicate or correct its position"
        )
    others = (
        f" ({len(pairs)} pairs of atoms, periodic images included, are this close)"
        if len(pairs) > 1
        else ""
    )
    return (
        f"{what} {distance:.3g} Å apart, closer than the minimum of {MIN_DISTANCE} "
        f"Å{others}; overlapping atoms make the descriptors NaN: {fix}"
    )


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
    numbers = np.array(atoms.numbers, dtype=np.int64)
    placeholders = np.flatnonzero(numbers <= 0)
    if placeholders.size > 0:
        raise DataError(
            f"{where}: atoms {placeholders.tolist()} have the species `X` (atomic "
            "number 0), a placeholder that is not a chemical element; give these "
            "atoms their element or remove them"
        )
    problem = _overlap_problem(positions, cell, pbc)
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
    )
