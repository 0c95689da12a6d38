"""Uncertainty of NVT averages from one i-PI run, by reweighting per ensemble member.

Run in the folder of a finished (or stopped) ``i-pi input.xml`` run:

    python reweight.py --temperature 300 --discard 100

It reads ``sim.out`` (properties), ``sim.committee_pot_0`` (member energies, Hartree)
and, if present, ``sim.pos_0.extxyz`` (positions), at the steps where all were written,
and prints for a few observables the plain average, the average over members of the
reweighted averages and their spread (the uncertainty due to the potential), with the
smallest effective sample size over members (if it is a handful of frames, the exact
averages are noise: run longer or use ``--method cumulant``).

i-PI's own ``i-pi-committee-reweight sim.committee_pot_0 obs.dat --input input.xml``
gives the same per-member averages for an observable file (its "Error" column is the
population std, ddof=0; here ddof=1).
"""

import argparse
from pathlib import Path

import ase.io
import numpy as np
from ase.units import Hartree

from shallow_ensemble.observables import reweight_observable


def read_properties(path: Path) -> dict[str, np.ndarray]:
    """Columns of an i-PI properties file, by name (``potential{electronvolt}``)."""
    names = []
    for line in path.read_text().splitlines():
        if line.startswith("# column"):
            names.append(line.split("-->")[1].split(":")[0].strip())
    data = np.loadtxt(path, ndmin=2)
    return {name: data[:, i] for i, name in enumerate(names)}


def read_extras(path: Path) -> dict[int, np.ndarray]:
    """An i-PI ``extras`` trajectory: step -> values (i-PI units)."""
    blocks: dict[int, list[float]] = {}
    step = None
    for line in path.read_text().splitlines():
        if line.strip().startswith("#EXTRAS"):
            step = int(line.split("Step:")[1])
            blocks[step] = []
        elif line.strip() and step is not None:
            blocks[step].extend(float(v) for v in line.split())
    return {s: np.array(v) for s, v in blocks.items()}


def nearest_neighbour_distance(atoms: ase.Atoms) -> float:
    """Mean distance from each atom to its nearest neighbour (minimum image), A."""
    distances = atoms.get_all_distances(mic=True)
    np.fill_diagonal(distances, np.inf)
    return float(distances.min(axis=1).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperature", type=float, required=True, help="K")
    parser.add_argument("--prefix", default="sim", help="i-PI output prefix")
    parser.add_argument(
        "--discard", type=int, default=0, help="equilibration steps to drop"
    )
    parser.add_argument("--method", choices=["exact", "cumulant"], default="exact")
    args = parser.parse_args(argv)

    properties = read_properties(Path(f"{args.prefix}.out"))
    committee = read_extras(Path(f"{args.prefix}.committee_pot_0"))
    steps = [int(s) for s in properties["step"] if int(s) in committee]
    steps = [s for s in steps if s >= args.discard]
    if len(steps) < 2:
        raise SystemExit("fewer than two frames with both properties and committee")
    rows = np.searchsorted(properties["step"], steps)
    members = np.stack([committee[s] for s in steps]) * Hartree  # eV
    n_members = members.shape[1]

    observables = {
        "potential energy (eV)": properties["potential{electronvolt}"][rows],
    }
    positions = Path(f"{args.prefix}.pos_0.extxyz")
    if positions.exists():
        frames = {
            int(f.info["ipi_comment"].split()[1]): f
            for f in ase.io.read(positions, ":")
        }
        if all(s in frames for s in steps):
            observables["nearest-neighbour distance (A)"] = np.array(
                [nearest_neighbour_distance(frames[s]) for s in steps]
            )

    print(
        f"{len(steps)} frames, {n_members} members, T = {args.temperature} K, "
        f"method '{args.method}'"
    )
    print(f"{'observable':32s} {'plain':>14s} {'reweighted':>14s} {'std':>11s} ESS")
    for name, values in observables.items():
        result = reweight_observable(
            values, members, args.temperature, method=args.method
        )
        print(
            f"{name:32s} {values.mean():14.6f} {float(result.mean):14.6f} "
            f"{float(result.std):11.3e} {result.effective_sample_size.min():.1f}"
        )


if __name__ == "__main__":
    main()
