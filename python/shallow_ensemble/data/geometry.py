"""Geometry checks of a structure: a usable cell, no overlapping atoms."""

import numpy as np
import numpy.typing as npt
import vesin


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


def cell_problem(cell: npt.NDArray[np.float64], pbc: npt.NDArray[np.bool_]) -> str:
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


def overlap_problem(
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
