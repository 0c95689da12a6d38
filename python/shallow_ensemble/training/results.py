"""What a run leaves: the best model calibrated on validation data, ``model.ckpt``,
``metrics.json``, and the result returned by :py:func:`.trainer.train`."""

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..calibration.predictions import (
    EnsemblePredictions,
    evaluate_predictions,
    fit_calibration,
    noise_floors,
    predict_dataset,
    uncalibrated,
)
from ..config import Config
from ..data import GraphDataset
from ..kinds import ModelKind
from .checkpoints import model_from_checkpoint, read_checkpoint, save_checkpoint
from .rundir import write_json
from .stages import Stage


@dataclass
class TrainResult:
    """What a training run produced.

    ``train_seconds`` counts the epochs and, for strategies that build their model
    from others (``laplace``, ``deep_ensemble``, ...), the time that took; the
    starting checkpoint's own training is not included. For a preset of several
    stages, ``info["stages"]`` has the cost of each (when they write sub-folders).
    """

    model: ModelKind
    checkpoint: Path
    history: list[dict[str, float]]
    calibration: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def written_result(outdir: Path, history: list[dict[str, float]]) -> TrainResult:
    """The result rank 0 wrote, for the other processes."""
    path = outdir / "model.ckpt"
    state = read_checkpoint(path)
    return TrainResult(
        model_from_checkpoint(state),
        path,
        history,
        state["calibration"],
        state["metrics"],
        state["train_seconds"],
        state["info"],
    )


def read_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as fd:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fd)]


def finalize(
    config: Config,
    outdir: Path,
    datasets: dict[str, GraphDataset],
    elapsed: float,
    history: list[dict[str, float]],
    device: torch.device,
    dtype: torch.dtype,
    calibrate: bool = True,
    info: dict[str, Any] | None = None,
    stage: Stage | None = None,
) -> TrainResult:
    """Reload the best model, calibrate it on validation data, write model.ckpt
    (with the configuration and the ``stage`` that made it)."""
    best_state = read_checkpoint(outdir / "best.ckpt")
    model = model_from_checkpoint(best_state).to(device=device, dtype=dtype)
    model.eval()
    batch_size = config.training.batch_size
    predictions = predict_dataset(model, datasets["valid"], batch_size)
    metrics = {"valid_uncalibrated": evaluate_predictions(predictions)}
    calibration = uncalibrated()
    if calibrate and config.calibration.enabled:
        calibration = fit_calibration(
            predictions, noise_floor=config.calibration.noise_floor
        )
        model.set_calibration(calibration)
        metrics["valid_calibrated"] = evaluate_predictions(
            _apply(predictions, calibration)
        )
    if "test" in datasets:
        test = predict_dataset(model, datasets["test"], batch_size)
        metrics["test"] = evaluate_predictions(_apply(test, calibration))
    info = dict(info or {})
    best_epoch = best_state["epoch"] + 1 if best_state["epoch"] >= 0 else None
    payload = {
        "config": config.to_dict(),
        "stage": None if stage is None else stage.to_dict(),
        "calibration": calibration,
        "metrics": metrics,
        "train_seconds": elapsed,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "info": info,
    }
    # metrics.json first: model.ckpt is written last and marks a finished run
    write_json(outdir / "metrics.json", run_summary(payload))
    path = outdir / "model.ckpt"
    save_checkpoint(path, model, payload)
    return TrainResult(model, path, history, calibration, metrics, elapsed, info)


def _apply(
    predictions: EnsemblePredictions, calibration: dict[str, Any]
) -> EnsemblePredictions:
    """``predictions`` calibrated as the model of ``calibration``."""
    return predictions.calibrated(
        calibration["alpha_energy"],
        calibration["alpha_forces"],
        noise_floors(calibration),
    )


def run_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """The content of ``metrics.json``, from a finished run's ``model.ckpt``.

    ``best_epoch`` is the selected epoch, numbered as in ``log.csv`` (``null`` for
    stages that train no epochs); ``strategy`` is the name of the stage.
    """
    stage = payload.get("stage")
    return {
        "strategy": (
            payload["config"]["training"]["strategy"]
            if stage is None
            else stage["name"]
        ),
        "train_seconds": payload["train_seconds"],
        "epochs": payload["epochs"],
        "best_epoch": payload.get("best_epoch"),
        "calibration": payload["calibration"],
        **payload["info"],
        **payload["metrics"],
    }
