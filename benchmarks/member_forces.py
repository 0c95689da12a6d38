"""Cost of member forces: batched (ours) vs a loop over members vs the mean force.

For one structure and a SOAP-BPNN backbone, times (median over repeats, interleaved):

- ``mean``: forces of the mean energy, one backward pass (what MD needs);
- ``batched``: forces of all M members with ``SoapBpnn.vectors_vjp`` (shared pair
  Jacobian + one batched pull-back), as used by the force-NLL training;
- ``loop``: M ``torch.autograd.grad`` calls, how codes without a batched route do it.

    python benchmarks/member_forces.py --data water.xyz --members 4,16,64

Prints a table and one line starting with ``member_forces:``.
"""

import argparse
import statistics
import time

import ase.io
import numpy as np
import torch
from vesin import NeighborList

from shallow_ensemble.backbones import SoapBpnn
from shallow_ensemble.model import EnsembleModel, pair_forces_to_atoms


def graph(atoms, cutoff):
    periodic = bool(np.all(atoms.pbc))
    box = atoms.cell.array if periodic else np.zeros((3, 3))
    i, j, s = NeighborList(cutoff=cutoff, full_list=True).compute(
        atoms.positions, box, periodic, "ijS"
    )
    positions = torch.tensor(atoms.positions)
    shifts = torch.tensor(s, dtype=torch.float64) @ torch.tensor(box)
    return (
        positions,
        torch.tensor(i, dtype=torch.long),
        torch.tensor(j, dtype=torch.long),
        shifts,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--members", default="4,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    atoms = ase.io.read(args.data, args.frame)
    types = sorted(set(atoms.numbers.tolist()))
    backbone = SoapBpnn(types)
    positions, centers, neighbors, shifts = graph(atoms, backbone.cutoff)
    positions, shifts = positions.to(dtype), shifts.to(dtype)
    print(
        f"{args.data}[{args.frame}]: {len(atoms)} atoms, {len(centers)} pairs, "
        f"{args.dtype}, {args.threads} threads"
    )
    print(
        f"{'M':>4}{'mean [ms]':>11}{'batched [ms]':>14}{'loop [ms]':>11}"
        f"{'batched/mean':>14}{'loop/batched':>14}{'max error':>11}"
    )
    summary = []
    for n_members in [int(m) for m in args.members.split(",")]:
        torch.manual_seed(0)
        model = EnsembleModel(SoapBpnn(types), n_members).to(dtype)
        species = model.species_index(torch.tensor(atoms.numbers))
        times = {"mean": [], "batched": [], "loop": []}
        for repeat in range(args.repeats + 1):  # the first one warms up
            pos = positions.clone().requires_grad_(True)
            start = time.perf_counter()
            vectors = pos[neighbors] - pos[centers] + shifts
            energy = model(vectors, centers, neighbors, species).sum(0).mean()
            torch.autograd.grad(energy, pos)
            times["mean"].append(time.perf_counter() - start)

            start = time.perf_counter()
            vectors = (positions[neighbors] - positions[centers] + shifts).detach()
            cot = model.head.member_cotangents().unsqueeze(1).expand(-1, len(atoms), -1)
            grads = model.backbone.vectors_vjp(
                vectors, centers, neighbors, species, cot
            )
            batched = pair_forces_to_atoms(grads, centers, neighbors, len(atoms))
            times["batched"].append(time.perf_counter() - start)

            start = time.perf_counter()
            pos = positions.clone().requires_grad_(True)
            vectors = pos[neighbors] - pos[centers] + shifts
            members = model(vectors, centers, neighbors, species).sum(0)
            loop = torch.stack(
                [
                    -torch.autograd.grad(members[k], pos, retain_graph=True)[0]
                    for k in range(n_members)
                ]
            )
            times["loop"].append(time.perf_counter() - start)
            if repeat == 0:
                times = {k: [] for k in times}
        error = float((batched - loop).abs().max())
        t = {k: 1000 * statistics.median(v) for k, v in times.items()}
        print(
            f"{n_members:>4}{t['mean']:>11.1f}{t['batched']:>14.1f}{t['loop']:>11.1f}"
            f"{t['batched'] / t['mean']:>14.2f}{t['loop'] / t['batched']:>14.2f}"
            f"{error:>11.1e}"
        )
        summary.append(
            f"M={n_members} batched/mean={t['batched'] / t['mean']:.2f} "
            f"loop/batched={t['loop'] / t['batched']:.2f}"
        )
    print("member_forces: " + "; ".join(summary))


if __name__ == "__main__":
    main()
