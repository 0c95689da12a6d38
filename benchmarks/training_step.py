"""Cost of one optimiser step for each training loss, measured interleaved, and its
peak memory.

Builds the default model on one batch of structures and times, alternating between
strategies (so machine noise hits all of them alike), loss + backward + Adam step for
``mse`` (M = 1), ``energy_nll`` (M members, mean forces), ``energy_force_nll`` (M
members, member forces) and ``finetune`` of the heads only (member forces,
gradients for the heads only; fine-tuning the full model costs an
``energy_force_nll`` step). Reports medians and ratios to the MSE step, the epoch
time they imply for ``--epoch-structures`` training structures, and, each measured
in a fresh process, the peak resident memory a step adds to the process (the
high-water mark, reset before the first step, minus the resident size then;
Linux only).

    python benchmarks/training_step.py --data water.xyz --members 16 --batch-size 4

Prints a table and one line starting with ``training_step:``.
"""

import argparse
import statistics
import time

import torch
from _memory import peak_extra_in_fresh_process, peak_extra_mib

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
    parser.add_argument("--epoch-structures", type=int, default=None)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
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
    for name in [args.only] if args.only else list(STRATEGIES):
        strategy = get_strategy(TrainingConfig(warmup_epochs=0, **STRATEGIES[name]))
        torch.manual_seed(0)
        model = build_model(config, types, strategy.num_members(args.members))
        init_data_dependent(model, dataset)
        model = model.to(dtype)
        optimizer = torch.optim.Adam(strategy.param_groups(model), lr=1e-4)
        strategy.prepare(model)
        runs[name] = (strategy, model, optimizer)

    if args.only:  # a fresh process measuring one strategy's memory
        extra = peak_extra_mib(lambda: [_step(*runs[args.only], batch) for _ in "12"])
        print(f"peak_mib {extra:.1f}")
        return

    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            _step(*run, batch)
            if repeat > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    memory = {name: peak_extra_in_fresh_process("--only", name) for name in runs}

    n_atoms = int(batch.n_atoms.sum())
    print(
        f"{args.data}: batch of {args.batch_size} ({n_atoms} atoms), "
        f"M = {args.members}, {args.dtype}, {args.threads} threads"
    )
    n_epoch = args.epoch_structures or len(read_structures(args.data))
    steps = -(-n_epoch // args.batch_size)
    print(
        f"{'strategy':<18}{'step':>10}{'vs mse':>8}{f'epoch ({n_epoch})':>16}"
        f"{'peak memory':>14}"
    )
    base = statistics.median(times["mse"])
    summary = []
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:<18}{1000 * median:>7.1f} ms{median / base:>7.2f}x"
            f"{steps * median:>14.1f} s{memory[name]:>10.0f} MiB"
        )
        summary.append(f"{name}={median / base:.2f}x/{memory[name]:.0f}MiB")
    print("training_step: " + " ".join(summary) + f" (mse step {1000 * base:.0f} ms)")


# name -> TrainingConfig fields
STRATEGIES = {
    "mse": {"strategy": "mse"},
    "energy_nll": {"strategy": "energy_nll"},
    "energy_force_nll": {"strategy": "energy_force_nll"},
    "finetune_heads": {"strategy": "finetune", "finetune_target": "heads"},
}


def _step(strategy, model, optimizer, batch) -> None:
    optimizer.zero_grad()
    strategy.loss(model, batch, epoch=10).total.backward()
    optimizer.step()


if __name__ == "__main__":
    main()
