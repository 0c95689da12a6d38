"""Accuracy, calibration and training cost of the from-scratch strategies.

Trains ``mse``, ``energy_nll`` and ``energy_force_nll`` with the same backbone, split
and budget, and reports test-set energy/force RMSE and RLL (before and after the
validation-set recalibration) with the wall time per epoch (median over epochs).
``protocols.py`` runs these and the derived strategies; both reuse each other's runs
with ``--reuse`` on the same ``--output``.

    python benchmarks/train_strategies.py --data water.xyz --epochs 40 \
        --output runs/water

Prints a table, then one summary line starting with ``train_strategies:``.
"""

import argparse
import json
from pathlib import Path

import torch
from _common import add_model_arguments, get, make_config, run_stage, test_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--strategies", default="mse,energy_nll,energy_force_nll")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", required=True, help="folder for the runs")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    for strategy in args.strategies.split(","):
        config = make_config(args, strategy=strategy, epochs=args.epochs)
        folder = Path(args.output) / strategy
        metrics = run_stage(config, folder, args.reuse)
        results[strategy] = {**metrics, **test_metrics(config, folder)}

    sizes = next(iter(results.values()))["sizes"]
    print(
        f"\n{args.data}: split {sizes}, M = {args.members}, {args.epochs} epochs, "
        f"{args.threads} threads"
    )
    print(
        f"{'strategy':<18}{'s/epoch':>9}{'E RMSE':>9}{'F RMSE':>9}{'E RLL raw':>11}"
        f"{'E RLL cal':>11}{'F RLL raw':>11}{'F RLL cal':>11}{'alpha_E':>9}"
        f"{'alpha_F':>9}"
    )
    summary = []
    for name, r in results.items():
        raw, cal = r["raw"], r["calibrated"]

        print(
            f"{name:<18}{r['median_epoch_seconds']:>9.1f}"
            f"{get(cal, 'energy', 'rmse'):>9.4f}{get(cal, 'forces', 'rmse'):>9.4f}"
            f"{get(raw, 'energy', 'rll'):>11.1f}{get(cal, 'energy', 'rll'):>11.1f}"
            f"{get(raw, 'forces', 'rll'):>11.1f}{get(cal, 'forces', 'rll'):>11.1f}"
            f"{r['calibration']['alpha_energy']:>9.3f}"
            f"{r['calibration']['alpha_forces']:>9.3f}"
        )
        summary.append(
            f"{name} E_rmse={get(cal, 'energy', 'rmse'):.4f} "
            f"F_rmse={get(cal, 'forces', 'rmse'):.4f} "
            f"F_rll={get(cal, 'forces', 'rll'):.1f} "
            f"s/epoch={r['median_epoch_seconds']:.1f}"
        )
    if args.json:
        with open(args.json, "w") as fd:
            json.dump(results, fd, indent=2)
    print("train_strategies: " + "; ".join(summary))


if __name__ == "__main__":
    main()
