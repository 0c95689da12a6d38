"""Helpers shared by the training benchmarks (not a test module)."""

import hashlib
import json
import math
import statistics
from pathlib import Path

from shallow_ensemble.calibration.predictions import (
    evaluate_predictions,
    fit_calibration,
    noise_floors,
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
    """The benchmark configuration: same data split and model for every strategy.

    ``args.split_seed`` (if the script has it, default 0) seeds the random
    train/valid/test split, ``args.seed`` the training."""
    raw = {
        "data": {
            "train": str(Path(args.data).resolve()),
            "valid": args.valid,
            "test": args.test,
            "split_seed": getattr(args, "split_seed", 0),
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


def _fingerprint(config) -> dict:
    """The configuration of a stage, with a hash of its data file's content (the
    path may differ between runs that reuse a stage)."""
    raw = config.to_dict()
    train_file = Path(raw["data"]["train"])
    raw["data"]["train"] = hashlib.sha256(train_file.read_bytes()).hexdigest()
    if raw["training"].get("init_from"):  # the parent's folder, not its path
        raw["training"]["init_from"] = Path(raw["training"]["init_from"]).parent.name
    return json.loads(json.dumps(raw, default=str))


def run_stage(config, folder: Path, reuse: bool) -> dict:
    """Train one stage (or reuse a finished one); returns its metrics.json.

    A stage is reused only if its folder holds the same configuration
    (``benchmark-config.json``, written after training)."""
    stamp = folder / "benchmark-config.json"
    fingerprint = _fingerprint(config)
    same = stamp.exists() and json.loads(stamp.read_text()) == fingerprint
    if not (reuse and same and (folder / "model.ckpt").exists()):
        if reuse and stamp.exists() and not same:
            # e.g. a key added to the configuration since: the stage trains anew
            stored = json.loads(stamp.read_text())
            print(f"  {folder}: configuration differs, training anew:", flush=True)
            for section, values in fingerprint.items():
                for key, value in values.items():
                    if stored.get(section, {}).get(key, "<absent>") != value:
                        print(f"    {section}.{key} = {value!r}", flush=True)
        train(config, folder, overwrite=True, progress=False)  # every strategy
        stamp.write_text(json.dumps(fingerprint, indent=1))
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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite
    values; NaN, NaN if there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), std


def finite_or_none(value):
    """Strict JSON: NaN and infinities become ``None`` (also inside dicts/lists)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_disjoint(sets: dict) -> None:
    """Fail if a test structure also is in the training or validation set (same
    atomic numbers and positions)."""

    def key(s):
        return (s.numbers.tobytes(), s.positions.tobytes())

    fitted = {key(s) for name in ("train", "valid") for s in sets.get(name, [])}
    shared = sum(key(s) in fitted for s in sets.get("test", []))
    if shared:
        raise RuntimeError(f"{shared} test structures are in train or valid")


def calibrate(model, raw):
    """``raw`` predictions with the model's own calibration: its factors alpha and
    its noise floors."""
    return raw.calibrated(
        float(model.alpha_energy), float(model.alpha_forces), model.noise_floors()
    )


def test_metrics(config, folder: Path, recalibrate: bool = False) -> dict:
    """Test-set metrics of a stage's model, before and after its recalibration.

    ``recalibrate``: fit the calibration anew on the validation set with this
    version's code, as training would now (the model keeps its weights); the result
    has it under ``calibration``."""
    model = load_model(folder / "model.ckpt")
    sets = load_structures(config)
    check_disjoint(sets)
    batch_size = config.training.batch_size
    dataset = GraphDataset(sets["test"], model.cutoff)
    raw = predict_dataset(model, dataset, batch_size)
    result: dict = {"sizes": {k: len(v) for k, v in sets.items()}}
    if recalibrate and config.calibration.enabled:
        valid = GraphDataset(sets["valid"], model.cutoff)
        fit = fit_calibration(
            predict_dataset(model, valid, batch_size),
            noise_floor=config.calibration.noise_floor,
        )
        calibrated = raw.calibrated(
            fit["alpha_energy"], fit["alpha_forces"], noise_floors(fit)
        )
        result["calibration"] = fit
    else:
        calibrated = calibrate(model, raw)
    return {
        **result,
        "raw": evaluate_predictions(raw),
        "calibrated": evaluate_predictions(calibrated),
    }
