"""Cost of one optimiser step for each training loss, measured interleaved.

Builds the default model on one batch of structures and times, alternating between
strategies (so machine noise hits all of them alike), loss + backward + Adam step for
``mse`` (M = 1), ``energy_nll`` (M members, mean forces) and ``energy_force_nll`` (M
members, member forces). Reports medians and ratios to the MSE step.

    python benchmarks/training_step.py --data water.xyz --members 16 --batch-size 4

Prints a table and one line starting with ``training_step:``.
"""

import argparse
import statistics
import time

import torch

from shallow_ensemble.config import TrainingConfig
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.training.initialization import build_model, init_data_dependent
from shallow_ensemble.training.strategies import get_strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    structures = read_structures(args.data)[: max(args.batch_size, 8)]
    from shallow_ensemble.config import Config, DataConfig

    config = Config(data=DataConfig(train=args.data, valid=args.data))
    dataset = GraphDataset(structures, config.model.cutoff)
    batch = collate([dataset[i] for i in range(args.batch_size)]).to(dtype=dtype)
    types = sorted({int(z) for s in structures for z in s.numbers})

    runs = {}
    for name in ("mse", "energy_nll", "energy_force_nll"):
        training = TrainingConfig(strategy=name, warmup_epochs=0)
        strategy = get_strategy(training)
        torch.manual_seed(0)
        model = build_model(config, types, strategy.num_members(args.members))
        init_data_dependent(model, dataset)
        model = model.to(dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        runs[name] = (strategy, model, optimizer)

    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):
        for name, (strategy, model, optimizer) in runs.items():
            start = time.perf_counter()
            optimizer.zero_grad()
            strategy.loss(model, batch, epoch=10).total.backward()
            optimizer.step()
            if repeat > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)

    n_atoms = int(batch.n_atoms.sum())
    print(
        f"{args.data}: batch of {args.batch_size} ({n_atoms} atoms), "
        f"M = {args.members}, {args.dtype}, {args.threads} threads"
    )
    base = statistics.median(times["mse"])
    summary = []
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<18}{1000 * median:>10.1f} ms{median / base:>8.2f}x mse")
        summary.append(f"{name}={median / base:.2f}x")
    print("training_step: " + " ".join(summary) + f" (mse step {1000 * base:.0f} ms)")


if __name__ == "__main__":
    main()
