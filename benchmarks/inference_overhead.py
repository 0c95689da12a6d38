"""Inference overhead of the uncertainty outputs of an exported model.

Times an exported model (through metatomic, as engines call it) computing energy and
forces, with and without the per-atom ``energy_uncertainty`` and ``energy_ensemble``
outputs, for a structure and its replicas (neighbour lists excluded, computed once).
Medians (E+F, +UQ) and the overhead of the medians and of the fastest runs.

    python benchmarks/inference_overhead.py --data water.xyz --members 16,64 \
        --replicate 1,2

Prints a table and one line starting with ``inference_overhead:``.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ase.io
import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch
from vesin.metatomic import neighbor_lists_for_model

from shallow_ensemble.backbones import SoapBpnn
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported
from shallow_ensemble.model import EnsembleModel


def evaluate(model, atoms, outputs, repeats):
    times = []
    for _ in range(repeats):
        system = systems_to_torch(
            atoms, dtype=torch.float64, positions_requires_grad=True
        )
        for calculator in neighbor_lists_for_model("angstrom", model, "angstrom"):
            calculator.add_neighbor_list([system])
        options = ModelEvaluationOptions(
            length_unit="angstrom",
            outputs={
                k: ModelOutput(unit="eV", sample_kind=v) for k, v in outputs.items()
            },
        )
        start = time.perf_counter()
        results = model([system], options, False)
        energy = results["energy"].block().values.sum()
        torch.autograd.grad(energy, system.positions)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--members", default="16,64")
    parser.add_argument("--replicate", default="1,2", help="supercell factors n (n^3)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = ase.io.read(args.data, args.frame)
    types = sorted(set(base.numbers.tolist()))
    plain = {"energy": "system"}
    with_uq = {
        "energy": "system",
        "energy_uncertainty": "atom",
        "energy_ensemble": "atom",
    }
    print(
        f"{'M':>4}{'atoms':>7}{'E+F [ms]':>10}{'+UQ [ms]':>10}{'overhead':>10}"
        f"{'(fastest)':>13}{'atoms/s':>10}"
    )
    summary = []
    folder = Path(tempfile.mkdtemp())
    for n_members in [int(m) for m in args.members.split(",")]:
        torch.manual_seed(0)
        model = EnsembleModel(SoapBpnn(types), n_members)
        path = export_model(model, folder / f"model-{n_members}.pt")
        exported = load_exported(path)
        for n in [int(r) for r in args.replicate.split(",")]:
            atoms = base.repeat((n, n, n))
            evaluate(exported, atoms, with_uq, 3)  # warm-up (TorchScript profiling)
            evaluate(exported, atoms, plain, 3)
            plain_times, uq_times = [], []
            # interleaved, so noise hits both alike, in alternating order (ABBA),
            # so that neither always runs right after the other
            for repeat in range(args.repeats):
                pair = [(plain, plain_times), (with_uq, uq_times)]
                for outputs, times in pair if repeat % 2 == 0 else pair[::-1]:
                    times.append(evaluate(exported, atoms, outputs, 1))
            t_plain = statistics.median(plain_times)
            t_uq = statistics.median(uq_times)
            overhead = 100 * (t_uq / t_plain - 1)
            # the fastest runs are the least disturbed by other work on the machine
            overhead_min = 100 * (min(uq_times) / min(plain_times) - 1)
            print(
                f"{n_members:>4}{len(atoms):>7}{1000 * t_plain:>10.1f}"
                f"{1000 * t_uq:>10.1f}{overhead:>9.1f}%{overhead_min:>12.1f}%"
                f"{len(atoms) / t_uq:>10.0f}"
            )
            summary.append(
                f"M={n_members} N={len(atoms)} overhead={overhead:.1f}% "
                f"(fastest runs {overhead_min:.1f}%)"
            )
    print("inference_overhead: " + "; ".join(summary))


if __name__ == "__main__":
    main()
