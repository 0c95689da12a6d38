"""Helpers shared by the training benchmarks (not a test module)."""

import json
import statistics
from pathlib import Path

from shallow_ensemble.calibration.predictions import (
    evaluate_predictions,
    predict_dataset,
)
from shallow_ensemble.config import config_from_dict
from shallow_ensemble.data import GraphDataset
from shallow_ensemble.training import load_model, train
from shallow_ensemble.training.checkpoints import read_checkpoint
from shallow_ensemble.training.datasets import load_structures


def add_model_arguments(parser) -> None:
    parser.add_argument(
        "--data", required=True, help="extended XYZ with energies/forces"
    )
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--valid", type=float, default=0.15, help="validation fraction")
    parser.add_argument("--test", type=float, default=0.15, help="test fraction")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--max-radial", type=int, default=6)
    parser.add_argument("--max-angular", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


def get(report: dict, quantity: str, key: str) -> float:
    """``report[quantity][key]``, NaN when absent (e.g. no uncertainty for ``mse``)."""
    return report.get(quantity, {}).get(key, float("nan"))


def make_config(args, **training):
    """The benchmark configuration: same data split and model for every strategy."""
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
        "training": {"batch_size": args.batch_size, "seed": args.seed, **training},
    }
    return config_from_dict(raw)


def run_stage(config, folder: Path, reuse: bool) -> dict:
    """Train one stage (or reuse a finished one); returns its metrics.json."""
    if not (reuse and (folder / "model.ckpt").exists()):
        train(config, folder, overwrite=True, progress=False)  # every strategy
    with open(folder / "metrics.json") as fd:
        metrics = json.load(fd)
    if "train_seconds" not in metrics:  # written by an older version: ask the ckpt
        payload = read_checkpoint(folder / "model.ckpt")
        metrics["train_seconds"] = payload["train_seconds"]
        metrics["epochs"] = payload["epochs"]
    epochs = []
    if (folder / "log.csv").exists():
        with open(folder / "log.csv") as fd:
            header = fd.readline().strip().split(",")
            column = header.index("seconds")
            epochs = [float(line.split(",")[column]) for line in fd if line.strip()]
    metrics["median_epoch_seconds"] = statistics.median(epochs) if epochs else 0.0
    return metrics


def test_metrics(config, folder: Path) -> dict:
    """Test-set metrics of a stage's model, before and after its recalibration."""
    model = load_model(folder / "model.ckpt")
    sets = load_structures(config)
    dataset = GraphDataset(sets["test"], model.backbone.cutoff)
    raw = predict_dataset(model, dataset, config.training.batch_size)
    calibrated = raw.calibrated(float(model.alpha_energy), float(model.alpha_forces))
    return {
        "sizes": {k: len(v) for k, v in sets.items()},
        "raw": evaluate_predictions(raw),
        "calibrated": evaluate_predictions(calibrated),
    }
