"""The one training loop, shared by every strategy."""

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones import SoapBpnn
from ..calibration.predictions import (
    evaluate_predictions,
    fit_calibration,
    predict_dataset,
)
from ..config import Config
from ..data import (
    GraphDataset,
    atomic_types_of,
    check_atomic_types,
    iterate_batches,
    read_structures,
    split_indices,
)
from ..model import EnsembleModel
from .checkpoints import load_model, read_checkpoint, save_checkpoint
from .strategies import Strategy, get_strategy


class TrainingError(RuntimeError):
    """Training cannot start or continue as asked."""


@dataclass
class TrainResult:
    """What a training run produced."""

    model: EnsembleModel
    checkpoint: Path
    history: list[dict[str, float]]
    calibration: dict[str, float]
    metrics: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0


def build_model(config: Config, atomic_types: list[int], strategy: Strategy):
    m = config.model
    backbone = SoapBpnn(
        atomic_types,
        cutoff=m.cutoff,
        cutoff_width=m.cutoff_width,
        max_radial=m.max_radial,
        max_angular=m.max_angular,
        hidden_sizes=list(m.hidden_sizes),
    )
    return EnsembleModel(backbone, num_members=strategy.num_members(m.num_members))


def _init_data_dependent(model: EnsembleModel, dataset: GraphDataset) -> None:
    """Descriptor standardisation, composition baseline and energy scale."""
    graphs = [dataset[i] for i in range(min(len(dataset), 32))]
    model.backbone.fit_normalization(
        [
            [
                g.positions[g.neighbors] - g.positions[g.centers] + g.cell_shifts,
                g.centers,
                g.neighbors,
                model.species_index(g.numbers),
            ]
            for g in graphs
        ]
    )
    counts = torch.zeros(len(dataset), len(model.atomic_types), dtype=torch.float64)
    energies = torch.zeros(len(dataset), dtype=torch.float64)
    n_atoms = torch.zeros(len(dataset), dtype=torch.float64)
    for i in range(len(dataset)):
        g = dataset[i]
        species = model.species_index(g.numbers)
        counts[i] = torch.bincount(species, minlength=len(model.atomic_types))
        energies[i] = g.energy
        n_atoms[i] = len(g.numbers)
    model.fit_baseline(counts, energies, n_atoms)


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "constant":
        return 1.0
    progress = epoch / max(epochs, 1)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def _validation_loss(model, strategy, dataset, batch_size, epoch, device, dtype):
    total, weight = 0.0, 0
    parts: dict[str, float] = {}
    for batch in iterate_batches(dataset, batch_size, shuffle=False):
        batch = batch.to(device=device, dtype=dtype)
        result = strategy.loss(model, batch, epoch)
        total += float(result.total.detach()) * batch.n_systems
        weight += batch.n_systems
        for key, value in result.parts.items():
            parts[key] = parts.get(key, 0.0) + value * batch.n_systems
    return total / weight, {k: v / weight for k, v in parts.items()}


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fd:
        writer = csv.DictWriter(fd, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def load_structures(config: Config) -> dict[str, list]:
    """Train, validation (and test) structures; fractions split ``train`` at random."""
    d = config.data

    def read(path):
        return read_structures(path, energy_key=d.energy_key, forces_key=d.forces_key)

    train = read(d.train)
    sets = {"train": train}
    fractions = {
        name: value
        for name, value in (("valid", d.valid), ("test", d.test))
        if isinstance(value, float)
    }
    if fractions:
        if (
            not all(0 < f < 1 for f in fractions.values())
            or sum(fractions.values()) >= 1
        ):
            raise TrainingError(
                f"fractions {fractions} of `data.train` must be in (0, 1) and sum to "
                "less than 1"
            )
        parts = split_indices(
            len(train),
            [1 - sum(fractions.values()), *fractions.values()],
            config.training.seed,
        )
        sets["train"] = [train[i] for i in parts[0]]
        for name, part in zip(fractions, parts[1:], strict=True):
            sets[name] = [train[i] for i in part]
    for name in ("valid", "test"):
        value = getattr(d, name)
        if isinstance(value, str):
            sets[name] = read(value)
    types = atomic_types_of(sets["train"])
    for name, structures in sets.items():
        if name != "train":
            check_atomic_types(structures, types)
    return sets


def _load_datasets(config: Config):
    sets = load_structures(config)
    types = atomic_types_of(sets["train"])
    cutoff = config.model.cutoff
    datasets = {
        name: GraphDataset(structures, cutoff) for name, structures in sets.items()
    }
    return types, datasets


def train(
    config: Config,
    outdir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train, keep the best model on validation, calibrate it, write checkpoints.

    Writes ``OUTDIR/model.ckpt`` (best, calibrated), ``OUTDIR/last.ckpt`` (full
    training state after every epoch, for ``resume``) and ``OUTDIR/log.csv``.

    :param config: validated configuration
    :param outdir: output folder
    :param resume: continue from ``OUTDIR/last.ckpt``
    :param overwrite: start again even if ``OUTDIR`` holds a training
    :param on_epoch_end: called with the epoch index after each epoch's checkpoint
    :param progress: show progress bars
    """
    outdir = Path(outdir)
    state_path = outdir / "last.ckpt"
    if state_path.exists() and not (resume or overwrite):
        raise TrainingError(
            f"'{outdir}' already holds a training run; pass --resume to continue it "
            "or --overwrite to start again"
        )
    if resume and not state_path.exists():
        raise TrainingError(f"cannot resume: '{state_path}' does not exist")
    t = config.training
    device = torch.device(t.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("`training.device` is 'cuda' but CUDA is not available")
    dtype = getattr(torch, t.dtype)
    strategy = get_strategy(t)

    types, datasets = _load_datasets(config)
    outdir.mkdir(parents=True, exist_ok=True)
    train_set, valid_set = datasets["train"], datasets["valid"]
    torch.manual_seed(t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    state: dict[str, Any] = {}
    if resume:
        state = read_checkpoint(state_path)
        if state.get("config") != config.to_dict():
            raise TrainingError(
                "cannot resume: the configuration differs from the one in "
                f"'{state_path}'"
            )
        model = load_model(state_path)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    else:
        model = build_model(config, types, strategy)
        _init_data_dependent(model, train_set)
    model = model.to(device=device, dtype=dtype)

    optimizer = torch.optim.Adam(
        model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: _lr_factor(t.lr_schedule, e, t.epochs)
    )
    history: list[dict[str, float]] = state.get("history", [])
    best = state.get("best", math.inf)
    start_epoch = state.get("epoch", -1) + 1
    elapsed = state.get("train_seconds", 0.0)
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"resuming '{outdir}' at epoch {start_epoch + 1}/{t.epochs}")

    best_path = outdir / "best.ckpt"
    epochs = tqdm(
        range(start_epoch, t.epochs),
        desc=f"train {strategy.name}",
        unit="epoch",
        disable=not progress,
        initial=start_epoch,
        total=t.epochs,
    )
    for epoch in epochs:
        start = time.perf_counter()
        model.train()
        train_loss, n_seen = 0.0, 0
        for batch in iterate_batches(train_set, t.batch_size, True, generator):
            batch = batch.to(device=device, dtype=dtype)
            optimizer.zero_grad(set_to_none=True)
            result = strategy.loss(model, batch, epoch)
            if not torch.isfinite(result.total):
                raise TrainingError(
                    f"non-finite loss at epoch {epoch + 1}: {result.parts}; lower "
                    "`training.learning_rate` or raise `training.warmup_epochs`"
                )
            result.total.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            train_loss += float(result.total.detach()) * batch.n_systems
            n_seen += batch.n_systems
        scheduler.step()
        epoch_seconds = time.perf_counter() - start
        elapsed += epoch_seconds

        model.eval()
        valid_loss, parts = _validation_loss(
            model, strategy, valid_set, t.batch_size, epoch, device, dtype
        )
        row = {
            "epoch": epoch + 1,
            "seconds": round(epoch_seconds, 3),
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss / n_seen,
            "valid_loss": valid_loss,
            **{f"valid_{k}": v for k, v in parts.items()},
        }
        history.append(row)
        _write_log(outdir / "log.csv", history)
        epochs.set_postfix(train=f"{row['train_loss']:.4g}", valid=f"{valid_loss:.4g}")

        if strategy.in_warmup(epoch):
            best = math.inf  # losses of the warm-up are not comparable
        if valid_loss < best or not best_path.exists():
            best = valid_loss
            save_checkpoint(best_path, model, {"epoch": epoch})
        save_checkpoint(
            state_path,
            model,
            {
                "config": config.to_dict(),
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "best": best,
                "train_seconds": elapsed,
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)

    return finalize(config, outdir, datasets, elapsed, history, device, dtype)


def finalize(config, outdir, datasets, elapsed, history, device, dtype) -> TrainResult:
    """Reload the best model, calibrate it on validation data, write model.ckpt."""
    model = load_model(outdir / "best.ckpt").to(device=device, dtype=dtype)
    model.eval()
    batch_size = config.training.batch_size
    predictions = predict_dataset(model, datasets["valid"], batch_size)
    metrics = {"valid_uncalibrated": evaluate_predictions(predictions)}
    calibration = {"alpha_energy": 1.0, "alpha_forces": 1.0, "alpha_atom": 1.0}
    if config.calibration.enabled:
        calibration = fit_calibration(predictions)
        for key, value in calibration.items():
            getattr(model, key).fill_(value)
        calibrated = predictions.calibrated(
            calibration["alpha_energy"], calibration["alpha_forces"]
        )
        metrics["valid_calibrated"] = evaluate_predictions(calibrated)
    if "test" in datasets:
        test = predict_dataset(model, datasets["test"], batch_size)
        test = test.calibrated(calibration["alpha_energy"], calibration["alpha_forces"])
        metrics["test"] = evaluate_predictions(test)
    path = outdir / "model.ckpt"
    save_checkpoint(
        path,
        model,
        {
            "config": config.to_dict(),
            "calibration": calibration,
            "metrics": metrics,
            "train_seconds": elapsed,
            "epochs": len(history),
        },
    )
    with open(outdir / "metrics.json", "w") as fd:
        json.dump({"calibration": calibration, **metrics}, fd, indent=2)
    return TrainResult(model, path, history, calibration, metrics, elapsed)
