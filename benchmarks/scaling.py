"""Cost of an exported model (energy + forces) against the number of atoms.

Replicates a structure n x n x n times and times the exported model through metatomic
(neighbour lists excluded), each size in a fresh process, twice: with glibc's default
allocator settings, and with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` (large
blocks from the heap, kept for reuse). Reports wall, user and system time per
evaluation, page faults per atom and atoms per second.

Why the second setting: by default glibc serves every block above 32 MiB with a fresh
``mmap`` and returns it on ``free``; the pages of every large temporary tensor are then
faulted in and zeroed by the kernel again at each evaluation. For large systems this
system time grows faster than the computation and makes the cost per atom rise, while
the user (computation) time per atom stays flat.

    python benchmarks/scaling.py --data water.xyz --replicate 1,2,4 --members 16

Prints a table and one line starting with ``scaling:``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase.io
import torch
from inference_overhead import evaluate

from shallow_ensemble.backbones import SoapBpnn
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported
from shallow_ensemble.model import EnsembleModel


TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def measure(args) -> dict:
    """One size, in this process: times of ``args.repeats`` evaluations."""
    torch.set_num_threads(args.threads)
    base = ase.io.read(args.data, args.frame)
    torch.manual_seed(0)
    model = EnsembleModel(SoapBpnn(sorted(set(base.numbers.tolist()))), args.members)
    exported = load_exported(export_model(model, Path(tempfile.mkdtemp()) / "m.pt"))
    atoms = base.repeat((args.size,) * 3)
    outputs = {"energy": "system"}
    evaluate(exported, atoms, outputs, 3)  # warm-up: TorchScript optimises after 2
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    evaluate(exported, atoms, outputs, args.repeats)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    n = args.repeats
    return {
        "atoms": len(atoms),
        "wall": wall / n,
        "user": (after.ru_utime - before.ru_utime) / n,
        "system": (after.ru_stime - before.ru_stime) / n,
        "faults_per_atom": (after.ru_minflt - before.ru_minflt) / n / len(atoms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--replicate", default="1,2,4", help="supercell factors n")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size is not None:
        print(json.dumps(measure(args)))
        return

    print(
        f"{'malloc':<8}{'atoms':>7}{'wall [ms]':>11}{'user [ms]':>11}{'sys [ms]':>10}"
        f"{'faults/atom':>13}{'atoms/s':>9}{'us/atom (user)':>16}"
    )
    summary = []
    for label, extra in (("default", {}), ("tuned", TUNED)):
        env = {k: v for k, v in os.environ.items() if k not in TUNED}
        rates = []
        for n in [int(r) for r in args.replicate.split(",")]:
            command = [sys.executable, __file__, *sys.argv[1:], "--size", str(n)]
            output = subprocess.run(
                command, env={**env, **extra}, capture_output=True, text=True
            )
            if output.returncode != 0:
                raise RuntimeError(output.stderr[-2000:])
            r = json.loads(output.stdout.strip().splitlines()[-1])
            rate = r["atoms"] / r["wall"]
            rates.append(f"{r['atoms']}:{rate:.0f}")
            print(
                f"{label:<8}{r['atoms']:>7}{1000 * r['wall']:>11.0f}"
                f"{1000 * r['user']:>11.0f}{1000 * r['system']:>10.0f}"
                f"{r['faults_per_atom']:>13.1f}{rate:>9.0f}"
                f"{1e6 * r['user'] / r['atoms']:>16.0f}"
            )
        summary.append(f"{label} atoms/s " + " ".join(rates))
    print("scaling: " + "; ".join(summary))


if __name__ == "__main__":
    main()
