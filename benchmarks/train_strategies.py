"""Accuracy, calibration and training cost of the training strategies on one dataset.

Trains ``mse``, ``energy_nll`` and ``energy_force_nll`` with the same backbone, split
and budget, and reports test-set energy/force RMSE and RLL (before and after the
validation-set recalibration) with the wall time per epoch.

    python benchmarks/train_strategies.py --data water.xyz --epochs 30

Prints a table, then one summary line starting with ``train_strategies:``.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from shallow_ensemble.calibration.predictions import (
    evaluate_predictions,
    predict_dataset,
)
from shallow_ensemble.config import config_from_dict
from shallow_ensemble.data import GraphDataset
from shallow_ensemble.training import train
from shallow_ensemble.training.datasets import load_structures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", required=True, help="extended XYZ with energies/forces"
    )
    parser.add_argument("--strategies", default="mse,energy_nll,energy_force_nll")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--valid", type=float, default=0.15, help="validation fraction")
    parser.add_argument("--test", type=float, default=0.15, help="test fraction")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--max-radial", type=int, default=6)
    parser.add_argument("--max-angular", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--output", help="keep the training folders here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    root = Path(args.output or tempfile.mkdtemp(prefix="strategies-"))
    for strategy in args.strategies.split(","):
        raw = {
            "data": {
                "train": str(Path(args.data).resolve()),
                "valid": args.valid,
                "test": args.test,
            },
            "model": {
                "num_members": args.members,
                "cutoff": args.cutoff,
                "max_radial": args.max_radial,
                "max_angular": args.max_angular,
            },
            "training": {
                "strategy": strategy,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
            },
        }
        config = config_from_dict(raw)
        start = time.perf_counter()
        result = train(config, root / strategy, overwrite=True, progress=False)
        total = time.perf_counter() - start

        sets = load_structures(config)
        test_set = GraphDataset(sets["test"], config.model.cutoff)
        raw_pred = predict_dataset(result.model, test_set, args.batch_size)
        calibrated = raw_pred.calibrated(
            result.calibration["alpha_energy"], result.calibration["alpha_forces"]
        )
        results[strategy] = {
            "sizes": {k: len(v) for k, v in sets.items()},
            "seconds_per_epoch": result.train_seconds / len(result.history),
            "epochs": len(result.history),
            "total_seconds": total,
            "calibration": result.calibration,
            "test_uncalibrated": evaluate_predictions(raw_pred),
            "test_calibrated": evaluate_predictions(calibrated),
        }
        print(f"done {strategy} in {total:.0f} s", flush=True)

    header = (
        f"{'strategy':<18}{'s/epoch':>9}{'E RMSE':>9}{'F RMSE':>9}"
        f"{'E RLL raw':>11}{'E RLL cal':>11}{'F RLL raw':>11}{'F RLL cal':>11}"
        f"{'alpha_E':>9}{'alpha_F':>9}"
    )
    print(
        f"\n{args.data}: sizes {next(iter(results.values()))['sizes']}, "
        f"M = {args.members}, {args.epochs} epochs, {args.threads} threads"
    )
    print(header)
    summary = []
    for name, r in results.items():
        raw, cal = r["test_uncalibrated"], r["test_calibrated"]

        def get(report, quantity, key):
            return report.get(quantity, {}).get(key, float("nan"))

        print(
            f"{name:<18}{r['seconds_per_epoch']:>9.1f}"
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
            f"s/epoch={r['seconds_per_epoch']:.1f}"
        )
    if args.json:
        with open(args.json, "w") as fd:
            json.dump(results, fd, indent=2)
    print("train_strategies: " + "; ".join(summary))


if __name__ == "__main__":
    main()
