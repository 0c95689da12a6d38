"""Cost of member forces: batched (ours) vs a loop over members vs the mean force.

For one structure and a SOAP-BPNN backbone, times (median over repeats, interleaved):

- ``mean``: forces of the mean energy, one backward pass (what MD needs);
- ``batched``: forces of all M members with ``SoapBpnn.vectors_vjp`` (shared pair
  Jacobian + one batched pull-back), as used by the force-NLL training;
- ``loop``: M ``torch.autograd.grad`` calls, how codes without a batched route do it;

and the peak resident memory each adds above the level before it (Linux).

    python benchmarks/member_forces.py --data water.xyz --members 4,16,64

Prints a table and one line starting with ``member_forces:``.
"""

import argparse
import statistics
import time

import ase.io
import numpy as np
import torch
from _memory import peak_extra_in_fresh_process, peak_extra_mib
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


def make_methods(model, positions, centers, neighbors, shifts, species):
    """The three ways to get forces, as functions of nothing (for timing)."""
    n_atoms = len(positions)

    def mean():
        pos = positions.clone().requires_grad_(True)
        vectors = pos[neighbors] - pos[centers] + shifts
        energy = model(vectors, centers, neighbors, species).sum(0).mean()
        return -torch.autograd.grad(energy, pos)[0]

    def batched():
        vectors = (positions[neighbors] - positions[centers] + shifts).detach()
        cot = model.head.member_cotangents().unsqueeze(1).expand(-1, n_atoms, -1)
        grads = model.backbone.vectors_vjp(vectors, centers, neighbors, species, cot)
        return pair_forces_to_atoms(grads, centers, neighbors, n_atoms)

    def loop():
        pos = positions.clone().requires_grad_(True)
        vectors = pos[neighbors] - pos[centers] + shifts
        members = model(vectors, centers, neighbors, species).sum(0)
        return torch.stack(
            [
                -torch.autograd.grad(members[k], pos, retain_graph=True)[0]
                for k in range(model.num_members)
            ]
        )

    return {"mean": mean, "batched": batched, "loop": loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--members", default="4,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
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
        f"{'mean MiB':>10}{'batch MiB':>10}{'loop MiB':>10}"
    )
    summary = []
    for n_members in [int(m) for m in args.members.split(",")]:
        torch.manual_seed(0)
        model = EnsembleModel(SoapBpnn(types), n_members).to(dtype)
        species = model.species_index(torch.tensor(atoms.numbers))

        methods = make_methods(model, positions, centers, neighbors, shifts, species)
        if args.only:  # a fresh process measuring one method's memory
            print(f"peak_mib {peak_extra_mib(methods[args.only]):.1f}")
            return
        times = {name: [] for name in methods}
        for repeat in range(args.repeats + 1):  # the first one warms up
            for name, method in methods.items():
                start = time.perf_counter()
                method()
                if repeat > 0:
                    times[name].append(time.perf_counter() - start)
        memory = {
            name: peak_extra_in_fresh_process(
                "--only", name, "--members", str(n_members)
            )
            for name in methods
        }
        error = float((methods["batched"]() - methods["loop"]()).abs().max())
        t = {k: 1000 * statistics.median(v) for k, v in times.items()}
        print(
            f"{n_members:>4}{t['mean']:>11.1f}{t['batched']:>14.1f}{t['loop']:>11.1f}"
            f"{t['batched'] / t['mean']:>14.2f}{t['loop'] / t['batched']:>14.2f}"
            f"{error:>11.1e}" + "".join(f"{memory[name]:>10.0f}" for name in methods)
        )
        summary.append(
            f"M={n_members} batched/mean={t['batched'] / t['mean']:.2f} "
            f"loop/batched={t['loop'] / t['batched']:.2f} "
            f"batched={memory['batched']:.0f}MiB"
        )
    print("member_forces: " + "; ".join(summary))


if __name__ == "__main__":
    main()
