"""The paper's comparison: calibration vs training cost of every strategy.

Runs, on one dataset with one backbone and one random train/valid/test split:
``mse``, ``energy_nll``, ``energy_force_nll`` (from scratch), ``laplace`` and
``random_heads`` (from the ``mse`` model), ``deep_ensemble``, and ``finetune`` (full
model, joint energy + force NLL) from the ``laplace`` and from the ``energy_nll``
models. Prints one table (test-set RMSE, NLL, RLL before/after recalibration, alpha,
miscalibration area; cumulative training time and epochs, i.e. including the stages a
strategy builds on) and a summary line starting with ``protocols:``.

    python benchmarks/protocols.py --data water.xyz --epochs 40 --finetune-epochs 10 \
        --output runs/water-protocols --json water-protocols.json

Stages whose ``model.ckpt`` exists in ``--output`` are reused with ``--reuse``.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from _common import add_model_arguments, get, make_config, run_stage, test_metrics


def stages(args):
    """(name, parent, training overrides) in dependency order."""
    finetune = {
        "strategy": "finetune",
        "epochs": args.finetune_epochs,
        "warmup_epochs": 0,
        "learning_rate": args.finetune_lr,
    }
    return [
        ("mse", None, {"strategy": "mse", "epochs": args.epochs}),
        ("energy_nll", None, {"strategy": "energy_nll", "epochs": args.epochs}),
        (
            "energy_force_nll",
            None,
            {"strategy": "energy_force_nll", "epochs": args.epochs},
        ),
        ("laplace", "mse", {"strategy": "laplace"}),
        ("random_heads", "mse", {"strategy": "random_heads"}),
        ("finetune<-laplace", "laplace", finetune),
        ("finetune<-energy_nll", "energy_nll", finetune),
        ("deep_ensemble", None, {"strategy": "deep_ensemble", "epochs": args.epochs}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--epochs", type=int, default=40, help="epochs from scratch")
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument(
        "--deep-members",
        type=int,
        default=4,
        help="models in the deep ensemble (each trained from scratch)",
    )
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", required=True, help="folder for all runs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished stages")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.output)
    skip = set(filter(None, args.skip.split(",")))

    results = {}
    for name, parent, overrides in stages(args):
        if name in skip or (parent is not None and parent not in results):
            continue
        folder = root / name.replace("<-", "-from-")
        if parent is not None:
            overrides = {
                **overrides,
                "init_from": str(root / parent.replace("<-", "-from-") / "model.ckpt"),
            }
        members = args.deep_members if name == "deep_ensemble" else args.members
        config = make_config(args, **overrides)
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, num_members=members)
        )
        metrics = run_stage(config, folder, args.reuse)
        own_seconds = metrics["train_seconds"]
        total = own_seconds + (results[parent]["total_seconds"] if parent else 0.0)
        epochs = metrics["epochs"] + (results[parent]["total_epochs"] if parent else 0)
        if name == "deep_ensemble":
            epochs = members * args.epochs
        results[name] = {
            "own_seconds": own_seconds,
            "total_seconds": total,
            "total_epochs": epochs,
            "median_epoch_seconds": metrics["median_epoch_seconds"],
            "calibration": metrics["calibration"],
            **test_metrics(config, folder),
        }
        print(f"done {name}: {own_seconds:.0f} s", flush=True)

    sizes = next(iter(results.values()))["sizes"]
    print(f"\n{args.data}: split {sizes}, M = {args.members}, {args.threads} threads")
    head = (
        f"{'strategy':<22}{'time[s]':>8}{'ep':>4}{'s/ep':>6}{'E_RMSE':>8}{'F_RMSE':>8}"
        f"{'E_RLL':>9}{'E_RLLc':>9}{'F_RLL':>9}{'F_RLLc':>9}{'F_NLLc':>8}"
        f"{'a_E':>7}{'a_F':>7}{'F_MA':>6}"
    )
    print(head)
    summary = []
    for name, r in results.items():
        raw, cal = r["raw"], r["calibrated"]

        print(
            f"{name:<22}{r['total_seconds']:>8.0f}{r['total_epochs']:>4}"
            f"{r['median_epoch_seconds']:>6.1f}"
            f"{get(cal, 'energy', 'rmse'):>8.3f}{get(cal, 'forces', 'rmse'):>8.3f}"
            f"{get(raw, 'energy', 'rll'):>9.1f}{get(cal, 'energy', 'rll'):>9.1f}"
            f"{get(raw, 'forces', 'rll'):>9.1f}{get(cal, 'forces', 'rll'):>9.1f}"
            f"{get(cal, 'forces', 'nll'):>8.3f}"
            f"{r['calibration']['alpha_energy']:>7.2f}"
            f"{r['calibration']['alpha_forces']:>7.2f}"
            f"{get(cal, 'forces', 'miscalibration_area'):>6.3f}"
        )
        summary.append(
            f"{name} F_RLL={get(cal, 'forces', 'rll'):.1f} t={r['total_seconds']:.0f}s"
        )
    if args.json:
        with open(args.json, "w") as fd:
            json.dump({"args": vars(args), "results": results}, fd, indent=2)
    print("protocols: " + "; ".join(summary))


if __name__ == "__main__":
    main()
