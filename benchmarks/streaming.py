"""Streaming datasets (``data.streaming``) against in-memory ones: peak resident
memory and time per epoch.

Writes an N-structure dataset into a temporary folder by rattling the frames of
``--data`` (Gaussian displacements of ``--rattle`` Å; the reference energies and forces
are copied unchanged, which is fine for memory and time, not for accuracy), then trains
``--epochs`` epochs of ``mse`` on it, each run in a fresh process whose peak resident
memory (VmHWM: reading, validation, cache, training) is reported:

- streaming on ``--structures`` structures (the large run);
- in memory and streaming on ``--compare`` structures (a size that fits both), for
  the time per epoch (median of the epochs' training time in ``log.csv``).

    python benchmarks/streaming.py --data ethanol.xyz --structures 100000 \\
        --compare 5000 --epochs 2 --workers 1

Prints one line starting with ``streaming:``.
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase.io
import numpy as np
import torch
from _memory import peak_mib

from shallow_ensemble.config import config_from_dict
from shallow_ensemble.training import train


def write_rattled(source: str, n: int, rattle: float, seed: int, path: Path) -> None:
    """``n`` frames: the frames of ``source`` in turn, positions rattled."""
    frames = ase.io.read(source, ":")
    rng = np.random.default_rng(seed)
    with open(path, "w") as fd:
        for k in range(n):
            atoms = frames[k % len(frames)]
            positions = atoms.positions + rng.normal(0.0, rattle, atoms.positions.shape)
            forces = atoms.get_forces()
            header = (
                'Properties=species:S:1:pos:R:3:forces:R:3 pbc="'
                + " ".join("T" if p else "F" for p in atoms.pbc)
                + f'" energy={float(atoms.get_potential_energy())!r}'
            )
            if atoms.pbc.any():
                lattice = " ".join(repr(float(x)) for x in atoms.cell.array.reshape(-1))
                header = f'Lattice="{lattice}" ' + header
            lines = [f"{len(atoms)}", header]
            symbols = atoms.get_chemical_symbols()
            for symbol, r, f in zip(symbols, positions, forces, strict=True):
                lines.append(
                    f"{symbol} {r[0]:.8f} {r[1]:.8f} {r[2]:.8f} "
                    f"{f[0]:.8f} {f[1]:.8f} {f[2]:.8f}"
                )
            fd.write("\n".join(lines) + "\n")


def measure(args) -> dict:
    """Train on ``args.file`` in this process; epoch times and peak memory."""
    torch.set_num_threads(args.threads)
    streaming = args.mode == "streaming"
    config = config_from_dict(
        {
            "data": {
                "train": args.file,
                "valid": args.valid,
                "streaming": streaming,
                "num_workers": args.workers if streaming else 0,
            },
            "model": {
                "num_members": args.members,
                "cutoff": args.cutoff,
                "max_radial": args.max_radial,
                "max_angular": args.max_angular,
                "hidden_sizes": [args.hidden, args.hidden],
            },
            "training": {
                "strategy": "mse",
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seed": args.seed,
            },
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        train(config, folder, progress=False, calibrate=False)
        total = time.perf_counter() - start
        with open(Path(folder) / "log.csv") as fd:
            rows = list(csv.DictReader(fd))
    epochs = [float(row["seconds"]) for row in rows]
    return {
        "epoch": statistics.median(epochs),
        "total": total,
        "loss": float(rows[-1]["train_loss"]),
        "peak_mib": peak_mib(),
    }


def run(args, mode: str, path: Path) -> dict:
    """One training run in a fresh process (its own peak memory)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
    command += ["--file", str(path)]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        raise RuntimeError(output.stderr[-3000:])
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="frames to rattle (extxyz)")
    parser.add_argument("--structures", type=int, default=100_000)
    parser.add_argument("--compare", type=int, default=5_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--valid", type=float, default=0.02, help="valid fraction")
    parser.add_argument("--cutoff", type=float, default=4.0)
    parser.add_argument("--max-radial", type=int, default=3)
    parser.add_argument("--max-angular", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers")
    parser.add_argument("--rattle", type=float, default=0.02, help="angstrom")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(measure(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        large, small = Path(tmp) / "large.xyz", Path(tmp) / "small.xyz"
        write_rattled(args.data, args.compare, args.rattle, args.seed, small)
        memory = run(args, "memory", small)
        streaming = run(args, "streaming", small)
        print(
            f"N={args.compare}: in memory {memory['epoch']:.2f} s/epoch, "
            f"{memory['peak_mib']:.0f} MiB; streaming {streaming['epoch']:.2f} "
            f"s/epoch, {streaming['peak_mib']:.0f} MiB"
        )
        start = time.perf_counter()
        write_rattled(args.data, args.structures, args.rattle, args.seed, large)
        written = time.perf_counter() - start
        size = large.stat().st_size / 2**20
        big = run(args, "streaming", large)
        print(
            f"N={args.structures} ({size:.0f} MiB of extxyz, written in "
            f"{written:.0f} s): streaming {big['epoch']:.2f} s/epoch, "
            f"{big['peak_mib']:.0f} MiB, {big['total']:.0f} s in all"
        )
    ratio = streaming["epoch"] / memory["epoch"]
    print(
        f"streaming: N={args.structures} peak={big['peak_mib']:.0f}MiB "
        f"epoch={big['epoch']:.2f}s; N={args.compare} "
        f"memory={memory['epoch']:.2f}s/{memory['peak_mib']:.0f}MiB "
        f"streaming={streaming['epoch']:.2f}s/{streaming['peak_mib']:.0f}MiB "
        f"ratio={ratio:.2f} workers={args.workers}"
    )


if __name__ == "__main__":
    main()
